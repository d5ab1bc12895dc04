"""``just gpu-check`` rehearsed on a fake GPU, so the script a lent GPU runs is known to work.

The script drives a real swapper in multi-active mode with ``scripts/vram_holder.py`` backends
that allocate through the CUDA driver API; here a fake CUDA driver and a fake NVML (both on
``tests/fake_servers``) answer from one fake 80 GiB GPU whose freed memory shows up late.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAKES, ROOT
from tests.fake_servers import fakegpu

pytestmark = pytest.mark.integration


def run_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "scripts/gpu_check.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240, check=False)


def test_gpu_check_shows_eviction_by_budget_and_the_wait_for_freed_memory(tmp_path: Path) -> None:
    gpu = tmp_path / "gpu"
    fakegpu.setup(gpu, total_mb=81920, release_lag=1.0, name="Fake H100 80GB")
    env = {**os.environ, fakegpu.ENV: str(gpu),
           "PYTHONPATH": f"{FAKES / 'cuda'}{os.pathsep}{FAKES / 'nvml'}",
           "XDG_STATE_HOME": str(tmp_path / "state")}
    result = run_check(env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for check in ("a and b resident together", "c resident", "b's process gone",
                  "waited-for-release line in swapper's log", "learned VRAM sizes recorded",
                  "no stray holder processes"):
        assert f"PASS    {check}" in output
    assert "c: waited" in output  # swapper's own log line, printed by the script


def test_gpu_check_says_plainly_when_there_is_no_gpu(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != fakegpu.ENV}
    env["PYTHONPATH"] = str(FAKES / "nvml")  # NVML without a driver
    result = run_check(env)
    assert result.returncode == 1
    assert result.stdout.strip().splitlines()[-1].startswith("no NVIDIA GPU/driver:")
