"""``just gpu-check`` rehearsed on a fake GPU, so the script a lent GPU runs is known to work.

The script drives a real swapper in multi-active mode with ``scripts/vram_holder.py`` backends
that allocate through the CUDA driver API; here a fake CUDA driver and a fake NVML (both on
``tests/fake_servers``) answer from one fake 80 GiB GPU whose freed memory shows up late.
The fake NVML's knobs stand in for what a real machine may do to the script: host PIDs seen
from a container, an idle GPU first in NVML's order under ``CUDA_VISIBLE_DEVICES``, MIG mode.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAKES, ROOT
from tests.fake_servers import fakegpu

pytestmark = pytest.mark.integration

ALWAYS_PASS = (
    "a and b resident together",
    "b evicted (least recently used) to fit c, a kept",
    "c resident",
    "b's process gone",
    "c started only after b's memory showed free (NVML timeline)",
    "no stray holder processes",
    "NVML used memory back near baseline",
)


def fake_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment with the fake CUDA and NVML on PYTHONPATH and a fake 80 GiB GPU."""
    gpu = tmp_path / "gpu"
    fakegpu.setup(gpu, total_mb=81920, release_lag=1.0, name="Fake H100 80GB")
    return {
        **os.environ,
        fakegpu.ENV: str(gpu),
        "PYTHONPATH": f"{FAKES / 'cuda'}{os.pathsep}{FAKES / 'nvml'}",
        "XDG_STATE_HOME": str(tmp_path / "state"),
        **extra,
    }


def run_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/gpu_check.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_gpu_check_shows_eviction_by_budget_and_the_wait_for_freed_memory(tmp_path: Path) -> None:
    result = run_check(fake_env(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for check in (*ALWAYS_PASS, "learned VRAM sizes recorded"):
        assert f"PASS    {check}" in output
    # The learned sizes are the measured ones (context included), not the configured 32768.
    assert '/status vram.learned_mb {"a": 33280.0, "b": 33280.0, "c": 33280.0}' in output


def test_gpu_check_follows_cuda_device_0_by_uuid_and_host_pids(tmp_path: Path) -> None:
    # NVML lists an idle GPU first and gives host PIDs; CUDA's device 0 is NVML's index 1.
    env = fake_env(
        tmp_path, FAKE_NVML_OTHER_GPUS="1", CUDA_VISIBLE_DEVICES="1", FAKE_NVML_PID_OFFSET="100000"
    )
    result = run_check(env)
    output = result.stdout + result.stderr
    uuid = fakegpu.default_uuid("Fake H100 80GB")
    assert f"CUDA device 0 is NVML index 1 ({uuid})" in output, output[-6000:]
    for check in ALWAYS_PASS:
        assert f"PASS    {check}" in output, output[-6000:]
    # Until the lifecycle measures by the change in used memory where NVML's pids are not ours,
    # nothing is learned in a container without `pid: host`: the check says so.
    assert "learned VRAM sizes recorded" in output


def test_gpu_check_refuses_a_gpu_in_mig_mode(tmp_path: Path) -> None:
    result = run_check(fake_env(tmp_path, FAKE_NVML_MIG="1"))
    assert result.returncode == 1
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("refused: MIG is enabled on NVML GPU 0"), result.stdout[-2000:]
    assert not fakegpu.snapshot(tmp_path / "gpu").processes  # nothing was started


def test_gpu_check_says_plainly_when_there_is_no_gpu(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != fakegpu.ENV}
    env["PYTHONPATH"] = str(FAKES / "nvml")  # NVML without a driver
    result = run_check(env)
    assert result.returncode == 1
    assert result.stdout.strip().splitlines()[-1].startswith("no NVIDIA GPU/driver:")


_MONITOR = """
import json, logging, os, sys
sys.path.insert(0, sys.argv[1])
import fakegpu
from swapper.gpu import GpuMonitor
logging.basicConfig(level=logging.WARNING, format="%(message)s")
fakegpu.hold(1234)
monitor = GpuMonitor()
print(json.dumps([monitor.process_memory_mb(os.getpid()), monitor.process_memory_mb(os.getpid()),
                  monitor.used_mb()]))
"""


@pytest.mark.parametrize("offset", ["0", "100000"])
def test_process_memory_is_unknown_when_nvml_lists_only_foreign_pids(
    tmp_path: Path, offset: str
) -> None:
    env = fake_env(tmp_path, PYTHONPATH=str(FAKES / "nvml"), FAKE_NVML_PID_OFFSET=offset)
    result = subprocess.run(
        [sys.executable, "-c", _MONITOR, str(FAKES)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    first, second, used = json.loads(result.stdout)
    assert used == 1234.0  # the fallback: the device's used memory, whoever holds it
    warning = "NVML reports no process of ours: in a container without `pid: host`?"
    if offset == "0":
        assert first == second == 1234.0
        assert warning not in result.stderr
    else:
        assert first is None and second is None
        assert result.stderr.count(warning) == 1, result.stderr  # said once, not per call


_SIGNATURES = """
import ctypes, sys
sys.path.insert(0, "scripts")
import vram_holder
cuda = vram_holder.Cuda.load()
cuda.open_device(0)  # the holder's own declarations pass
lib = ctypes.CDLL("libcuda.so.1")
for declare, call in [
        (None, lambda: lib.cuInit(0)),  # nothing declared
        ([ctypes.POINTER(ctypes.c_uint32), ctypes.c_size_t],  # CUdeviceptr is 64 bits
         lambda: lib.cuMemAlloc_v2(ctypes.byref(ctypes.c_uint32()), 16)),
        ([ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t],  # declared right, called wrong
         lambda: lib.cuMemAlloc_v2(ctypes.byref(ctypes.c_uint32()), 16))]:
    if declare is not None:
        lib.cuMemAlloc_v2.argtypes = declare
    try:
        call()
    except (TypeError, ctypes.ArgumentError) as exc:
        print("refused:", exc)
    else:
        print("accepted")
"""


def test_fake_cuda_refuses_calls_not_declared_as_the_driver_api(tmp_path: Path) -> None:
    env = fake_env(tmp_path, PYTHONPATH=str(FAKES / "cuda"))
    result = subprocess.run(
        [sys.executable, "-c", _SIGNATURES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("refused: fake CUDA: ") for line in lines), (
        result.stdout
    )
    assert "cuInit called with argtypes None" in lines[0]


def _gpu_check_module() -> object:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_release_order_is_judged_on_nvmls_timeline_not_on_pids() -> None:
    check = _gpu_check_module()
    memory = check.Memory  # type: ignore[attr-defined]

    def sample(t: float, used: float, procs: dict[int, float]) -> tuple[float, object, dict]:
        return (t, memory(80000, used, 80000 - used), procs)

    # Host pids (none of them ours): a=901, b=902 leaves, c=903 comes.
    before = [
        sample(0.0, 66000, {901: 33000, 902: 33000}),
        sample(0.5, 66000, {901: 33000}),
    ]  # b left the list, its memory not yet free
    patient = [
        *before,
        sample(1.5, 33000, {901: 33000}),
        sample(1.6, 66000, {901: 33000, 903: 33000}),
    ]
    hasty = [
        *before,
        sample(0.6, 66512, {901: 33000, 903: 512}),
        sample(1.5, 66000, {901: 33000, 903: 33000}),
    ]
    ok, why = check.started_after_release(patient, 33000)  # type: ignore[attr-defined]
    assert ok, why
    assert "freed 1.00s after it left the list" in why
    ok, why = check.started_after_release(hasty, 33000)  # type: ignore[attr-defined]
    assert not ok
    assert "a new process (pid 903) appeared at t=+0.60s, before 33000 MiB of pid 902" in why
    ok, why = check.started_after_release([sample(0.0, 66000, {})], 33000)  # type: ignore[attr-defined]
    assert not ok and "NVML lists no compute process" in why


def test_gpu_check_places_two_models_on_two_gpus_when_there_are_two(tmp_path: Path) -> None:
    gpu = tmp_path / "gpu"
    env = fake_env(tmp_path)
    fakegpu.setup(gpu, total_mb=81920, release_lag=1.0, name="Fake H100 80GB", devices=2)
    result = run_check(env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for check in (*ALWAYS_PASS, "two models on two GPUs, NVML shows memory on each"):
        assert f"PASS    {check}" in output
    assert "GPUs that grew by about a holder's share: [0, 1]" in output
