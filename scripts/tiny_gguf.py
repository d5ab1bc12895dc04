#!/usr/bin/env python3
"""Write tiny llama-architecture GGUF models with random f32 weights.

The models are meant for tests: a real llama-server loads one in milliseconds and serves
chat (with and without streaming), completions and, with ``--embeddings``, embeddings.
The output is random printable ASCII and newlines.  The model never emits EOS, so every
request stops at max_tokens (finish_reason "length"), or at the context size.

Usage as a script::

    python scripts/tiny_gguf.py OUTDIR [--count N]

writes OUTDIR/tiny-a.gguf, tiny-b.gguf, ... (seeds 0, 1, ...) and prints the paths written.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import pathlib
import string
import sys
import uuid
from collections.abc import Sequence

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, PoolingType, TokenType

__all__ = ["main", "write_tiny_model"]

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 128
N_CTX = 32768

# ChatML: llama-server's non-jinja path also recognises it (it looks for "<|im_start|>").
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# SentencePiece writes a space as U+2581; llama.cpp's SPM tokenizer expects that spelling.
SPM_SPACE = "\u2581"


def _vocab() -> tuple[list[str], list[int], list[float], list[bool]]:
    """Return tokens, token types, scores, and whether the model may emit each token."""
    tokens: list[str] = []
    types: list[int] = []
    scores: list[float] = []
    emit: list[bool] = []

    def add(text: str, ttype: TokenType, score: float, may_emit: bool) -> None:
        tokens.append(text)
        types.append(int(ttype))
        scores.append(score)
        emit.append(may_emit)

    add("<unk>", TokenType.UNKNOWN, 0.0, False)
    add("<s>", TokenType.CONTROL, 0.0, False)
    add("</s>", TokenType.CONTROL, 0.0, False)
    # All 256 byte tokens let the SPM tokenizer fall back to bytes for any input (a missing
    # one makes llama.cpp throw unordered_map::at, and it needs <0x0A> at load time).  Only
    # the newline may be generated: a lone byte >= 0x80 is invalid UTF-8 and breaks the
    # server's JSON output, and the other ASCII bytes duplicate the character tokens below.
    for byte in range(256):
        add(f"<0x{byte:02X}>", TokenType.BYTE, 0.0, byte == 0x0A)
    add("<|im_start|>", TokenType.CONTROL, 0.0, False)
    add("<|im_end|>", TokenType.CONTROL, 0.0, False)
    for i, ch in enumerate(" " + string.ascii_letters + string.digits + string.punctuation):
        # Falling scores only order SPM merges; with one-character pieces nothing merges.
        add(SPM_SPACE if ch == " " else ch, TokenType.NORMAL, -float(i), True)
    return tokens, types, scores, emit


def _tensors(rng: np.random.Generator, emit: Sequence[bool]) -> dict[str, np.ndarray]:
    """Random llama weights, rigged so that only tokens marked in ``emit`` are sampled.

    Dimension 0 of the residual stream is a constant "bias channel": every token embedding
    holds a constant there and no layer writes to it, so after the final RMS norm it stays
    large and positive.  Column 0 of the output matrix then acts as a per-token logit bias:
    strongly negative for tokens that must never be generated (EOS, control tokens, raw
    bytes), so that every request runs to max_tokens and the text is valid UTF-8.
    """
    n_vocab = len(emit)
    n_embd_kv = N_EMBD // N_HEAD * N_HEAD_KV

    def rand(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    tok_embd = rand(n_vocab, N_EMBD, scale=0.5)
    tok_embd[:, 0] = 1.0

    out_norm = ones(N_EMBD)
    out_norm[0] = 4.0
    output = rand(n_vocab, N_EMBD, scale=0.3)
    # The bias channel reaches the logits at several units, so -100 puts the banned tokens
    # hundreds of nats down: out of reach even at temperatures far above 1 with top_k 0.
    output[:, 0] = np.where(np.asarray(emit), 0.0, -100.0)

    tensors: dict[str, np.ndarray] = {"token_embd.weight": tok_embd}
    for layer in range(N_LAYER):
        blk = f"blk.{layer}"
        attn_out = rand(N_EMBD, N_EMBD, scale=0.1)
        ffn_down = rand(N_EMBD, N_FF, scale=0.1)
        # Row 0 is the bias channel: keep the layers from writing into it.
        attn_out[0] = 0.0
        ffn_down[0] = 0.0
        tensors.update(
            {
                f"{blk}.attn_norm.weight": ones(N_EMBD),
                f"{blk}.attn_q.weight": rand(N_EMBD, N_EMBD, scale=0.2),
                f"{blk}.attn_k.weight": rand(n_embd_kv, N_EMBD, scale=0.2),
                f"{blk}.attn_v.weight": rand(n_embd_kv, N_EMBD, scale=0.2),
                f"{blk}.attn_output.weight": attn_out,
                f"{blk}.ffn_norm.weight": ones(N_EMBD),
                f"{blk}.ffn_gate.weight": rand(N_FF, N_EMBD, scale=0.2),
                f"{blk}.ffn_up.weight": rand(N_FF, N_EMBD, scale=0.2),
                f"{blk}.ffn_down.weight": ffn_down,
            }
        )
    tensors["output_norm.weight"] = out_norm
    tensors["output.weight"] = output
    return tensors


def _write(path: pathlib.Path, *, seed: int, name: str) -> None:
    """Write the GGUF file for ``seed`` to ``path`` (overwriting it)."""
    tokens, types, scores, emit = _vocab()
    rng = np.random.default_rng(seed)

    writer = GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_vocab_size(len(tokens))
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    # llama models default to no pooling, which /v1/embeddings rejects; mean pooling makes a
    # plain --embeddings server work and is ignored when embeddings are off.
    writer.add_pooling_type(PoolingType.MEAN)

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_unk_token_id(tokens.index("<unk>"))
    writer.add_bos_token_id(tokens.index("<s>"))
    writer.add_eos_token_id(tokens.index("</s>"))
    writer.add_eot_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    for tensor_name, data in _tensors(rng, emit).items():
        writer.add_tensor(tensor_name, data, raw_dtype=GGMLQuantizationType.F32)

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _write_if_changed(path: pathlib.Path, *, seed: int, name: str) -> bool:
    """Write the model via a temporary file; return False if ``path`` already held it.

    The temporary file and os.replace keep a reader (say, a llama-server being started by a
    parallel test) from ever seeing a half-written model.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its 0600 mode would survive the rename.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        _write(tmp, seed=seed, name=name)
        if path.is_file() and filecmp.cmp(tmp, path, shallow=False):
            return False
        os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def write_tiny_model(
    path: str | os.PathLike[str], *, seed: int = 0, name: str = "tiny"
) -> pathlib.Path:
    """Write a tiny random llama GGUF to ``path``, deterministically from ``seed``.

    ``name`` is stored as general.name.  An existing identical file is left untouched.
    """
    out = pathlib.Path(path)
    _write_if_changed(out, seed=seed, name=name)
    return out


def _model_name(index: int) -> str:
    """tiny-a, tiny-b, ..., tiny-z, tiny-aa, ... (spreadsheet-column style)."""
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = string.ascii_lowercase[rem] + letters
    return f"tiny-{letters}"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description="Write tiny random llama GGUF models for tests.")
    parser.add_argument(
        "outdir", type=pathlib.Path, help="directory to write tiny-a.gguf, ... into"
    )
    parser.add_argument(
        "--count", type=int, default=3, help="number of models, seeds 0..N-1 (default: 3)"
    )
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.outdir.exists() and not args.outdir.is_dir():
        parser.error(f"{args.outdir} exists and is not a directory")

    for seed in range(args.count):
        name = _model_name(seed)
        path = args.outdir / f"{name}.gguf"
        try:
            written = _write_if_changed(path, seed=seed, name=name)
        except OSError as exc:
            print(
                f"tiny_gguf.py: error: cannot write {path}: {exc.strerror or exc}", file=sys.stderr
            )
            return 1
        if written:
            print(path, flush=True)
        else:
            print(f"unchanged: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
