"""The GPUs a model's own args declare (vLLM's parallel sizes, llama.cpp's device flags), what
swapper adds to vLLM's command line for a split, and a GGUF's size as a size hint."""

from __future__ import annotations

from pathlib import Path

import pytest
from swapper_llamacpp import CONTEXT_MB, SIZE_MARGIN, LlamaCppBackend, LlamaCppModel
from swapper_openai import OpenaiBackend, OpenaiModel
from swapper_vllm import VllmBackend, VllmModel

from swapper.backends.contract import EVERY_GPU, BackendSettings, arg_value


def vllm(args: list[str], gpus: list[int] | None = None) -> VllmBackend:
    backend = VllmBackend(
        "m", VllmModel(backend="vllm", model="org/m", args=args), BackendSettings()
    )
    backend.gpus = gpus
    return backend


@pytest.mark.parametrize(
    ("args", "count"),
    [
        ([], None),
        (["--tensor-parallel-size", "2"], 2),
        (["--tensor-parallel-size=4"], 4),
        (["-tp", "2"], 2),
        (["-tp=2"], 2),
        (["--tensor_parallel_size", "2"], 2),
        (["--pipeline-parallel-size", "2"], 2),
        (["-tp", "2", "-pp", "2"], 4),
        (["--tensor-parallel-size", "2", "--data-parallel-size", "2"], 4),
        (["--dtype", "half"], None),
        (["-tp", "two"], None),  # vLLM refuses that itself
    ],
)
def test_vllm_declares_tensor_x_pipeline_x_data_parallel_gpus(
    args: list[str], count: int | None
) -> None:
    assert vllm(args).gpu_count() == count


@pytest.mark.parametrize(
    "args",
    [
        ["--pipeline-parallel-size", "2"],
        ["-pp", "2"],
        ["--data-parallel-size", "2"],
        ["-dp=2"],
        ["-tp=2"],
        ["--tensor_parallel_size", "2"],
        ["--config", "serve.yaml"],
    ],
)
def test_vllm_gets_no_tensor_parallel_size_when_its_args_choose_the_parallelism(
    args: list[str],
) -> None:
    argv = vllm(args, gpus=[0, 1]).command(8000)
    assert "--tensor-parallel-size" not in argv[: len(argv) - len(args)], argv


def test_a_split_vllm_gets_one_tensor_parallel_rank_per_gpu() -> None:
    argv = vllm(["--dtype", "half"], gpus=[0, 1]).command(8000)
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"


def llamacpp(tmp_path: Path, args: list[str], *, gpu: bool = True) -> LlamaCppBackend:
    model = tmp_path / "m.gguf"
    if not model.exists():
        model.write_bytes(b"\0" * 3 * 2**20)  # 3 MiB
    entry = LlamaCppModel(backend="llamacpp", model_path=str(model), args=args)
    return LlamaCppBackend("m", entry, BackendSettings(gpu_enabled=gpu))


@pytest.mark.parametrize(
    ("args", "count"),
    [
        ([], None),
        (["--tensor-split", "3,1"], 2),
        (["-ts", "1,1,1"], 3),
        (["--device", "CUDA1"], EVERY_GPU),
        (["-dev", "CUDA0,CUDA1"], EVERY_GPU),
        (["--main-gpu", "1"], EVERY_GPU),
        (["-mg", "1", "-ts", "1,1"], EVERY_GPU),
        (["-sm", "none"], None),  # the one GPU it is given is its main GPU
    ],
)
def test_llamacpp_declares_its_device_flags(
    tmp_path: Path, args: list[str], count: int | None
) -> None:
    assert llamacpp(tmp_path, args).gpu_count() == count


def test_llamacpp_hints_its_size_from_the_gguf_file(tmp_path: Path) -> None:
    assert llamacpp(tmp_path, []).size_hint_mb() == pytest.approx(
        3 * (1 + SIZE_MARGIN) + CONTEXT_MB
    )
    assert llamacpp(tmp_path, [], gpu=False).size_hint_mb() is None  # on the CPU: no VRAM


def test_a_remote_backend_uses_no_local_gpu() -> None:
    entry = OpenaiModel(backend="openai", url="http://10.0.0.5:8000")
    assert not OpenaiBackend.uses_local_gpu(entry)
    assert VllmBackend.uses_local_gpu(VllmModel(backend="vllm", model="m"))


def test_arg_value_takes_the_last_of_either_form() -> None:
    args = ["-tp", "2", "--tensor-parallel-size=4", "--x"]
    assert arg_value(args, "-tp", "--tensor-parallel-size") == "4"
    assert arg_value(args, "--x") is None  # no value follows
    assert arg_value(args, "--missing") is None


def test_a_split_gguf_hints_the_size_of_all_its_parts(tmp_path: Path) -> None:
    for part in (1, 2):
        (tmp_path / f"m-{part:05d}-of-00002.gguf").write_bytes(b"\0" * 2**20)
    entry = LlamaCppModel(backend="llamacpp", model_path=str(tmp_path / "m-00001-of-00002.gguf"))
    backend = LlamaCppBackend("m", entry, BackendSettings())
    assert backend.size_hint_mb() == pytest.approx(2 * (1 + SIZE_MARGIN) + CONTEXT_MB)
