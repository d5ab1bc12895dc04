"""A backend's output: kept within bounds, out of swapper's log unless at DEBUG, secrets masked."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from swapper.backends.output import MAX_LINE
from swapper.backends.process import ManagedProcess
from swapper.scheduling.logbook import ModelLog
from tests.conftest import chat, tiny_model, wait_until

#: Prints ``count`` short numbered lines as fast as it can, then a last line, then exits.
FLOOD = """
import sys
count = int(sys.argv[1])
block = "".join(f"line {i}\\n" for i in range(1000)).encode()
for _ in range(count // 1000):
    sys.stdout.buffer.write(block)
sys.stdout.buffer.write(b"the last words\\n")
"""


def test_the_ring_buffer_is_bounded_in_bytes_as_well_as_lines() -> None:
    log = ModelLog(size=1000, max_bytes=100_000, max_line=8192)
    for _ in range(500):
        log.append("x" * 50_000)
    assert log.held <= 100_000 and sum(map(len, log.lines)) == log.held
    assert all(len(line) < 8300 for line in log.lines) and log.lines[-1].endswith("cut)")
    for number in range(2000):
        log.append(f"short {number}")
    assert len(log.lines) == 1000 and log.tail(1) == ["short 1999"]


@pytest.mark.anyio
async def test_a_flood_is_counted_not_kept_and_the_last_lines_survive() -> None:
    kept: list[str] = []
    process = await ManagedProcess.spawn(
        [sys.executable, "-c", FLOOD, "400000"], name="flood", on_line=kept.append
    )
    assert await process.wait() == 0
    assert "the last words" in process.output_tail(3)
    assert kept[-1] == "the last words"
    assert kept[0] == "line 0"
    # 400,000 lines in well under the time the rate allows them: most were only counted.
    assert len(kept) < 100_000
    shown = [line for line in kept if line.startswith("... ") and line.endswith("lines not shown")]
    assert shown
    hidden = sum(int(line.split()[1].replace(",", "")) for line in shown)
    assert len(kept) - len(shown) + hidden == 400_001


#: Prints 40 lines one write at a time, 2 ms apart, as llama-server prints its lines a request.
TRICKLE = """
import sys, time
for i in range(40):
    sys.stdout.write(f"line {i}\\n")
    sys.stdout.flush()
    time.sleep(0.002)
"""


async def _reads_for_a_trickle(gather: bool) -> int:
    kept: list[str] = []
    process = await ManagedProcess.spawn(
        [sys.executable, "-c", TRICKLE], name="trickle", on_line=kept.append
    )
    process.gather_output(gather)  # (before the child's interpreter has printed anything)
    assert await process.wait() == 0
    assert kept == [f"line {i}" for i in range(40)]  # every line, in order, either way
    return process.output_reads


@pytest.mark.anyio
async def test_a_ready_backends_lines_gather_into_few_reads() -> None:
    """Once ready, lines printed one by one are read a bunch at a time: fewer event-loop
    wakeups than when each is read as it comes (as while a backend starts)."""
    one_by_one = await _reads_for_a_trickle(gather=False)
    gathered = await _reads_for_a_trickle(gather=True)
    print(f"reads: {one_by_one} one by one, {gathered} gathered")
    assert gathered * 2 < one_by_one, (gathered, one_by_one)


@pytest.mark.anyio
async def test_a_line_without_end_is_cut_not_held_whole() -> None:
    kept: list[str] = []
    script = "import sys; sys.stdout.write('y' * 3_000_000 + '\\nafter\\n')"
    process = await ManagedProcess.spawn(
        [sys.executable, "-c", script], name="long", on_line=kept.append
    )
    await process.wait()
    assert kept[-1] == "after"
    assert len(kept[0]) < MAX_LINE + 100 and kept[0].endswith("bytes cut)")


@pytest.mark.anyio
async def test_backend_lines_reach_swappers_log_at_debug_only_with_secrets_masked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("test.backend")
    script = "import sys; print('started with', *sys.argv[1:])"
    argv = [sys.executable, "-c", script, "--api-key", "sk-backend-1234", "--token=tok-5678"]
    for level in (logging.INFO, logging.DEBUG):
        caplog.clear()
        with caplog.at_level(level, logger="test.backend"):
            kept: list[str] = []
            process = await ManagedProcess.spawn(
                argv, name="m", logger=logger, on_line=kept.append, secrets=["started"]
            )
            await process.wait()
        assert kept == ["*** with --api-key *** --token=***"]
        assert process.output_tail() == kept[0]
        logged = [record.getMessage() for record in caplog.records]
        assert logged == ([] if level == logging.INFO else [f"[m] {kept[0]}"])


WRAPPER_THAT_ECHOES = """#!/bin/bash
echo "wrapper started with: $*"
exit 3
"""


@pytest.mark.integration
def test_a_backend_echoing_its_api_key_keeps_it_out_of_swappers_log(
    swapper_factory: Any,
    tmp_path: Path,
) -> None:
    wrapper = tmp_path / "echoing-backend"
    wrapper.write_text(WRAPPER_THAT_ECHOES)
    wrapper.chmod(0o755)
    key = "sk-backend-key-0123456789"
    swapper = swapper_factory(
        models={
            "tiny-a": tiny_model(
                swapper_factory.workdir, binary=str(wrapper), args=["--api-key", key]
            )
        },
        env={"SWAPPER_LOG_LEVEL": "DEBUG"},
    )
    assert chat(swapper, "tiny-a").status_code == 503
    log = swapper.output()
    # The line is in the log twice (at DEBUG, and in the load failure's last lines): masked.
    assert log.count("wrapper started with:") >= 2 and "--api-key ***" in log
    assert key not in log
    assert key not in swapper.model("tiny-a")["last_error"]


PROMPT_MARKER = "zebra-marker-4711"
SWAPPER_KEY = "sk-swapper-client-key-98765"
BACKEND_KEY = "sk-backend-key-0123456789"

#: A backend as verbose as can be: it prints its command line, and each request's headers and
#: body. It serves llama-server's ``/health`` and a fixed chat completion on ``--port``.
VERBOSE_BACKEND = """#!{python}
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
print("started with:", *sys.argv[1:], flush=True)
REPLY = json.dumps({{"id": "x", "object": "chat.completion", "created": 1, "model": "tiny-a",
    "choices": [{{"index": 0, "finish_reason": "stop",
                  "message": {{"role": "assistant", "content": "ok"}}}}]}}).encode()
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
        self.wfile.write(b"{{}}")
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        print("request headers:", dict(self.headers), "body:", body, flush=True)
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(REPLY))); self.end_headers()
        self.wfile.write(REPLY)
    def log_message(self, *args):
        print("access:", *args, flush=True)
port = int(sys.argv[sys.argv.index("--port") + 1])
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.mark.integration
def test_prompts_and_keys_a_verbose_backend_prints_stay_out_of_swappers_log(
    swapper_factory: Any,
    tmp_path: Path,
) -> None:
    backend = tmp_path / "verbose-backend"
    backend.write_text(VERBOSE_BACKEND.format(python=sys.executable))
    backend.chmod(0o755)
    swapper = swapper_factory(
        models={
            "tiny-a": tiny_model(
                swapper_factory.workdir, binary=str(backend), args=["--api-key", BACKEND_KEY]
            )
        },
        server={"api_keys": [SWAPPER_KEY]},
    )
    headers = {"Authorization": f"Bearer {SWAPPER_KEY}"}
    response = swapper.http.post(
        "/v1/chat/completions",
        headers=headers,
        json={
            "model": "tiny-a",
            "max_tokens": 2,
            "messages": [{"role": "user", "content": PROMPT_MARKER}],
        },
    )
    assert response.status_code == 200

    def backend_lines() -> list[str]:
        reply = swapper.http.get("/models/tiny-a/logs", params={"lines": 1000}, headers=headers)
        return reply.json()["lines"]  # type: ignore[no-any-return]

    # The backend did print the prompt (the admin-only ring buffer keeps its lines) ...
    lines = wait_until(
        lambda: (got := backend_lines()) and any(PROMPT_MARKER in line for line in got) and got,
        10,
        "the backend to print the prompt",
    )
    assert any("--api-key ***" in line for line in lines)
    # ... but swapper's own log has neither the prompt nor a key.
    log = swapper.output()
    assert "Starting tiny-a" in log
    for secret in (PROMPT_MARKER, SWAPPER_KEY, BACKEND_KEY):
        assert secret not in log
    assert not any(BACKEND_KEY in line for line in lines)


#: Runs llama-server as its child (no ``exec``) and floods stdout with long and short lines as
#: fast as swapper reads them, counting the bytes written into ``COUNTER-ALIAS``.
FLOODER = """#!{python}
import os, subprocess, sys
llama = subprocess.Popen([{llama_server!r}, *sys.argv[1:]])
counter = {counter!r} + "-" + sys.argv[sys.argv.index("--alias") + 1]
block = b"x" * (128 << 10) + b"\\n" + b"flooding along\\n" * 100
written = 0
while True:
    for _ in range(16):
        sys.stdout.buffer.write(block)
    written += 16 * len(block)
    with open(counter + ".tmp", "w") as out:
        out.write(str(written))
    os.replace(counter + ".tmp", counter)
"""
#: Per backend, after it has loaded: more than a ring buffer of 1000 such long lines would hold.
FLOOD_BYTES = 160 << 20


def vm_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.integration
def test_three_flooding_backends_keep_swapper_small_and_its_log_quiet(
    swapper_factory: Any,
    llama_server: str,
    tmp_path: Path,
) -> None:
    counter = tmp_path / "written"
    flooder = tmp_path / "flooding-llama-server"
    flooder.write_text(
        FLOODER.format(python=sys.executable, llama_server=llama_server, counter=str(counter))
    )
    flooder.chmod(0o755)
    names = [f"tiny-{name}" for name in "abc"]
    swapper = swapper_factory(
        models={
            f"tiny-{name}": tiny_model(swapper_factory.workdir, name, binary=str(flooder))
            for name in "abc"
        },
        swapper={"mode": "multi-active", "max_concurrent_models": 3},
    )
    for name in names:
        assert chat(swapper, name).status_code == 200
    written = {name: lambda name=name: int(Path(f"{counter}-{name}").read_text()) for name in names}
    start = {name: read() for name, read in written.items()}
    log_start = swapper.log_path.stat().st_size
    peak = 0.0

    def flooded() -> bool:
        nonlocal peak
        peak = max(peak, vm_rss_mb(swapper.proc.pid))
        return all(read() - start[name] >= FLOOD_BYTES for name, read in written.items())

    wait_until(flooded, 300, "each backend to print 160 MiB more", interval=0.1)
    peak = max(peak, vm_rss_mb(swapper.proc.pid))
    grown = swapper.log_path.stat().st_size - log_start
    print(
        f"swapper's peak VmRSS {peak:.0f} MB; its log grew {grown} bytes "
        f"while its backends printed {3 * FLOOD_BYTES >> 20} MiB"
    )
    assert peak < 150
    assert grown < 64 << 10
    for name in names:
        assert chat(swapper, name).status_code == 200  # still serving
        lines = swapper.http.get(f"/models/{name}/logs", params={"lines": 1000}).json()["lines"]
        assert any(line.endswith("lines not shown") for line in lines)
    assert "lines a second" in swapper.output()  # the flood is reported, once a minute at most
