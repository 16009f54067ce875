"""The HTTP layer of the serve stage: FastAPI app (OpenAI-compatible chat endpoint and the Azure-style
``/score``, Harmony output split into analysis/final), model loading and ``serve()`` (uvicorn). The stage's
entry points (``python -m gptoss_hpc.serve``, the Slurm job body) are in ``gptoss_hpc.stages.serve``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from gptoss_hpc.serving.auth import (
    RequestGuard,
    ServeError,
    error_body,
    require_key_off_loopback,
)
from gptoss_hpc.serving.schemas import NO_USER_CONTENT, has_user_content

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_MAX_NEW_TOKENS_CAP = 2048
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 32  # requests waiting behind the running ones; one more gets 429
DEFAULT_MAX_RUNNING = 32  # requests decoded together (continuous batching)
DEFAULT_MAX_MODEL_LEN = 8192  # prompt + new tokens of one request: what the KV cache is sized for
DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB of JSON: far more text than gpt-oss's context holds

__all__ = ["ServeError", "create_app", "load_model", "serve"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr
    thinking: StrictStr | None = None


class ScoreRequest(BaseModel):
    """Exactly one of ``messages`` (a chat) or ``prompt`` (one user turn)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt: StrictStr | None = None
    # None: min(DEFAULT_MAX_NEW_TOKENS, the server's cap)
    max_new_tokens: StrictInt | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_input(self) -> ScoreRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' (a list of {role, content}) or 'prompt' (a string)")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt is empty: give the user's text")
        if self.messages is not None and not has_user_content(self.chat()):
            raise ValueError(NO_USER_CONTENT)
        return self

    def chat(self) -> list[dict[str, Any]]:
        if self.prompt is not None:
            return [{"role": "user", "content": self.prompt}]
        assert self.messages is not None
        return [m.model_dump(exclude_none=True) for m in self.messages]


class ScoreResponse(BaseModel):
    output: str
    analysis: str
    valid: bool
    parse_error: str | None = None
    completion: str


def load_model(model_dir: str | os.PathLike[str], cfg: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a merged folder, or from an adapter folder (base + LoRA unmerged, PEFT: a point's
    ``adapter/`` with ``eval.model=adapter``); on the GPU when there is one. With the point's RunConfig (the serve
    stage) it loads as the eval stage does (model.dtype, eval.attn_implementation, experts kernels; an MXFP4 base
    stays MXFP4); without, in the folder's dtype with eager attention."""
    from transformers import AutoTokenizer

    from gptoss_hpc.modeling.model import load_inference_model

    folder = Path(model_dir)
    if (folder / "adapter_config.json").is_file():
        return _load_adapter(folder, cfg)
    if not (folder / "config.json").is_file():
        raise ServeError(f"{folder} holds no model (config.json missing): give a merged/ or adapter/ folder")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return load_inference_model(folder, cfg), tokenizer


def _load_adapter(folder: Path, cfg: Any) -> tuple[Any, Any]:
    import json

    from transformers import AutoTokenizer

    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    tokenizer = AutoTokenizer.from_pretrained(str(folder if (folder / "tokenizer_config.json").is_file() else base))
    if cfg is not None:
        from gptoss_hpc.modeling.model import load_adapter_model
        from gptoss_hpc.paths import PointPaths

        return load_adapter_model(cfg, PointPaths(folder.parent), folder), tokenizer
    import torch

    from gptoss_hpc.modeling.model import cuda_device_map, is_mxfp4_checkpoint

    if base and (Path(base) / "config.json").is_file() and is_mxfp4_checkpoint(base):
        # an MXFP4 base stays MXFP4 (a dequantized 120b would not fit one GPU)
        from gptoss_hpc.modeling.mxfp4 import load_mxfp4_peft_model

        cuda = torch.cuda.is_available()
        model = load_mxfp4_peft_model(
            base, folder, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32, "eager"
        )
        return model, tokenizer
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(
        str(folder), dtype="auto", attn_implementation="eager", device_map=cuda_device_map()
    )
    return model.eval(), tokenizer


def create_app(
    model_dir: str | os.PathLike[str],
    max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP,
    *,
    do_sample: bool = False,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    served_model_name: str | None = None,
    generate_for_tests: Callable[..., str] | None = None,
    cfg: Any = None,
    max_running: int = DEFAULT_MAX_RUNNING,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    batching: bool = True,
) -> Any:
    """The FastAPI app serving ``model_dir`` (loaded now, so a bad folder fails before serving).

    ``api_key``: when set, every path but /health needs it. ``generate_for_tests`` replaces
    harmony.generate_completion (same signature): tests only, e.g. a slow generation that fills the queue; it
    turns continuous batching off, as ``batching=False`` does (one request at a time, today's worker).
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from gptoss_hpc.modeling.harmony import generate_completion
    from gptoss_hpc.serving.batching import ContextTooLongError, EngineDownError
    from gptoss_hpc.serving.generation import Service
    from gptoss_hpc.serving.metrics import CountResponses
    from gptoss_hpc.serving.openai_api import add_openai_routes
    from gptoss_hpc.serving.worker import GenerationFailedError, Generator, OverCapError, QueueFullError

    problems = []
    if max_queue < 1:
        problems.append(f"--max-queue must be >= 1 (got {max_queue})")
    if max_request_bytes < 1024:
        problems.append(f"--max-request-bytes must be >= 1024 (got {max_request_bytes})")
    if max_new_tokens_cap < 1:
        problems.append(f"--max-new-tokens-cap must be >= 1 (got {max_new_tokens_cap})")
    if max_running < 1:
        problems.append(f"--max-running must be >= 1 (got {max_running})")
    if max_model_len <= max_new_tokens_cap:
        problems.append(f"--max-model-len ({max_model_len}) must be over --max-new-tokens-cap ({max_new_tokens_cap})")
    if problems:
        raise ServeError("; ".join(problems))
    model, tokenizer = load_model(model_dir, cfg)
    name = served_model_name or default_model_name(model_dir)
    generator = Generator(
        model,
        tokenizer,
        generate_for_tests or generate_completion,
        max_new_tokens_cap=max_new_tokens_cap,
        default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
        max_waiting=max_queue,
        do_sample=do_sample,
    )
    why_not = "generate_for_tests replaces generation" if generate_for_tests else None
    why_not = why_not or (None if batching else "--no-batching")
    plan = None if why_not else kv_plan(model, cfg, max_running, max_model_len)
    service = Service(generator, max_running=max_running, plan=plan, why_not_batched=why_not)
    log.info("serving %s: %s", name, service.mode)

    @asynccontextmanager
    async def lifespan(_: Any) -> Any:
        yield
        service.close()

    app = FastAPI(title="gptoss_hpc serve", description=f"serving {name}", lifespan=lifespan)
    app.state.service = service  # tests reach the model and the engine through it
    app.add_middleware(CountResponses, metrics=service.metrics)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_request_bytes)

    def problem(request: Request, status: int, problems: list[str], kind: str, **headers: str) -> JSONResponse:
        return JSONResponse(
            status_code=status, content=error_body(request.url.path, problems, kind=kind), headers=headers or None
        )

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                problems.append(f"body: not valid JSON ({(err.get('ctx') or {}).get('error', 'decode error')})")
                continue
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return problem(request, 422, problems, "invalid_request_error")

    @app.exception_handler(OverCapError)
    async def _over_cap(request: Request, exc: OverCapError) -> JSONResponse:
        return problem(request, 422, [str(exc)], "invalid_request_error")

    @app.exception_handler(QueueFullError)
    async def _busy(request: Request, exc: QueueFullError) -> JSONResponse:
        return problem(request, 429, [str(exc)], "rate_limit_error", **{"retry-after": "5"})

    @app.exception_handler(ContextTooLongError)
    async def _too_long(request: Request, exc: ContextTooLongError) -> JSONResponse:
        return problem(request, 400, [str(exc)], "invalid_request_error")

    @app.exception_handler(EngineDownError)
    async def _down(request: Request, exc: EngineDownError) -> JSONResponse:
        return problem(request, 503, [str(exc)], "server_error")

    @app.exception_handler(GenerationFailedError)
    async def _failed(request: Request, exc: GenerationFailedError) -> JSONResponse:
        return problem(request, 400, [str(exc)], "invalid_request_error")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": name,
            "max_new_tokens_cap": max_new_tokens_cap,
            "mode": service.mode,
            "queue": {"running": service.running, "waiting": service.waiting, "max_waiting": max_queue},
        }

    @app.get("/ready")
    def ready() -> JSONResponse:
        ok = service.ready()
        return JSONResponse(status_code=200 if ok else 503, content={"ready": ok, "model": name, "mode": service.mode})

    @app.get("/metrics")
    def metrics() -> Any:
        from fastapi.responses import PlainTextResponse

        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/score", response_model=ScoreResponse, responses={400: {}, 401: {}, 413: {}, 422: {}, 429: {}})
    async def score(request: ScoreRequest) -> Any:
        n = generator.check_tokens(request.max_new_tokens, "max_new_tokens")
        answer = await service.answer(request.chat(), n)
        return ScoreResponse(
            output=answer.content,
            analysis=answer.reasoning,
            valid=answer.valid,
            parse_error=answer.parse_error,
            completion=answer.completion,
        )

    add_openai_routes(app, service, name)
    return app


def kv_plan(model: Any, cfg: Any, max_running: int, max_model_len: int) -> Any:
    """The paged KV cache's size from the card (cluster.gpu_memory_gib when serving a point), or None when the
    model cannot be batched (the Service then says why)."""
    from gptoss_hpc.serving.batching import batching_problem, plan_kv_cache

    if batching_problem(model) is not None:
        return None
    capacity = None
    if cfg is not None:
        from gptoss_hpc.config.memory import gpu_memory_gib

        capacity = gpu_memory_gib(cfg)
    device = next(model.parameters()).device
    return plan_kv_cache(
        model, max_running=max_running, max_context=max_model_len, capacity_gib=capacity, device=device
    )


def default_model_name(model_dir: str | os.PathLike[str]) -> str:
    """The id /v1/models lists: ``<experiment>/pNNN`` for a run's ``logs/<experiment>/<ts>/pNNN/merged`` (or
    ``adapter``),
    else the folder's name."""
    folder = Path(model_dir).resolve()
    if folder.name in ("merged", "adapter") and len(folder.parents) >= 3:
        return f"{folder.parents[2].name}/{folder.parent.name}"
    return folder.name


def serve(
    model_dir: str | os.PathLike[str],
    host: str,
    port: int,
    max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP,
    *,
    api_key: str | None = None,
    before_run: Callable[[], None] | None = None,
    **options: Any,
) -> None:
    """Run uvicorn on ``host:port`` until stopped; refuses a non-loopback host without an API key.
    ``options``: create_app's (max_queue, max_request_bytes, served_model_name); ``before_run`` is called
    once the model is loaded, right before uvicorn takes over the signals."""
    import uvicorn

    require_key_off_loopback(host, api_key)
    app = create_app(model_dir, max_new_tokens_cap, api_key=api_key, **options)
    log.info("API key %s", "required on every path but /health" if api_key else "not required (loopback only)")
    if before_run is not None:
        before_run()
    uvicorn.run(app, host=host, port=port, log_level="info")
