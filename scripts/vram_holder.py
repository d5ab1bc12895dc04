#!/usr/bin/env python3
"""A stand-in for ``vllm serve`` that really holds GPU memory: for swapper's GPU checks.

Usage (the command line swapper's vLLM backend builds; unknown flags are ignored)::

    vram_holder.py serve MODEL --host H --port P --served-model-name NAME \\
        --gpu-memory-utilization F [other vLLM flags]

As far as swapper can see, it behaves like vLLM:

* it takes ``F`` x the total memory of GPU 0 through the CUDA driver API (ctypes on
  ``libcuda.so.1``; no torch, no CUDA toolkit) and writes to every byte, so the memory is
  really committed and NVML shows it against this process;
* like vLLM, it refuses to start (exit 1, with vLLM's message) when the GPU's free memory is
  below ``F`` x total at startup: this is what makes a premature start fail while another
  process's memory is still being released;
* its port stays closed while it "loads" and opens only once the memory is held;
* it serves ``GET /health``, ``GET /v1/models`` and ``POST /v1/chat/completions`` (a tiny
  OpenAI-shaped answer naming this holder and the MiB it holds; ``"stream": true`` too);
* SIGTERM or SIGINT: it exits 0 and the driver frees the memory with the process.

Standard library only, so it runs on a bare GPU machine with any Python 3.9+.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_MIB = 1024 * 1024
#: Memory is taken in chunks: one huge cuMemAlloc can fail on fragmentation where chunks do not.
_CHUNK = 1024 * _MIB


def log(message: str) -> None:
    """One line on stdout, flushed at once (swapper reads backend output line by line)."""
    print(f"vram_holder[{os.getpid()}]: {message}", flush=True)


class CudaError(RuntimeError):
    """A CUDA driver call that did not return CUDA_SUCCESS."""


class Cuda:
    """The few CUDA driver API calls a memory holder needs, through ctypes."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._declare()

    @classmethod
    def load(cls) -> Cuda | None:
        """The driver library, or None when this machine has no NVIDIA driver."""
        try:
            return cls(ctypes.CDLL("libcuda.so.1"))
        except OSError:
            return None

    def _declare(self) -> None:
        lib, c = self._lib, ctypes
        size_p, ptr_p = c.POINTER(c.c_size_t), c.POINTER(c.c_uint64)
        signatures: dict[str, list[Any]] = {
            "cuInit": [c.c_uint],
            "cuDeviceGet": [c.POINTER(c.c_int), c.c_int],
            "cuDeviceGetName": [c.c_char_p, c.c_int, c.c_int],
            "cuDevicePrimaryCtxRetain": [c.POINTER(c.c_void_p), c.c_int],
            "cuCtxSetCurrent": [c.c_void_p],
            "cuCtxSynchronize": [],
            "cuMemGetInfo_v2": [size_p, size_p],
            "cuMemAlloc_v2": [ptr_p, c.c_size_t],
            "cuMemsetD8_v2": [c.c_uint64, c.c_ubyte, c.c_size_t],
        }
        for name, argtypes in signatures.items():
            function = getattr(lib, name)
            function.argtypes = argtypes
            function.restype = c.c_int
        lib.cuGetErrorName.argtypes = [c.c_int, c.POINTER(c.c_char_p)]
        lib.cuGetErrorName.restype = c.c_int

    def call(self, name: str, *args: Any) -> None:
        """Call ``name`` and raise :class:`CudaError` with the driver's error name on failure."""
        code = getattr(self._lib, name)(*args)
        if code != 0:
            text = ctypes.c_char_p()
            self._lib.cuGetErrorName(code, ctypes.byref(text))
            raise CudaError(f"{name} failed: {(text.value or b'?').decode()} ({code})")

    def open_device(self, ordinal: int = 0) -> str:
        """Initialise the driver, make the device's primary context current; its name."""
        self.call("cuInit", 0)
        device = ctypes.c_int()
        self.call("cuDeviceGet", ctypes.byref(device), ordinal)
        name = ctypes.create_string_buffer(256)
        self.call("cuDeviceGetName", name, len(name), device)
        context = ctypes.c_void_p()
        self.call("cuDevicePrimaryCtxRetain", ctypes.byref(context), device)
        self.call("cuCtxSetCurrent", context)
        return name.value.decode(errors="replace")

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes of the current device, as the driver sees them now."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.call("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    def hold(self, nbytes: int) -> list[int]:
        """Allocate ``nbytes`` in chunks and write every byte; the device pointers.

        The writes make sure the pages are really backed, not merely reserved; the pointers
        are never freed: the memory goes back to the driver when the process exits.
        """
        pointers: list[int] = []
        left = nbytes
        while left > 0:
            size = min(_CHUNK, left)
            pointer = ctypes.c_uint64()
            self.call("cuMemAlloc_v2", ctypes.byref(pointer), size)
            self.call("cuMemsetD8_v2", pointer.value, 0xA5, size)
            pointers.append(pointer.value)
            left -= size
        self.call("cuCtxSynchronize")  # memsets are asynchronous: wait until they are done
        return pointers


class Holder:
    """What the HTTP handler reports: who this is and how much it holds."""

    def __init__(self, model: str, served_name: str, held_bytes: int, gpu_name: str) -> None:
        self.model = model
        self.served_name = served_name
        self.held_mib = held_bytes / _MIB
        self.gpu_name = gpu_name
        self.created = int(time.time())

    def answer(self) -> str:
        """The chat reply: which holder answered and what it holds."""
        return (
            f"{self.served_name} (vram_holder pid {os.getpid()}) holds "
            f"{self.held_mib:.0f} MiB on {self.gpu_name}"
        )


def make_handler(holder: Holder) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``holder``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as swapper's connection pool expects

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
            pass  # swapper logs every output line; per-request lines would only be noise

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, document: Any) -> None:
            self._send(status, json.dumps(document).encode(), "application/json")

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, b"", "text/plain")
            elif self.path == "/v1/models":
                self._json(
                    200,
                    {
                        "object": "list",
                        "data": [
                            {
                                "id": holder.served_name,
                                "object": "model",
                                "created": holder.created,
                                "owned_by": "vllm",
                                "root": holder.model,
                                "parent": None,
                                "max_model_len": 2048,
                            }
                        ],
                    },
                )
            else:
                self._not_found()

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self.path != "/v1/chat/completions":
                self._not_found()
                return
            try:
                request = json.loads(raw or b"{}")
                stream = bool(request.get("stream"))
            except (ValueError, AttributeError):
                self._json(
                    400,
                    {
                        "object": "error",
                        "message": "invalid JSON body",
                        "type": "BadRequestError",
                        "param": None,
                        "code": 400,
                    },
                )
                return
            completion_id = f"chatcmpl-{uuid.uuid4().hex}"
            if stream:
                self._stream(completion_id)
                return
            self._json(
                200,
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": holder.served_name,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "logprobs": None,
                            "message": {"role": "assistant", "content": holder.answer()},
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                },
            )

        def _stream(self, completion_id: str) -> None:
            """The same answer as server-sent events: one content chunk, a stop, ``[DONE]``."""

            def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
                event = {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": holder.served_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
                return b"data: " + json.dumps(event).encode() + b"\n\n"

            body = (
                chunk({"role": "assistant", "content": holder.answer()}, None)
                + chunk({}, "stop")
                + b"data: [DONE]\n\n"
            )
            self._send(200, body, "text/event-stream")

        def _not_found(self) -> None:
            self._json(
                404,
                {
                    "object": "error",
                    "message": f"no route {self.path}",
                    "type": "NotFoundError",
                    "param": None,
                    "code": 404,
                },
            )

    return Handler


def parse_args(argv: list[str]) -> argparse.Namespace:
    """vLLM's flags that matter here; every other flag is accepted and ignored."""
    if argv and argv[0] == "serve":
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="vram_holder.py serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", help="model name (only reported back)")
    parser.add_argument("--model", dest="model_flag", help="the same, vLLM's older spelling")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="+", default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    args, ignored = parser.parse_known_args(argv)
    args.model = args.model or args.model_flag or "vram-holder"
    args.served_name = (args.served_model_name or [args.model])[0]
    if ignored:
        log(f"ignoring flags: {' '.join(ignored)}")
    if not 0.0 < args.gpu_memory_utilization <= 1.0:
        parser.error("--gpu-memory-utilization must be in (0, 1]")
    return args


def main(argv: list[str]) -> int:
    """Take the memory, then serve until SIGTERM; 1 when there is no GPU or not enough free."""
    args = parse_args(argv)
    cuda = Cuda.load()
    if cuda is None:
        print(
            "vram_holder: no CUDA driver (libcuda.so.1 cannot be loaded)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    stop = threading.Event()
    # Handlers first: a SIGTERM that arrives while memory is being taken still ends cleanly.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    started = time.monotonic()
    try:
        gpu_name = cuda.open_device(0)
        free, total = cuda.memory()
        wanted = int(args.gpu_memory_utilization * total)
        log(
            f"GPU 0 {gpu_name}: total {total / _MIB:.0f} MiB, free {free / _MIB:.0f} MiB; "
            f"taking {wanted / _MIB:.0f} MiB ({args.gpu_memory_utilization:g} of total) "
            f"for {args.served_name}"
        )
        if free < wanted:
            # vLLM's own startup check, in its words: it does not wait for memory either.
            print(
                f"ValueError: Free memory on device ({free / 2**30:.2f}/{total / 2**30:.2f} "
                f"GiB) on startup is less than desired GPU memory utilization "
                f"({args.gpu_memory_utilization:g}, {wanted / 2**30:.2f} GiB). Decrease GPU "
                f"memory utilization or reduce GPU memory used by other processes.",
                flush=True,
            )
            return 1
        held = cuda.hold(wanted)
    except CudaError as exc:
        print(f"vram_holder: CUDA error: {exc}", flush=True)
        return 1
    log(
        f"holding {wanted / _MIB:.0f} MiB in {len(held)} chunks ({time.monotonic() - started:.2f}s)"
    )
    if stop.is_set():
        return 0

    # The port opens only now, as vLLM's does once the model is loaded.
    holder = Holder(args.model, args.served_name, wanted, gpu_name)
    try:
        server = ThreadingHTTPServer((args.host, args.port), make_handler(holder))
    except OSError as exc:
        print(f"vram_holder: cannot listen on {args.host}:{args.port}: {exc}", flush=True)
        return 1
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log(f"serving {args.served_name} on http://{args.host}:{args.port}")
    while not stop.wait(1.0):
        pass
    log("SIGTERM: exiting; the driver releases the memory")
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
