"""OpenAPI documentation of the request bodies swapper forwards without parsing.

The OpenAI handlers read the raw body (only ``model`` is decoded), so Litestar cannot infer
their bodies; these operation classes describe them for the schema at ``/schema``.
"""

from __future__ import annotations

from dataclasses import dataclass

from litestar import Litestar
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema

__all__ = [
    "ChatOperation",
    "CompletionOperation",
    "EmbeddingOperation",
    "ModelOperation",
    "list_model_names",
]

_MESSAGE = Schema(
    type=OpenAPIType.OBJECT,
    required=["role", "content"],
    properties={
        "role": Schema(
            type=OpenAPIType.STRING, enum=["system", "user", "assistant", "tool", "developer"]
        ),
        "content": Schema(type=OpenAPIType.STRING),
    },
)
_COMMON = {
    "stream": Schema(type=OpenAPIType.BOOLEAN),
    "max_tokens": Schema(type=OpenAPIType.INTEGER, minimum=1, maximum=64),
    "temperature": Schema(type=OpenAPIType.NUMBER, minimum=0, maximum=2),
}


def _body(required: list[str], **properties: Schema) -> RequestBody:
    model = Schema(
        type=OpenAPIType.STRING, min_length=1, description="A configured model id or alias"
    )
    schema = Schema(
        type=OpenAPIType.OBJECT,
        required=["model", *required],
        properties={"model": model, **_COMMON, **properties},
        description="Forwarded to the backend unchanged; unknown fields pass through",
    )
    return RequestBody(required=True, content={"application/json": OpenAPIMediaType(schema=schema)})


@dataclass
class ChatOperation(Operation):
    """``POST /v1/chat/completions``."""

    def __post_init__(self) -> None:
        self.request_body = _body(
            ["messages"], messages=Schema(type=OpenAPIType.ARRAY, items=_MESSAGE, min_items=1)
        )


@dataclass
class CompletionOperation(Operation):
    """``POST /v1/completions``."""

    def __post_init__(self) -> None:
        self.request_body = _body(["prompt"], prompt=Schema(type=OpenAPIType.STRING))


@dataclass
class EmbeddingOperation(Operation):
    """``POST /v1/embeddings``."""

    def __post_init__(self) -> None:
        self.request_body = _body(
            ["input"],
            input=Schema(
                one_of=[
                    Schema(type=OpenAPIType.STRING),
                    Schema(type=OpenAPIType.ARRAY, items=Schema(type=OpenAPIType.STRING)),
                ]
            ),
        )


@dataclass
class ModelOperation(Operation):
    """Any other endpoint routed by the body's ``model`` (``/v1/responses``, ``/tokenize``...)."""

    def __post_init__(self) -> None:
        self.request_body = _body([])


_ROUTED = (ChatOperation, CompletionOperation, EmbeddingOperation, ModelOperation)


def list_model_names(app: Litestar, names: list[str]) -> None:
    """Document the configured model ids and aliases as the values ``model`` takes."""
    paths = app.openapi_schema.paths or {}
    for item in paths.values():
        post = item.post
        if not isinstance(post, _ROUTED):
            continue
        assert isinstance(post.request_body, RequestBody)
        schema = post.request_body.content["application/json"].schema
        assert isinstance(schema, Schema) and schema.properties is not None
        model = schema.properties["model"]
        assert isinstance(model, Schema)
        model.enum = list(names)
