"""OpenAI answers back to Ollama's shape: a whole answer to one object, a stream of SSE
chunks to newline-delimited JSON objects (:class:`StreamTranslator`). Pure: no I/O."""

from __future__ import annotations

import datetime
from typing import Any

import msgspec

__all__ = ["StreamTranslator", "chat_answer", "now_rfc3339"]

_DECODE = msgspec.json.Decoder()
_ENCODE = msgspec.json.Encoder()


def now_rfc3339() -> str:
    """The current time as Ollama writes ``created_at``."""
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


# -- answers --------------------------------------------------------------------------------------

_NS = 1_000_000  # ms -> ns


def _done_reason(finish: Any) -> str:
    return "length" if finish == "length" else "stop"


def _tool_calls_from_openai(calls: Any) -> list[dict[str, Any]]:
    out = []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") or {}
        arguments = function.get("arguments") or "{}"
        try:
            parsed = _DECODE.decode(arguments) if isinstance(arguments, str) else arguments
        except msgspec.DecodeError:
            parsed = {"_raw": arguments}  # the model wrote no valid JSON: keep what it wrote
        out.append({"function": {"name": function.get("name", ""), "arguments": parsed}})
    return out


def _stats(answer: dict[str, Any], total_ns: int, load_ns: int) -> dict[str, Any]:
    """Counts from ``usage``, durations from llama-server's ``timings`` where it sends them."""
    usage = answer.get("usage") or {}
    timings = answer.get("timings") or {}
    return {
        "total_duration": total_ns,
        "load_duration": load_ns,
        "prompt_eval_count": int(usage.get("prompt_tokens") or 0),
        "prompt_eval_duration": int(float(timings.get("prompt_ms") or 0) * _NS),
        "eval_count": int(usage.get("completion_tokens") or 0),
        "eval_duration": int(float(timings.get("predicted_ms") or 0) * _NS),
    }


def chat_answer(
    answer: dict[str, Any], name: str, *, generate: bool, total_ns: int, load_ns: int
) -> dict[str, Any]:
    """One Ollama object (``done: true``) for a whole OpenAI answer."""
    choice = answer["choices"][0]  # none: not an OpenAI answer (the caller says 502)
    message = choice.get("message") or {}
    text = message.get("content") if "message" in choice else choice.get("text")
    thinking = message.get("reasoning_content")
    out: dict[str, Any] = {"model": name, "created_at": now_rfc3339()}
    if generate:
        out["response"] = text or ""
        if thinking:
            out["thinking"] = thinking
    else:
        reply: dict[str, Any] = {"role": "assistant", "content": text or ""}
        if thinking:
            reply["thinking"] = thinking
        if message.get("tool_calls"):
            reply["tool_calls"] = _tool_calls_from_openai(message["tool_calls"])
        out["message"] = reply
    out["done"] = True
    out["done_reason"] = _done_reason(choice.get("finish_reason"))
    out.update(_stats(answer, total_ns, load_ns))
    return out


class StreamTranslator:
    """OpenAI SSE bytes in, Ollama NDJSON lines out; call :meth:`feed` per chunk, then
    :meth:`finish` with the durations once the upstream stream ended."""

    def __init__(self, name: str, *, generate: bool) -> None:
        self.name = name
        self.generate = generate
        self._pending = b""
        self._finish: Any = None
        self._last: dict[str, Any] = {}
        self._calls: dict[int, dict[str, Any]] = {}
        #: The message of an ``error`` event, if the stream carried one.
        self.error: str | None = None

    def _piece(self, content: str, thinking: str | None) -> bytes:
        out: dict[str, Any] = {"model": self.name, "created_at": now_rfc3339()}
        if self.generate:
            out["response"] = content
            if thinking:
                out["thinking"] = thinking
        else:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            out["message"] = message
        out["done"] = False
        return _ENCODE.encode(out) + b"\n"

    def _event(self, data: dict[str, Any]) -> bytes:
        if "error" in data:
            error = data["error"]
            self.error = str(error.get("message") if isinstance(error, dict) else error)
            return b""
        if data.get("usage") or data.get("timings"):
            self._last.update({k: data[k] for k in ("usage", "timings") if data.get(k)})
        out = b""
        for choice in data.get("choices") or []:
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
            delta = choice.get("delta") or {}
            text = delta.get("content") if "delta" in choice else choice.get("text")
            for call in delta.get("tool_calls") or []:
                # Streamed tool calls arrive in pieces; Ollama sends each call whole, at the end.
                slot = self._calls.setdefault(
                    int(call.get("index", 0)), {"function": {"name": "", "arguments": ""}}
                )
                function = call.get("function") or {}
                slot["function"]["name"] += function.get("name") or ""
                slot["function"]["arguments"] += function.get("arguments") or ""
            thinking = delta.get("reasoning_content")
            if text or thinking:
                out += self._piece(text or "", thinking)
        return out

    def feed(self, chunk: bytes) -> bytes:
        """The NDJSON lines for the complete SSE events in ``chunk`` (and before it)."""
        self._pending += chunk.replace(b"\r\n", b"\n")
        out = b""
        while b"\n" in self._pending:
            line, _, self._pending = self._pending.partition(b"\n")
            if not line.startswith(b"data:"):
                continue  # blank separators, ": ping" comments, event: lines
            payload = line[5:].strip()
            if payload == b"[DONE]":
                continue
            try:
                data = _DECODE.decode(payload)
            except msgspec.DecodeError:
                continue
            if isinstance(data, dict):
                out += self._event(data)
        return out

    def finish(self, *, total_ns: int, load_ns: int) -> bytes:
        """The closing object (``done: true`` and the counts), or an error line."""
        if self.error is not None:
            return _ENCODE.encode({"error": self.error}) + b"\n"
        out: dict[str, Any] = {"model": self.name, "created_at": now_rfc3339()}
        if self.generate:
            out["response"] = ""
        else:
            message: dict[str, Any] = {"role": "assistant", "content": ""}
            if self._calls:
                calls = [self._calls[i] for i in sorted(self._calls)]
                message["tool_calls"] = _tool_calls_from_openai(calls)
            out["message"] = message
        out["done"] = True
        out["done_reason"] = _done_reason(self._finish)
        out.update(_stats(self._last, total_ns, load_ns))
        return _ENCODE.encode(out) + b"\n"


class NativeLines:
    """An ``ollama`` backend's own NDJSON answer, line by line, naming the model as the client
    did (Ollama writes its tag). Only whole lines are rewritten; a line that is not a JSON
    object goes through as it came."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._partial = b""

    def feed(self, chunk: bytes) -> bytes:
        """The whole lines ``chunk`` completes, renamed; the rest waits for the next chunk."""
        data = self._partial + chunk
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        return b"".join(self.line(line) for line in data[:cut].splitlines(keepends=True))

    def finish(self) -> bytes:
        """A last line the backend did not end with a newline."""
        rest, self._partial = self._partial, b""
        return self.line(rest) if rest.strip() else b""

    def line(self, line: bytes) -> bytes:
        """One NDJSON line (or a whole JSON answer) with ``model`` set to the client's name."""
        try:
            data = _DECODE.decode(line)
        except msgspec.DecodeError:
            return line
        if not isinstance(data, dict) or "model" not in data:
            return line
        data["model"] = self._name
        end = b"\n" if line.endswith(b"\n") else b""
        return _ENCODE.encode(data) + end
