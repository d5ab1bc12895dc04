"""What a GGUF file says about its model, read from the header only, never the weights.

``gguf.GGUFReader`` maps the file (``numpy.memmap``) and parses the key/value metadata and the
tensor-info table; the tensor data stays unmapped pages that nothing here touches, so reading a
40 GB model costs the header's size, not the file's. Results are cached by path, mtime and size:
a model file replaced on disk is read again.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import msgspec

__all__ = ["GgufInfo", "gguf_info"]

#: Arrays longer than this (the vocabulary, merges) are left out of ``metadata``.
_MAX_ARRAY = 64


class GgufInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The model facts Ollama's ``/api/tags``, ``/api/ps`` and ``/api/show`` report."""

    #: ``general.architecture``, e.g. ``llama``; "" when unknown.
    family: str = ""
    #: ``general.size_label`` (``8B``), else the tensor elements counted, e.g. ``123.4M``.
    parameter_size: str = ""
    parameter_count: int = 0
    #: From ``general.file_type``, e.g. ``Q4_K_M`` or ``F32``; "" when unknown.
    quantization_level: str = ""
    #: ``<arch>.context_length``; None when the file does not say.
    context_length: int | None = None
    #: ``tokenizer.chat_template``; "" when the file has none.
    template: str = ""
    #: Scalar metadata (and short arrays) by key, as Ollama's ``model_info`` lists them.
    metadata: dict[str, Any] = {}


def _human_count(count: int) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def _file_type_name(value: Any) -> str:
    from gguf import LlamaFileType

    try:
        name = LlamaFileType(int(value)).name
    except (ValueError, TypeError):
        return ""
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


@functools.lru_cache(maxsize=64)
def _read(path: str, mtime_ns: int, size: int) -> GgufInfo:
    """One header read; the mtime and size in the key make a changed file a cache miss."""
    # Imported here: numpy and gguf cost a noticeable start-up time, and only /api/* needs them.
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path, "r")
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or not field.types:
            continue
        if field.types[0] == GGUFValueType.ARRAY and len(field.data) > _MAX_ARRAY:
            continue
        metadata[key] = field.contents()
    count = sum(int(tensor.n_elements) for tensor in reader.tensors)
    family = str(metadata.get("general.architecture", ""))
    context = metadata.get(f"{family}.context_length")
    label = metadata.get("general.size_label")
    metadata["general.parameter_count"] = count
    return GgufInfo(
        family=family,
        parameter_size=str(label) if label else _human_count(count),
        parameter_count=count,
        quantization_level=_file_type_name(metadata.get("general.file_type")),
        context_length=int(context) if isinstance(context, int) else None,
        template=str(metadata.get("tokenizer.chat_template", "")),
        metadata={k: v for k, v in metadata.items() if k != "tokenizer.chat_template"},
    )


def gguf_info(path: str) -> GgufInfo | None:
    """The header facts of the GGUF file at ``path``; None when it is missing or not GGUF.

    Blocking (file I/O): call it from a thread in async code.
    """
    try:
        stat = os.stat(path)
        return _read(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
    except (OSError, ValueError, KeyError, IndexError):
        # Not a GGUF file (bad magic, unsupported version) or a truncated one.
        return None
