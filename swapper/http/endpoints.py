"""The other JSON endpoints clients call, routed by the body's ``model`` like chat.

OpenAI's Responses API, Anthropic's Messages API (errors in Anthropic's shape), rerank under
its three common paths, and llama.cpp's own endpoints. Each is served only by models whose
backend declares it (see :class:`~swapper.backends.Backend.endpoints`); the bytes, streams
included, are relayed as the backend sends them. ``/upstream/{model}/...`` reaches a model's
backend directly, whatever the path.
"""

from __future__ import annotations

from typing import Any

from litestar import HttpMethod, Request, Response, post, route
from litestar.datastructures import State
from litestar.params import FromPath

from swapper.http.access import require_admin_unless_get, require_key
from swapper.http.exchange import Forward
from swapper.http.forwarding import forward_now, forward_request
from swapper.http.logs import note_model
from swapper.http.openapi import ModelOperation

__all__ = ["ENDPOINT_HANDLERS"]


@post("/v1/responses", guards=[require_key], operation_class=ModelOperation, status_code=200)
async def responses(request: Request[Any, Any, State]) -> Response[Any]:
    """OpenAI's Responses API; streams pass through as SSE."""
    return await forward_request(request, "/v1/responses")


@post("/v1/messages", guards=[require_key], operation_class=ModelOperation, status_code=200)
async def messages(request: Request[Any, Any, State]) -> Response[Any]:
    """Anthropic's Messages API; errors in Anthropic's shape."""
    return await forward_request(request, "/v1/messages", dialect="anthropic")


@post(
    "/v1/messages/count_tokens",
    guards=[require_key],
    operation_class=ModelOperation,
    status_code=200,
)
async def count_tokens(request: Request[Any, Any, State]) -> Response[Any]:
    """Anthropic's token counting; errors in Anthropic's shape."""
    return await forward_request(request, "/v1/messages/count_tokens", dialect="anthropic")


@post(
    ["/v1/rerank", "/rerank", "/v1/reranking"],
    guards=[require_key],
    operation_class=ModelOperation,
    status_code=200,
)
async def rerank(request: Request[Any, Any, State]) -> Response[Any]:
    """Rerank documents against a query; every path goes to the backend's ``/v1/rerank``."""
    return await forward_request(request, "/v1/rerank")


def _llamacpp_endpoint(path: str) -> Any:
    async def handler(request: Request[Any, Any, State]) -> Response[Any]:
        return await forward_request(request, path)

    handler.__name__ = handler.__qualname__ = "llamacpp" + path.replace("/", "_").replace("-", "_")
    handler.__doc__ = f"llama.cpp's own ``{path}``, routed by the body's ``model``."
    return post(path, guards=[require_key], operation_class=ModelOperation, status_code=200)(
        handler
    )


_LLAMACPP_PATHS = ("/infill", "/completion", "/tokenize", "/detokenize", "/apply-template")

_METHODS = [
    HttpMethod.GET,
    HttpMethod.POST,
    HttpMethod.PUT,
    HttpMethod.PATCH,
    HttpMethod.DELETE,
]


@route(
    "/upstream/{name:str}/{rest:path}",
    http_method=_METHODS,
    guards=[require_key, require_admin_unless_get],
    status_code=200,
)
async def upstream(
    request: Request[Any, Any, State], name: FromPath[str], rest: FromPath[str]
) -> Response[Any]:
    """The model's backend itself at ``rest`` (``/props``, ``/slots``, ``/metrics``...), loading
    it first; request and answer pass as they are. Only GET is open to plain API keys."""
    state = request.app.state
    model_id = state.coordinator.resolve(name)
    note_model(request.scope, model_id)
    query = request.scope.get("query_string", b"")
    path = rest + ("?" + query.decode("latin-1") if query else "")
    content_type = request.headers.get("content-type")
    headers = () if content_type is None else ((b"content-type", content_type.encode("latin-1")),)
    body = await request.body()
    forward = Forward(
        path,
        body,
        model_id,
        name,
        False,
        "raw",
        method=request.method,
        headers=headers,
        rewrite=False,
    )
    return await forward_now(request, forward)


ENDPOINT_HANDLERS = [
    responses,
    messages,
    count_tokens,
    rerank,
    *(_llamacpp_endpoint(path) for path in _LLAMACPP_PATHS),
    upstream,
]
