"""OpenAI chat-completion bodies (the ``/score`` ones live in ``gptoss_hpc.serving.app``).

A request with no user content is refused (422): an empty prompt would make the model write from nothing.
"""

from __future__ import annotations

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
    stream: StrictBool = False
    n: StrictInt = Field(default=1, ge=1, le=1, description="one choice per request")

    @model_validator(mode="after")
    def _user_content(self) -> ChatCompletionRequest:
        if not has_user_content(self.chat()):
            raise ValueError(NO_USER_CONTENT)
        return self

    def chat(self) -> list[dict[str, Any]]:
        return [m.to_chat() for m in self.messages]

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


def chat_chunks(model: str, content: str, reasoning: str, finish_reason: str, *, id_: str) -> list[dict[str, Any]]:
    """The same answer as ``chat.completion.chunk`` events: role, reasoning, content, then the finish."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}

    chunks = [chunk({"role": "assistant", "content": ""})]
    if reasoning:
        chunks.append(chunk({"reasoning_content": reasoning}))
    if content:
        chunks.append(chunk({"content": content}))
    chunks.append(chunk({}, finish_reason))
    return chunks
