"""OpenAI-compatible routes: ``GET /v1/models`` and ``POST /v1/chat/completions`` (optionally streamed as
server-sent events). The Harmony final channel is the message ``content``; the analysis channel goes in
``reasoning_content``, the field vLLM and other OpenAI-compatible servers use for reasoning models.

Streaming sends the answer once it is generated (role, reasoning, content, finish): a client gets the
stream protocol, not earlier tokens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from gptoss_hpc.serving.schemas import ChatCompletionRequest, chat_chunks, chat_completion, completion_id
from gptoss_hpc.serving.worker import Generator


def openai_error(status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None) -> Any:
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(status_code=status, content=body)


def add_openai_routes(app: Any, generator: Generator, model_name: str) -> None:
    from fastapi.responses import StreamingResponse

    created = int(time.time())

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "gptoss_hpc"}],
        }

    @app.post("/v1/chat/completions", responses={401: {}, 404: {}, 413: {}, 422: {}, 429: {}})
    async def chat_completions(request: ChatCompletionRequest) -> Any:
        if request.model is not None and request.model != model_name:
            return openai_error(
                404,
                f"model {request.model!r} is not served here; this server serves {model_name!r} (GET /v1/models)",
                code="model_not_found",
            )
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        n = generator.check_tokens(request.requested_tokens(), field)
        answer = await generator.answer(request.chat(), n, temperature=request.temperature, top_p=request.top_p)
        id_ = completion_id()
        if not request.stream:
            return chat_completion(model_name, answer.content, answer.reasoning, answer.finish_reason, id_=id_)

        def events() -> Iterator[str]:
            for chunk in chat_chunks(model_name, answer.content, answer.reasoning, answer.finish_reason, id_=id_):
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
