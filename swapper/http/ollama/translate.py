"""Ollama's requests as OpenAI request bodies: pure functions, no I/O.

``/api/chat`` and ``/api/generate`` become ``/v1/chat/completions`` bodies (a raw generate
becomes ``/v1/completions``), ``/api/embed`` and ``/api/embeddings`` become ``/v1/embeddings``.
The answers go back through :mod:`swapper.http.ollama.answers`.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

__all__ = [
    "OllamaRequestError",
    "chat_request",
    "embed_request",
    "generate_request",
    "keep_alive_seconds",
    "options_fields",
]

_DECODE = msgspec.json.Decoder()
_ENCODE = msgspec.json.Encoder()


class OllamaRequestError(ValueError):
    """A request the translation refuses; the message is for the client (HTTP 400)."""


# -- keep_alive -----------------------------------------------------------------------------------

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def keep_alive_seconds(value: Any) -> float | None:
    """Ollama's ``keep_alive`` in seconds: a number is seconds, a string a Go duration
    (``"5m"``, ``"1h30m"``) or a bare number; negative means forever (returned as -1).
    None (absent) stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise OllamaRequestError(f"keep_alive: expected a number or a duration, not {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise OllamaRequestError(
                    f'keep_alive: {value!r} is not a duration (e.g. "5m", "1h", 300, -1)'
                ) from None
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise OllamaRequestError(f"keep_alive: expected a number or a duration, not {value!r}")
    return -1.0 if seconds < 0 else seconds


# -- options --------------------------------------------------------------------------------------

#: Ollama option -> OpenAI (or llama-server's extra) body field, passed as they are.
_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "seed": "seed",
    "stop": "stop",
    "num_predict": "max_tokens",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "mirostat": "mirostat",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
    "num_keep": "n_keep",
}


def options_fields(options: Any, ctx_size: int | None) -> dict[str, Any]:
    """OpenAI body fields for Ollama's ``options``.

    ``num_ctx`` cannot change a running model's context: larger than the entry's ``ctx_size``
    is refused (never a silent reload); equal or smaller is served as it is. Other options are
    dropped, as Ollama itself drops options it does not know: load-time ones (``num_gpu``,
    ``num_thread``, ``use_mmap``, ...) cannot change a backend already running, and clients
    send options of older Ollama releases (``tfs_z``, ``penalize_newline``).
    """
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise OllamaRequestError("options: must be an object")
    fields: dict[str, Any] = {}
    for name, value in options.items():
        if name == "num_ctx":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise OllamaRequestError("options.num_ctx: must be a whole number")
            if ctx_size and value > ctx_size:
                raise OllamaRequestError(
                    f"options.num_ctx {value} is larger than this model's context ({ctx_size}, "
                    "its ctx_size in swapper's config); swapper does not reload a model with "
                    "another context: raise ctx_size in the config instead"
                )
        elif name in _OPTIONS:
            if name == "num_predict" and isinstance(value, int) and value < 0:
                continue  # -1: until the model stops, which is OpenAI's default too
            fields[_OPTIONS[name]] = value
    return fields


def _format_fields(value: Any) -> dict[str, Any]:
    """``format: "json"`` or a JSON schema as OpenAI's ``response_format``."""
    if value is None or value == "":
        return {}
    if value == "json":
        return {"response_format": {"type": "json_object"}}
    if isinstance(value, dict):
        schema = {"name": "format", "schema": value, "strict": True}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    raise OllamaRequestError('format: must be "json" or a JSON schema object')


# -- requests -------------------------------------------------------------------------------------


def _image_parts(images: Any) -> list[dict[str, Any]]:
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise OllamaRequestError("images: must be a list of base64-encoded images")
    # Ollama takes bare base64; OpenAI wants a data URL. llama-server sniffs the real type.
    return [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{i}"}} for i in images
    ]


def _tool_calls_to_openai(calls: Any, turn: int) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise OllamaRequestError("tool_calls: must be a list")
    out = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise OllamaRequestError("tool_calls: each needs function.name")
        arguments = function.get("arguments", {})
        out.append(
            {
                "id": call.get("id") or f"call_{turn}_{index}",  # unique in the conversation
                "type": "function",
                "function": {
                    "name": function["name"],
                    # Ollama sends arguments as an object, OpenAI as a JSON string.
                    "arguments": arguments
                    if isinstance(arguments, str)
                    else _ENCODE.encode(arguments).decode(),
                },
            }
        )
    return out


def _message_to_openai(message: Any, turn: int = 0) -> dict[str, Any]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise OllamaRequestError("messages: each message needs a role")
    content = message.get("content", "")
    if content is not None and not isinstance(content, str):
        raise OllamaRequestError("messages: content must be a string")
    out: dict[str, Any] = {"role": message["role"], "content": content or ""}
    if message.get("images"):
        out["content"] = [{"type": "text", "text": content or ""}, *_image_parts(message["images"])]
    if message.get("tool_calls"):
        out["tool_calls"] = _tool_calls_to_openai(message["tool_calls"], turn)
    if message["role"] == "tool":
        # OpenAI needs the id of the call answered; Ollama names the tool instead.
        out["tool_call_id"] = message.get("tool_call_id") or message.get("tool_name") or ""
        out["_tool_name"] = message.get("tool_name")  # for _link_tool_results
    if message.get("thinking") and message["role"] == "assistant":
        out["reasoning_content"] = message["thinking"]
    return out


def _common(request: dict[str, Any], model: str, ctx_size: int | None) -> dict[str, Any]:
    stream = request.get("stream", True)  # Ollama streams unless told not to
    if not isinstance(stream, bool):
        raise OllamaRequestError("stream: must be true or false")
    body: dict[str, Any] = {"model": model, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(options_fields(request.get("options"), ctx_size))
    body.update(_format_fields(request.get("format")))
    think = request.get("think")
    if think is not None:
        if isinstance(think, str) and think in ("low", "medium", "high"):
            body["reasoning_effort"] = think
        elif isinstance(think, bool):
            # llama-server's switch for templates that know a thinking mode.
            body["chat_template_kwargs"] = {"enable_thinking": think}
        else:
            raise OllamaRequestError('think: must be true, false, "low", "medium" or "high"')
    return body


def _link_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give each tool result the id of the call it answers: OpenAI pairs them by id, Ollama by
    order and ``tool_name``. A result without a known id takes the first unanswered call of its
    tool's name (or, without a name, the first unanswered call)."""
    pending: list[tuple[str, str]] = []  # (id, name) of the calls not answered yet
    for message in messages:
        for call in message.get("tool_calls", []):
            pending.append((call["id"], call["function"]["name"]))
        if message["role"] != "tool":
            continue
        named = message.pop("_tool_name", None)
        ids = [call_id for call_id, _ in pending]
        if message["tool_call_id"] in ids:
            pending.pop(ids.index(message["tool_call_id"]))
        elif pending:
            index = next((i for i, (_, name) in enumerate(pending) if name == named), 0)
            message["tool_call_id"] = pending.pop(index)[0]
    return messages


def chat_request(request: dict[str, Any], model: str, ctx_size: int | None) -> dict[str, Any]:
    """The ``/v1/chat/completions`` body for an ``/api/chat`` request."""
    messages = request.get("messages") or []
    if not isinstance(messages, list):
        raise OllamaRequestError("messages: must be a list")
    body = _common(request, model, ctx_size)
    body["messages"] = _link_tool_results(
        [_message_to_openai(m, turn) for turn, m in enumerate(messages)]
    )
    tools = request.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise OllamaRequestError("tools: must be a list")
        body["tools"] = tools  # Ollama's tool shape is OpenAI's: {"type":"function","function":…}
    return body


def generate_request(
    request: dict[str, Any], model: str, ctx_size: int | None
) -> tuple[str, dict[str, Any]]:
    """The path and body for an ``/api/generate`` request: a chat with one user turn (the
    backend applies the model's template, as Ollama does), or with ``raw`` a plain completion."""
    prompt = request.get("prompt") or ""
    if not isinstance(prompt, str):
        raise OllamaRequestError("prompt: must be a string")
    for unsupported in ("suffix", "template", "context"):
        if request.get(unsupported):
            raise OllamaRequestError(f"{unsupported}: not supported by swapper's /api/generate")
    body = _common(request, model, ctx_size)
    if request.get("raw"):
        body["prompt"] = prompt
        return "/v1/completions", body
    messages: list[dict[str, Any]] = []
    if request.get("system"):
        messages.append({"role": "system", "content": str(request["system"])})
    user: dict[str, Any] = {"role": "user", "content": prompt}
    if request.get("images"):
        user["images"] = request["images"]
    messages.append(_message_to_openai(user))
    body["messages"] = messages
    return "/v1/chat/completions", body


def embed_request(request: dict[str, Any], model: str, *, legacy: bool) -> dict[str, Any]:
    """The ``/v1/embeddings`` body for ``/api/embed`` (``input``) or ``/api/embeddings``
    (``prompt``)."""
    text = request.get("prompt") if legacy else request.get("input")
    if isinstance(text, str):
        text = [text]
    if not isinstance(text, list) or not text or not all(isinstance(t, str) for t in text):
        name = "prompt" if legacy else "input"
        raise OllamaRequestError(f"{name}: must be a string or a list of strings")
    return {"model": model, "input": text, "encoding_format": "float"}
