"""`just bench`: swapper's added latency and its swap overhead, against a real llama-server.

1. Added latency: the same small non-stream chat, alternately straight to the llama-server
   swapper is running and through swapper, in one run; p50 and p99 of each and the difference.
2. Swap overhead: a request for an unloaded model until its response, minus the same work done
   by hand: exec llama-server, poll /health every millisecond until 200, send the request.
   Also a full swap (another model resident) against stop + start + request by hand.

Usage: python scripts/bench.py --llama-server PATH --models DIR [--requests N] [--swaps N]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def wait_health(client: httpx.Client, url: str, interval: float, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if client.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(interval)
    raise SystemExit(f"{url} not healthy in time")


def start_swapper(llama_server: str, models: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = {
        "swapper": {"model_swap_timeout": 30, "gpu_enabled": False, "default_model": "tiny-a"},
        "server": {"host": "127.0.0.1", "port": port},
        "models": {f"tiny-{n}": {"backend": "llamacpp", "model_path": str(models / f"tiny-{n}.gguf"),
                                 "ctx_size": 512} for n in "ab"},
    }
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "SWAPPER_LLAMA_SERVER": llama_server, "SWAPPER_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "swapper", "serve", "--config", str(path)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client() as client:
        wait_health(client, f"{url}/health", 0.05, time.monotonic() + 30)
        deadline = time.monotonic() + 30
        while client.get(f"{url}/status").json()["models"]["tiny-a"]["status"] != "LOADED":
            if time.monotonic() > deadline:
                raise SystemExit("default model did not load")
            time.sleep(0.05)
    return proc, url


def added_latency(client: httpx.Client, swapper: str, requests: int) -> None:
    port = client.get(f"{swapper}/status").json()["models"]["tiny-a"]["port"]
    direct_url = f"http://127.0.0.1:{port}/v1/chat/completions"
    via_url = f"{swapper}/v1/chat/completions"
    body_direct = CHAT
    body_via = {**CHAT, "model": "tiny-a"}
    for _ in range(50):  # warm both paths and their connection pools
        client.post(direct_url, json=body_direct).raise_for_status()
        client.post(via_url, json=body_via).raise_for_status()
    direct: list[float] = []
    via: list[float] = []
    for _ in range(requests):
        for url, body, sink in ((direct_url, body_direct, direct), (via_url, body_via, via)):
            started = time.perf_counter()
            client.post(url, json=body).raise_for_status()
            sink.append((time.perf_counter() - started) * 1000)
    d50, d99 = percentile(direct, 50), percentile(direct, 99)
    v50, v99 = percentile(via, 50), percentile(via, 99)
    print(f"direct  p50 {d50:6.2f} ms  p99 {d99:6.2f} ms  ({requests} requests)")
    print(f"swapper p50 {v50:6.2f} ms  p99 {v99:6.2f} ms  ({requests} requests)")
    print(f"ADDED LATENCY: p50 {v50 - d50:+.2f} ms, p99 {v99 - d99:+.2f} ms (target p50 <= 1 ms)")


def spawn_llama(llama_server: str, model: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [llama_server, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", "512",
         "-ngl", "0", "--alias", "direct", "--threads-http", "32"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait()


def by_hand(client: httpx.Client, llama_server: str, model: Path,
            resident: subprocess.Popen[bytes] | None = None) -> tuple[float, subprocess.Popen[bytes]]:
    """[Stop the resident server,] exec llama-server, poll /health every ms, send the request."""
    port = free_port()
    started = time.perf_counter()
    if resident is not None:
        stop(resident)
    proc = spawn_llama(llama_server, model, port)
    wait_health(client, f"http://127.0.0.1:{port}/health", 0.001, time.monotonic() + 30)
    client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT).raise_for_status()
    return (time.perf_counter() - started) * 1000, proc


def timed_request(client: httpx.Client, swapper: str, model: str) -> float:
    started = time.perf_counter()
    client.post(f"{swapper}/v1/chat/completions", json={**CHAT, "model": model}).raise_for_status()
    return (time.perf_counter() - started) * 1000


def swap_overhead(client: httpx.Client, swapper: str, llama_server: str, models: Path,
                  swaps: int) -> None:
    direct_cold: list[float] = []
    via_cold: list[float] = []
    direct_swap: list[float] = []
    via_swap: list[float] = []
    model_a, model_b = models / "tiny-a.gguf", models / "tiny-b.gguf"
    for _ in range(swaps):
        # cold load: nothing resident
        elapsed, proc = by_hand(client, llama_server, model_b)
        direct_cold.append(elapsed)
        stop(proc)
        for model in ("tiny-a", "tiny-b"):
            client.post(f"{swapper}/models/{model}/unload").raise_for_status()
        via_cold.append(timed_request(client, swapper, "tiny-b"))

        # full swap: a resident, b requested
        port = free_port()
        resident = spawn_llama(llama_server, model_a, port)
        wait_health(client, f"http://127.0.0.1:{port}/health", 0.005, time.monotonic() + 30)
        elapsed, proc = by_hand(client, llama_server, model_b, resident)
        direct_swap.append(elapsed)
        stop(proc)
        client.post(f"{swapper}/models/tiny-a/load").raise_for_status()
        via_swap.append(timed_request(client, swapper, "tiny-b"))
    dc, vc = statistics.median(direct_cold), statistics.median(via_cold)
    ds, vs = statistics.median(direct_swap), statistics.median(via_swap)
    print(f"cold load by hand {dc:6.1f} ms   through swapper {vc:6.1f} ms  (median of {swaps})")
    print(f"full swap by hand {ds:6.1f} ms   through swapper {vs:6.1f} ms  (median of {swaps})")
    print(f"SWAP OVERHEAD: {vc - dc:+.1f} ms cold load, {vs - ds:+.1f} ms full swap (target <= 50 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--swaps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_swapper(args.llama_server, args.models.resolve(), Path(tmp))
        try:
            with httpx.Client(timeout=30) as client:
                added_latency(client, url, args.requests)
                swap_overhead(client, url, args.llama_server, args.models.resolve(), args.swaps)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
