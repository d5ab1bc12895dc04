"""``scripts/device_run.sh`` rehearsed here, so the one run a lent GPU gets is known to work.

The script runs as it would on the GPU machine, with a fake CUDA driver and fake NVML on
PYTHONPATH, a fake ``nvidia-smi`` on PATH and a wheel directory holding one small wheel built
here (the real bundle is ``just device-bundle``'s business), and writes what it finds to $OUT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import FAKES, ROOT
from tests.fake_servers import fakegpu

pytestmark = pytest.mark.integration

NVIDIA_SMI = """#!/bin/sh
# A fake nvidia-smi: the table for no arguments, one CSV line for --query-gpu.
case "$*" in
  *--query-gpu*) echo "0, GPU-fake, Fake H100 80GB, Disabled, Disabled" ;;
  *) echo "| NVIDIA-SMI 550.0-fake   Driver Version: 550.0-fake   CUDA Version: 12.4 |" ;;
esac
"""


def probe_wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel: module ``device_run_probe``, so the install step is real."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "device_run_probe-1.0-py3-none-any.whl"
    info = "device_run_probe-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("device_run_probe.py", "VALUE = 42\n")
        wheel.writestr(
            f"{info}/METADATA", "Metadata-Version: 2.1\nName: device-run-probe\nVersion: 1.0\n"
        )
        wheel.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr(f"{info}/RECORD", "")
    return path


def run_device(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/device_run.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )


def base_env(tmp_path: Path) -> dict[str, str]:
    """This interpreter as the machine's python3 (it has swapper's packages), $OUT in tmp."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A wrapper, not a symlink: a symlink outside the venv would start the bare base interpreter.
    wrapper = bin_dir / "python3"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (fakegpu.ENV, "CUDA_VISIBLE_DEVICES", "PYTHONPATH")
    }
    return {
        **env,
        "OUT": str(tmp_path / "out"),
        "SWAPPER_SITE": str(tmp_path / "site"),
        "SWAPPER_WHEELS": str(tmp_path / "wheels"),
        "XDG_STATE_HOME": str(tmp_path / "xdg"),
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
    }


def test_device_run_installs_the_bundle_probes_nvml_and_runs_the_gpu_check(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text(NVIDIA_SMI)
    smi.chmod(0o755)
    probe_wheel(tmp_path / "wheels")
    fakegpu.setup(tmp_path / "gpu", total_mb=81920, release_lag=1.0, name="Fake H100 80GB")
    env.update(
        {
            fakegpu.ENV: str(tmp_path / "gpu"),
            "CUDA_VISIBLE_DEVICES": "0",
            "PYTHONPATH": f"{FAKES / 'cuda'}{os.pathsep}{FAKES / 'nvml'}",
        }
    )
    result = run_device(tmp_path, env)
    out = tmp_path / "out"
    log = (out / "device_run.log").read_text()
    assert result.returncode == 0, log[-8000:]
    assert log == result.stdout  # everything the run printed came back in $OUT
    assert "Driver Version: 550.0-fake" in log
    assert "0, GPU-fake, Fake H100 80GB, Disabled, Disabled" in log  # the MIG query
    assert "CUDA_VISIBLE_DEVICES=0" in log
    assert "installed 1 wheels into" in log
    assert (tmp_path / "site" / "device_run_probe.py").is_file()
    # The built-in backends come from the metadata-only distribution the script wrote.
    site_info = tmp_path / "site" / "swapper-0.1.0.dist-info" / "entry_points.txt"
    assert "llamacpp = swapper_llamacpp" in site_info.read_text()
    assert "llamacpp (swapper 0.1.0 (swapper_llamacpp))" in log
    probe = json.loads((out / "probe.json").read_text())
    assert probe["pid_listed"] is True and probe["holder_pid"] in probe["nvml_pids"]
    # The fake GPU frees a dead process's memory 1 s after NVML first sees it gone.
    assert 0.9 <= probe["free_after_exit_s"] < 20
    assert "all checks passed" in (out / "gpu_check.log").read_text()
    state = json.loads((out / "state.json").read_text())
    assert set(state["models"]) == {"a", "b", "c"}
    assert "device run passed" in log


def test_device_run_says_what_is_missing_on_a_machine_without_gpu_or_bundle(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    env["PYTHONPATH"] = str(FAKES / "nvml")  # NVML without a driver; no nvidia-smi, no wheels
    result = run_device(tmp_path, env)
    log = (tmp_path / "out" / "device_run.log").read_text()
    assert result.returncode == 1, log
    assert "nvidia-smi: not on PATH" in log
    assert "no wheels in" in log and "just device-bundle" in log
    assert "NVML unavailable (NVMLError_LibraryNotFound" in log
    assert "no NVIDIA GPU/driver:" in log
    assert log.rstrip().endswith("device run FAILED: gpu_check")
