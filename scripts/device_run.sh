#!/usr/bin/env bash
# The whole check on a lent GPU machine, in one go: its step timeouts add up to 8 minutes; it installs nothing from
# a registry. Run from the repository root after `just device-bundle` has filled .whl/ here:
#
#   scripts/device_run.sh            logs and the state file go under $OUT (else a temp dir)
#
# Steps, each bounded by `timeout` and each saying plainly what it could not do:
#   1. the machine: nvidia-smi, MIG mode, CUDA_VISIBLE_DEVICES, python3;
#   2. the packages the image lacks, from .whl/ into $SWAPPER_SITE (pip --no-index --no-deps
#      --target), and swapper from the working tree on PYTHONPATH, its built-in backends made
#      visible through a metadata-only `swapper` distribution holding pyproject's entry points;
#   3. probe: does a holder's PID appear in NVML's process list (not inside a container without
#      `pid: host`), and how long after it exits does NVML show its memory free;
#   4. scripts/gpu_check.py, and a copy of its state file and swapper logs.
# Exit status: 0 when every step passed, 1 otherwise. Knobs: SWAPPER_WHEELS (.whl),
# SWAPPER_SITE (/tmp/site), DEVICE_RUN_PYTHON (python3).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
OUT=${OUT:-$(mktemp -d -t swapper-device-run.XXXXXX)}
mkdir -p "$OUT"
WHEELS=${SWAPPER_WHEELS:-$REPO/.whl}
SITE=${SWAPPER_SITE:-/tmp/site}
PY=${DEVICE_RUN_PYTHON:-python3}
LOG=$OUT/device_run.log
START=$(date +%s)
FAILED=()

step() { printf '\n=== [%s +%ss] %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - START ))" "$*"; }
fail() { echo "FAIL ($1): $2"; FAILED+=("$1"); }

main() {
step "1. the machine"
echo "OUT=$OUT"
echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>}"
echo "NVIDIA_VISIBLE_DEVICES=${NVIDIA_VISIBLE_DEVICES-<unset>}"
if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi || fail "nvidia-smi" "nvidia-smi exited $?"
    echo "MIG mode (current, pending) per GPU:"
    timeout 20 nvidia-smi --query-gpu=index,uuid,name,mig.mode.current,mig.mode.pending \
        --format=csv,noheader || echo "nvidia-smi cannot tell the MIG mode"
else
    echo "nvidia-smi: not on PATH (no NVIDIA driver tools here)"
fi
if ! command -v "$PY" >/dev/null; then
    fail "python" "$PY not found: nothing more can run"
    return 1
fi
"$PY" -c 'import sys; print("python", sys.version.split()[0], sys.executable)'

step "2. packages: wheels from $WHEELS into $SITE, swapper from the working tree"
mkdir -p "$SITE"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
shopt -u nullglob
if (( ${#wheels[@]} == 0 )); then
    echo "no wheels in $WHEELS: run \`just device-bundle\` on the development machine first;" \
         "going on with what $PY already has"
elif ! PIP_ROOT_USER_ACTION=ignore timeout 90 "$PY" -m pip install --quiet --disable-pip-version-check --no-index \
        --no-deps --upgrade --target "$SITE" "${wheels[@]}"; then
    fail "wheels" "pip could not install the ${#wheels[@]} wheels of $WHEELS"
else
    echo "installed ${#wheels[@]} wheels into $SITE"
fi
# A metadata-only distribution named swapper: importlib.metadata finds the built-in backends'
# entry points in it without building or pip-installing the repository (no setuptools needed).
# First on the path, it is the `swapper` distribution that counts.
timeout 20 "$PY" - "$REPO/pyproject.toml" "$SITE" <<'PY' || fail "entry points" "could not write swapper's entry points"
import sys, tomllib
from pathlib import Path
project = tomllib.loads(Path(sys.argv[1]).read_text())["project"]
info = Path(sys.argv[2]) / f"swapper-{project['version']}.dist-info"
info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: swapper\nVersion: {project['version']}\n")
lines = []
for group, entries in project.get("entry-points", {}).items():
    lines.append(f"[{group}]")
    lines += [f"{name} = {value}" for name, value in entries.items()]
(info / "entry_points.txt").write_text("\n".join(lines) + "\n")
print(f"wrote {info}")
PY
export PYTHONPATH="$SITE:$REPO:$REPO/plugins${PYTHONPATH:+:$PYTHONPATH}"
echo "PYTHONPATH=$PYTHONPATH"
SWAPPER_OK=1
if ! timeout 40 "$PY" - <<'PY'; then
import importlib
missing = []
for name in ("litestar", "msgspec", "uvicorn", "yaml", "prometheus_client", "httpx", "httpcore",
             "pluggy", "pynvml", "swapper"):
    try:
        module = importlib.import_module(name)
        print(f"  {name:18} {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}")
    except Exception as exc:  # any import failure is reported, not raised
        missing.append(name)
        print(f"  {name:18} MISSING: {type(exc).__name__}: {exc}")
if not missing:
    from swapper.backends.registry import load_backends
    registry = load_backends()
    print("backends:", ", ".join(f"{n} ({registry.sources[n]})" for n in sorted(registry.backends)))
    if registry.failures:
        print("backend failures:", registry.failures)
        missing.append("backends")
    elif not {"llamacpp", "ollama", "vllm"} <= set(registry.backends):
        print("built-in backends missing: the entry points were not found")
        missing.append("backends")
raise SystemExit(1 if missing else 0)
PY
    SWAPPER_OK=0
    fail "imports" "swapper or a package it needs does not import (see above)"
fi

step "3. probe: a holder's PID in NVML's list, and how fast its memory shows free"
timeout 60 "$PY" - "$REPO/scripts/vram_holder.py" "$OUT/probe.json" <<'PY'
import json, os, subprocess, sys, time
holder, report = sys.argv[1], sys.argv[2]
try:
    import pynvml
    pynvml.nvmlInit()
except Exception as exc:
    print(f"NVML unavailable ({type(exc).__name__}: {exc}): no probe")
    raise SystemExit(2)
count = pynvml.nvmlDeviceGetCount()
handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
def used() -> float:
    return sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in handles) / 2**20
def pids() -> dict[int, float]:
    out = {}
    for h in handles:
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            out[p.pid] = (p.usedGpuMemory or 0) / 2**20
    return out
before = used()
proc = subprocess.Popen([sys.executable, holder, "serve", "probe", "--port", "0",
                         "--gpu-memory-utilization", "0.05"],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
result = {"holder_pid": proc.pid, "used_before_mb": round(before)}
for line in proc.stdout:
    print("  holder:", line.rstrip())
    if "serving" in line or "holding" in line and "chunks" in line:
        break
if proc.poll() is not None:
    print(f"the holder exited with {proc.returncode} before holding memory: no probe")
    raise SystemExit(1)
listed = pids()
held = used() - before
result.update(nvml_pids=sorted(listed), held_mb=round(held), pid_listed=proc.pid in listed)
if proc.pid in listed:
    print(f"holder pid {proc.pid} IS in NVML's process list ({listed[proc.pid]:.0f} MiB): "
          "per-process measurement works here")
else:
    print(f"holder pid {proc.pid} is NOT in NVML's process list {sorted(listed)}: NVML gives "
          "host PIDs (a container without `pid: host`?); swapper must measure by the change "
          f"in used memory (here +{held:.0f} MiB)")
proc.terminate()
proc.wait(20)
exited = time.monotonic()
while used() > before + 0.25 * held and time.monotonic() - exited < 20:
    time.sleep(0.02)
lag = time.monotonic() - exited
result["free_after_exit_s"] = round(lag, 3)
print(f"NVML showed the memory free {lag:.3f}s after the holder exited"
      + (" (gave up at 20 s)" if lag >= 20 else ""))
with open(report, "w") as f:
    json.dump(result, f, indent=2)
PY
case $? in
    0) ;;
    2) echo "probe skipped: no NVML" ;;
    *) fail "probe" "the holder probe did not complete" ;;
esac

step "4. scripts/gpu_check.py"
if (( SWAPPER_OK )); then
    timeout 230 "$PY" scripts/gpu_check.py --keep --time-limit 200 > "$OUT/gpu_check.log" 2>&1
    status=$?
    cat "$OUT/gpu_check.log"
    (( status == 0 )) || fail "gpu_check" "gpu_check.py exited $status"
    workdir=$(sed -n 's/^work directory kept: //p' "$OUT/gpu_check.log" | tail -1)
    if [[ -n $workdir && -f $workdir/state.json ]]; then
        cp "$workdir/state.json" "$OUT/state.json"
        cp "$workdir"/swapper-*.log "$OUT/" 2>/dev/null
        echo "copied the state file and swapper's logs to $OUT"
    else
        echo "no state file to copy (work directory: ${workdir:-none})"
    fi
else
    echo "skipped: swapper cannot be imported (step 2)"
fi

step "done in $(( $(date +%s) - START ))s"
if (( ${#FAILED[@]} )); then
    echo "device run FAILED: ${FAILED[*]}"
    return 1
fi
echo "device run passed"
}

# Everything also lands in $OUT/device_run.log; the pipeline ends only once tee has written it.
main 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
