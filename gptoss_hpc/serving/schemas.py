"""OpenAI chat-completion bodies (the ``/score`` ones live in ``gptoss_hpc.serving.app``).

A request with no user content is refused (422): an empty prompt would make the model write from nothing.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

NO_USER_CONTENT = "no user content: give at least one 'user' message whose content is not empty"


def has_user_content(messages: list[dict[str, Any]]) -> bool:
    return any(m["role"] == "user" and str(m.get("content") or "").strip() for m in messages)


# ---------------------------------------------------------------------------- /v1/chat/completions


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: StrictStr


class OpenAIMessage(BaseModel):
    # Clients send fields we have no use for (name, refusal, annotations ...): ignored, as OpenAI's API does.
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    # An assistant turn echoed back with the reasoning this server returned: the chat template's `thinking`.
    reasoning_content: StrictStr | None = None

    def to_chat(self) -> dict[str, Any]:
        content = self.content if not isinstance(self.content, list) else "\n".join(p.text for p in self.content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.role == "assistant" and self.reasoning_content:
            message["thinking"] = self.reasoning_content
        return message


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's request this server honours; other OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    messages: list[OpenAIMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)  # the newer name of max_tokens
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: StrictStr | list[StrictStr] | None = Field(default=None, description="up to 4 stop strings")
    stream: StrictBool = False
    n: StrictInt = Field(default=1, ge=1, le=1, description="one choice per request")

    @model_validator(mode="after")
    def _user_content(self) -> ChatCompletionRequest:
        if not has_user_content(self.chat()):
            raise ValueError(NO_USER_CONTENT)
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError(f"stop: at most 4 strings (got {len(self.stop)})")
        return self

    def chat(self) -> list[dict[str, Any]]:
        return [m.to_chat() for m in self.messages]

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_completion(
    model: str, content: str, reasoning: str, finish_reason: str, *, id_: str, created: int | None = None
) -> dict[str, Any]:
    return {
        "id": id_,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "reasoning_content": reasoning or None},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def chat_chunk(
    model: str,
    delta: dict[str, Any],
    finish: str | None = None,
    *,
    id_: str,
    created: int,
    usage: dict[str, int] | None = None,
) -> str:
    """One ``chat.completion.chunk`` as a server-sent event (the last one carries ``usage``, as vLLM's does)."""
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    body = {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"
