"""OpenAI-compatible routes: ``GET /v1/models`` and ``POST /v1/chat/completions`` (optionally streamed as
server-sent events). The Harmony final channel is the message ``content``; the analysis channel goes in
``reasoning_content``, the field vLLM and other OpenAI-compatible servers use for reasoning models.

Streaming sends tokens as they are generated: a role chunk, then ``reasoning_content`` and ``content`` deltas in
the order the model writes them, then the finish chunk and ``[DONE]``. A client that disconnects mid-stream
cancels its generation (its slot and cache blocks are freed).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from gptoss_hpc.serving.generation import Completion, Service
from gptoss_hpc.serving.schemas import ChatCompletionRequest, chat_chunk, chat_completion, completion_id, usage
from gptoss_hpc.serving.streaming import ChannelSplitter
from gptoss_hpc.serving.worker import GenerationFailedError

log = logging.getLogger(__name__)
DELTA_FIELD = {"reasoning": "reasoning_content", "content": "content"}


def openai_error(status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None) -> Any:
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(status_code=status, content=body)


async def sse_events(completion: Completion, model: str, id_: str) -> AsyncIterator[str]:
    """The chunks of one streamed completion."""
    created = int(time.time())
    yield chat_chunk(model, {"role": "assistant", "content": ""}, id_=id_, created=created)
    splitter = ChannelSplitter()
    try:
        async for piece in completion:
            for kind, text in splitter.feed(piece):
                yield chat_chunk(model, {DELTA_FIELD[kind]: text}, id_=id_, created=created)
        for kind, text in splitter.flush():
            yield chat_chunk(model, {DELTA_FIELD[kind]: text}, id_=id_, created=created)
    except GenerationFailedError as exc:  # the status line is sent: the error goes in the stream
        log.warning("stream %s failed: %s", id_, exc)
        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
        return
    assert completion.answer is not None
    tokens = usage(completion.prompt_tokens, completion.completion_tokens)
    yield chat_chunk(model, {}, completion.answer.finish_reason, id_=id_, created=created, usage=tokens)
    yield "data: [DONE]\n\n"


def add_openai_routes(app: Any, service: Service, model_name: str) -> None:
    from fastapi.responses import StreamingResponse

    created = int(time.time())

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "gptoss_hpc"}],
        }

    @app.post("/v1/chat/completions", responses={400: {}, 401: {}, 404: {}, 413: {}, 422: {}, 429: {}})
    async def chat_completions(request: ChatCompletionRequest) -> Any:
        if request.model is not None and request.model != model_name:
            return openai_error(
                404,
                f"model {request.model!r} is not served here; this server serves {model_name!r} (GET /v1/models)",
                code="model_not_found",
            )
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        n = service.check_tokens(request.requested_tokens(), field)
        options = {"temperature": request.temperature, "top_p": request.top_p, "stop": request.stops()}
        id_ = completion_id()
        if request.stream:
            completion = service.open(request.chat(), n, **options)  # 429 / 400 before the stream starts
            return StreamingResponse(sse_events(completion, model_name, id_), media_type="text/event-stream")
        completion = await service.run(request.chat(), n, **options)
        answer = completion.answer
        assert answer is not None  # run() returns finished completions
        body = chat_completion(model_name, answer.content, answer.reasoning, answer.finish_reason, id_=id_)
        return {**body, "usage": usage(completion.prompt_tokens, completion.completion_tokens)}
