"""Several GPUs through a real swapper: a fake GPU of two 16 GiB devices, read through the fake
``pynvml``, and fake ``vllm serve``, ``ollama serve``, a ``command`` backend and a real
llama-server, each started with the ``CUDA_VISIBLE_DEVICES`` of the GPUs placement chose.

The fake servers hold their memory on the devices that variable names, so the fake NVML shows
each model's memory on its own GPU(s).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAKES, SwapperProcess, wait_until
from tests.fake_servers import fakegpu

pytestmark = pytest.mark.integration

VLLM = str(FAKES / "vllm")
OLLAMA = str(FAKES / "ollama")
GPU_MB = 16384


@pytest.fixture
def gpu_dir(tmp_path: Path) -> Path:
    """A fake GPU of two 16 GiB devices whose freed memory shows at once."""
    directory = tmp_path / "gpu"
    fakegpu.setup(directory, total_mb=GPU_MB, release_lag=0.0, devices=2)
    return directory


@pytest.fixture
def start(tmp_path: Path, gpu_dir: Path) -> Iterator[Callable[..., SwapperProcess]]:
    """Start a multi-active swapper (3 slots, no reserve) over the two-device fake GPU."""
    started: list[SwapperProcess] = []

    def run(models: dict[str, Any], **swapper: Any) -> SwapperProcess:
        workdir = tmp_path / f"run{len(started)}"
        workdir.mkdir()
        config = {
            "swapper": {
                "mode": "multi-active",
                "max_concurrent_models": 3,
                "vram_reserve_mb": 0,
                "model_swap_timeout": 30,
                "stop_timeout": 5,
                "shutdown_timeout": 5,
                **swapper,
            },
            "server": {"host": "127.0.0.1", "port": 1},
            "models": models,
        }
        env = {
            fakegpu.ENV: str(gpu_dir),
            "PYTHONPATH": str(FAKES / "nvml"),
            "FAKE_VLLM_LOAD_SECONDS": "0.2",
        }
        llama = str(Path(sys.prefix) / "no-llama-server")  # replaced by an entry's binary
        started.append(SwapperProcess(config, workdir, llama, env))
        return started[-1]

    yield run
    for process in started:
        process.stop()


def load(swapper: SwapperProcess, model: str) -> dict[str, Any]:
    """Load ``model`` as an operator would; its status once LOADED."""
    response = swapper.http.post(f"/models/{model}/load", timeout=60)
    assert response.status_code == 200, response.text
    return swapper.wait_status(model, "LOADED")


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (item.decode().partition("=") for item in raw if item)
    return {name: value for name, _, value in pairs}


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def device_used(gpu_dir: Path) -> list[float]:
    return [d.used_mb for d in fakegpu.devices(gpu_dir)]


def vllm(util: float, **entry: Any) -> dict[str, Any]:
    return {
        "backend": "vllm",
        "model": "org/model",
        "binary": VLLM,
        "gpu_memory_utilization": util,
        **entry,
    }


def test_auto_puts_two_vllms_on_two_gpus_instead_of_evicting(
    start: Callable[..., SwapperProcess], gpu_dir: Path
) -> None:
    # 0.6 of a GPU each: on one GPU the second would evict the first; here each gets its own.
    swapper = start({"a": vllm(0.6), "b": vllm(0.6)})
    a = load(swapper, "a")
    b = load(swapper, "b")
    assert swapper.model("a")["status"] == "LOADED"
    assert environ(a["pid"])["CUDA_VISIBLE_DEVICES"] == "0"
    assert environ(b["pid"])["CUDA_VISIBLE_DEVICES"] == "1"
    assert environ(b["pid"])["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert device_used(gpu_dir) == [0.6 * GPU_MB, 0.6 * GPU_MB]


def test_a_split_vllm_gets_both_gpus_and_tensor_parallel_size_2(
    start: Callable[..., SwapperProcess], gpu_dir: Path
) -> None:
    swapper = start({"big": vllm(0.5, gpus=[0, 1])})
    big = load(swapper, "big")
    assert environ(big["pid"])["CUDA_VISIBLE_DEVICES"] == "0,1"
    argv = cmdline(big["pid"])
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    # One rank on each GPU, each reserving half of its GPU.
    assert device_used(gpu_dir) == [0.5 * GPU_MB, 0.5 * GPU_MB]
    answer = swapper.http.post(
        "/v1/chat/completions",
        json={"model": "big", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert answer.status_code == 200, answer.text


def test_the_entrys_own_tensor_parallel_size_is_kept(
    start: Callable[..., SwapperProcess],
) -> None:
    swapper = start({"big": vllm(0.5, gpus=[0, 1], args=["--tensor-parallel-size", "1"])})
    big = load(swapper, "big")
    argv = cmdline(big["pid"])
    assert argv.count("--tensor-parallel-size") == 1
    assert argv[argv.index("--tensor-parallel-size") + 1] == "1"


def test_per_gpu_eviction_through_swapper_keeps_the_other_gpus_model(
    start: Callable[..., SwapperProcess], gpu_dir: Path
) -> None:
    swapper = start({"a": vllm(0.6, gpus=[0]), "b": vllm(0.6, gpus=[1]), "c": vllm(0.6, gpus=[0])})
    b = load(swapper, "b")  # the least recently used, but on GPU 1
    load(swapper, "a")
    load(swapper, "c")
    assert swapper.model("a")["status"] == "UNLOADED"
    assert swapper.model("b")["status"] == "LOADED" and swapper.model("b")["pid"] == b["pid"]
    assert device_used(gpu_dir) == [0.6 * GPU_MB, 0.6 * GPU_MB]


def test_command_ollama_and_llamacpp_backends_get_their_gpus(
    start: Callable[..., SwapperProcess],
    gpu_dir: Path,
    llama_server: str,
    tiny_models: dict[str, Path],
) -> None:
    swapper = start(
        {
            "cmd": {
                "backend": "command",
                "command": [VLLM, "serve", "m", "--host", "127.0.0.1", "--port", "${PORT}"],
                "gpus": [1],
            },
            "olla": {
                "backend": "ollama",
                "model": "qwen3:8b",
                "serve": True,
                "binary": OLLAMA,
                "vram_mb": 5200,
                "gpus": [0],
            },
            "tiny": {
                "backend": "llamacpp",
                "model_path": str(tiny_models["a"]),
                "binary": llama_server,
                "ctx_size": 256,
                "vram_mb": 100,
                "gpus": [1],
            },
        },
        gpu_enabled=False,
    )
    cmd = load(swapper, "cmd")
    assert environ(cmd["pid"])["CUDA_VISIBLE_DEVICES"] == "1"
    # The fake vLLM holds 0.9 of the GPU its CUDA_VISIBLE_DEVICES names: GPU 1.
    assert device_used(gpu_dir) == [0, 0.9 * GPU_MB]
    olla = load(swapper, "olla")
    assert environ(olla["pid"])["CUDA_VISIBLE_DEVICES"] == "0"
    wait_until(lambda: device_used(gpu_dir)[0] == 5200, 10, "ollama's model on GPU 0")
    tiny = load(swapper, "tiny")
    assert environ(tiny["pid"])["CUDA_VISIBLE_DEVICES"] == "1"
    assert swapper.model("cmd")["status"] == "LOADED"  # 100 MiB more fit beside it on GPU 1


def test_status_shows_each_gpus_budget_commitments_and_models(
    start: Callable[..., SwapperProcess],
) -> None:
    swapper = start(
        {
            "a": vllm(0.5, vram_mb=8192),
            "b": vllm(0.25, vram_mb=4096),
            "big": vllm(0.25, gpus=[0, 1]),
        }
    )
    load(swapper, "a")  # GPU 0
    load(swapper, "b")  # GPU 1: more free budget
    load(swapper, "big")  # 0.25 of each GPU: 4096 MiB on each
    status = swapper.status()
    assert {m: status["models"][m]["gpus"] for m in ("a", "b", "big")} == {
        "a": [0],
        "b": [1],
        "big": [0, 1],
    }
    gpus = [
        (g["index"], g["budget_mb"], g["committed_mb"], g["models"], g["total_mb"])
        for g in status["vram"]["gpus"]
    ]
    assert gpus == [
        (0, GPU_MB, 8192 + 4096, ["a", "big"], GPU_MB),
        (1, GPU_MB, 4096 + 4096, ["b", "big"], GPU_MB),
    ]


@pytest.mark.parametrize(
    "args", [["--tensor-parallel-size", "2"], ["-tp=2"], ["--pipeline-parallel-size", "2"]]
)
def test_auto_gives_a_vllm_the_gpus_its_parallel_args_ask_for(
    start: Callable[..., SwapperProcess], gpu_dir: Path, args: list[str]
) -> None:
    # On one GPU it would fail: "World size (2) is larger than the number of available GPUs".
    swapper = start({"tp": vllm(0.5, args=args)})
    tp = load(swapper, "tp")
    assert environ(tp["pid"])["CUDA_VISIBLE_DEVICES"] == "0,1"
    argv = cmdline(tp["pid"])
    assert argv.count("--tensor-parallel-size") == args.count("--tensor-parallel-size")
    assert device_used(gpu_dir) == [0.5 * GPU_MB, 0.5 * GPU_MB]
    assert swapper.status()["models"]["tp"]["gpus"] == [0, 1]


@pytest.mark.parametrize(("setting", "used"), [("-1", [0, 0]), ("", [0, 0]), ("1", [0, 3000])])
def test_a_fake_process_told_to_see_no_gpu_holds_nothing(
    gpu_dir: Path, setting: str, used: list[float]
) -> None:
    # As CUDA: CUDA_VISIBLE_DEVICES=-1 (or empty) shows no device, so nothing can be held.
    code = (
        "import sys; from tests.fake_servers import fakegpu; fakegpu.hold(3000); "
        "print('held', flush=True); sys.stdin.read()"
    )
    env = {**os.environ, fakegpu.ENV: str(gpu_dir), "CUDA_VISIBLE_DEVICES": setting}
    root = Path(__file__).resolve().parent.parent
    with subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        cwd=root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "held\n"
        assert device_used(gpu_dir) == used
        child.stdin.close()
