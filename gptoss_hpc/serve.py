"""Serve a merged gpt-oss model over HTTP: FastAPI + uvicorn, Harmony output split into analysis/final.

    python -m gptoss_hpc.serve logs/demo/20261125-081500/p000/merged --port 8000
    python -m gptoss_hpc.serve logs/demo/20261125-081500/p000/config.yaml      # serves that point's merged/

    curl -s localhost:8000/health
    curl -s localhost:8000/score -H 'content-type: application/json' \
        -d '{"messages": [{"role": "system", "content": "reasoning language: German"},
                          {"role": "user", "content": "¿Cuál es el capital de Australia?"}], "max_new_tokens": 128}'
    curl -s localhost:8000/score -H 'content-type: application/json' -d '{"prompt": "Hi!", "max_new_tokens": 64}'

``POST /score`` answers ``{"output": <final channel>, "analysis": <analysis channel>, "valid": bool, ...}``;
a completion that is not valid Harmony comes back as plain text in ``output`` with ``valid: false``.
Malformed requests get a 4xx with a message and the server keeps serving. As a Slurm job,
``serve_job(config_path)`` serves the point's ``merged/`` and prints ``host:port`` to its log.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from gptoss_hpc.errors import GptossHpcError

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_MAX_NEW_TOKENS_CAP = 2048
DEFAULT_PORT = 8000


class ServeError(GptossHpcError):
    """The model folder cannot be served (missing, not a model, no free port)."""


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


def load_model(model_dir: str | os.PathLike[str]) -> tuple[Any, Any]:
    """(model, tokenizer) from a merged folder; on the GPU when there is one."""
    from transformers import AutoTokenizer

    from gptoss_hpc.modeling.model import load_inference_model

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise ServeError(f"{folder} holds no model (config.json missing): give a merged/ folder")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return load_inference_model(folder), tokenizer


def create_app(
    model_dir: str | os.PathLike[str],
    max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP,
    *,
    do_sample: bool = False,
) -> Any:
    """The FastAPI app serving ``model_dir`` (loaded now, so a bad folder fails before serving)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from gptoss_hpc.harmony import generate_completion, parse_completion

    model, tokenizer = load_model(model_dir)
    lock = threading.Lock()  # one generate at a time: the model is not re-entrant
    app = FastAPI(title="gptoss_hpc serve", description=f"serving {model_dir}")

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                problems.append(f"body: not valid JSON ({(err.get('ctx') or {}).get('error', 'decode error')})")
                continue
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return _problem(422, problems)

    def _problem(status: int, problems: list[str]) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": "invalid request", "problems": problems})

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": str(model_dir), "max_new_tokens_cap": max_new_tokens_cap}

    @app.post("/score", response_model=ScoreResponse, responses={400: {}, 422: {}})
    def score(request: ScoreRequest) -> Any:
        n = request.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, max_new_tokens_cap)
        if n > max_new_tokens_cap:
            return _problem(422, [f"max_new_tokens: {n} is over this server's cap of {max_new_tokens_cap}"])
        try:
            with lock:
                text = generate_completion(model, tokenizer, request.chat(), max_new_tokens=n, do_sample=do_sample)
        except Exception as exc:  # e.g. the chat template rejecting a conversation: the client's input
            log.warning("generation failed: %s", exc)
            return _problem(400, [f"cannot generate for this input: {exc}"])
        parsed = parse_completion(text)
        if parsed.valid:
            output = parsed.final or ""
        else:
            output = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=True)
        return ScoreResponse(
            output=output, analysis=parsed.analysis, valid=parsed.valid, parse_error=parsed.error, completion=text
        )

    return app


def free_port(host: str, start: int = DEFAULT_PORT, tries: int = 100) -> int:
    """The first port from ``start`` that can be bound on ``host``."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise ServeError(f"no free port in {start}..{start + tries - 1} on {host}")


def serve(model_dir: str | os.PathLike[str], host: str, port: int, max_new_tokens_cap: int) -> None:
    import uvicorn

    app = create_app(model_dir, max_new_tokens_cap)
    uvicorn.run(app, host=host, port=port, log_level="info")


def serve_job(config_path: str | os.PathLike[str]) -> None:
    """Job body: serve the point's merged/ on a free port (from $GPTOSS_SERVE_PORT or 8000), print
    ``host:port`` to the job log and record it in status/serve.json. Runs until the job is cancelled."""
    from gptoss_hpc.stages.common import run_stage, write_status

    def body(cfg: Any, paths: Any) -> None:
        host = os.environ.get("GPTOSS_SERVE_HOST", "0.0.0.0")
        port = free_port(host, int(os.environ.get("GPTOSS_SERVE_PORT", DEFAULT_PORT)))
        address = f"{socket.gethostname()}:{port}"
        write_status(paths, "serve", "RUNNING", address=address, model=str(paths.merged))
        print(address, flush=True)
        log.info("serving %s at http://%s", paths.merged, address)
        # uvicorn shuts down gracefully on SIGTERM/SIGINT and then re-raises the signal; a job's normal end
        # is scancel, so take that re-raised signal here and let the stage end as COMPLETED.
        stopped = {sig: signal.signal(sig, _log_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            serve(paths.merged, host, port, max(DEFAULT_MAX_NEW_TOKENS_CAP, cfg.eval.max_new_tokens))
        finally:
            for sig, handler in stopped.items():
                signal.signal(sig, handler)

    run_stage("serve", config_path, body)


def _log_stop(sig: int, _frame: Any) -> None:
    log.info("server stopped by %s", signal.Signals(sig).name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptoss_hpc.serve", description="Serve a merged gpt-oss model.")
    parser.add_argument("model", help="a merged model folder, or a point's config.yaml (serves its merged/)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--max-new-tokens-cap", type=int, default=DEFAULT_MAX_NEW_TOKENS_CAP)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.model.endswith((".yaml", ".yml")):
            serve_job(args.model)
        else:
            print(f"{args.host}:{args.port}", flush=True)
            serve(args.model, args.host, args.port, args.max_new_tokens_cap)
    except GptossHpcError as exc:
        print(f"serve failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
