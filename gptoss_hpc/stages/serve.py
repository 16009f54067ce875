"""Serve a merged gpt-oss model over HTTP: FastAPI + uvicorn, an OpenAI-compatible chat endpoint and the
Azure-style ``/score``, Harmony output split into analysis/final, an API key off loopback.

    python -m gptoss_hpc.serve logs/demo/20261125-081500/p000/merged --port 8000        # 127.0.0.1, no key
    SERVE_API_KEY=$(openssl rand -hex 24) python -m gptoss_hpc.serve logs/demo/…/p000/merged --host 0.0.0.0
    python -m gptoss_hpc.serve logs/demo/20261125-081500/p000/config.yaml   # as the Slurm stage: node address, key
    python -m gptoss_hpc.serve logs/demo/20261125-081500 --best   # the point with the lowest held-out loss

    curl -s localhost:8000/health
    curl -s localhost:8000/v1/models -H "Authorization: Bearer $SERVE_API_KEY"
    curl -s localhost:8000/v1/chat/completions -H "Authorization: Bearer $SERVE_API_KEY" \
        -H 'content-type: application/json' -d '{"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 64}'
    curl -s localhost:8000/score -H "api-key: $SERVE_API_KEY" -H 'content-type: application/json' \
        -d '{"messages": [{"role": "system", "content": "reasoning language: German"},
                          {"role": "user", "content": "¿Cuál es el capital de Australia?"}], "max_new_tokens": 128}'

``POST /v1/chat/completions`` answers OpenAI's ``chat.completion`` with the final channel as ``content`` and
the analysis channel as ``reasoning_content``; ``POST /score`` answers ``{"output": <final>, "analysis":
<analysis>, "valid": bool, ...}``. A completion that is not valid Harmony comes back as plain text. Every
path but ``/health`` needs the key when the server has one (``Authorization: Bearer`` or ``api-key``).
Malformed or empty requests get a 4xx with a message (422), a full queue 429, a body over the limit 413,
and the server keeps serving. As a Slurm job, ``main(config_path)`` serves the point's ``merged/``,
prints ``host:port`` to its log and records the URL and where the key is in ``status/serve.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.serving.app import (
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_MAX_NEW_TOKENS_CAP,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_RUNNING,
    DEFAULT_PORT,
    serve,
)
from gptoss_hpc.serving.auth import API_KEY_ENV, require_key_off_loopback, resolve_api_key


def main(config_path: str | os.PathLike[str], **options: Any) -> None:
    """Job body (the Slurm serve stage): serve the point's merged/ on this node's address with an API key;
    see gptoss_hpc.serving.job.serve_job."""
    from gptoss_hpc.serving.job import serve_job

    serve_job(config_path, **options)


def best_point_config(run_dir: str | os.PathLike[str]) -> Path:
    """The config.yaml of the launch's point with the lowest held-out loss, as the report picks it; prints which
    and why."""
    from gptoss_hpc.paths import RunPaths
    from gptoss_hpc.stages.report import ReportError, best_point, summarize_point
    from gptoss_hpc.submission.manifest import Manifest

    run = RunPaths(Path(run_dir).resolve())
    try:
        manifest = Manifest.load(run.root)
    except GptossHpcError as exc:
        raise ReportError(f"--best needs a launch directory (logs/<name>/<ts>): {exc}") from exc
    points = [summarize_point(run, manifest, record) for record in sorted(manifest.points, key=lambda r: r.index)]
    best = best_point(points)
    if best is None:
        raise ReportError(
            f"no point of {run.root} has a held-out loss (eval/eval.json): nothing to choose; serve a point's "
            "config.yaml or merged/ folder instead"
        )
    scored = sorted((p for p in points if p.metric("loss") is not None), key=lambda p: p.metric("loss") or 0.0)
    others = ", ".join(f"{p.dir} {p.metric('loss'):.4f}" for p in scored[1:4])
    print(
        f"serving {best.dir} ({' '.join(best.overrides) or 'no overrides'}): lowest held-out loss "
        f"{best.metric('loss'):.4f} of {len(scored)} scored point(s)" + (f"; next: {others}" if others else ""),
        flush=True,
    )
    return run.root / best.dir / "config.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gptoss_hpc.serve", description="Serve a merged gpt-oss model.")
    p.add_argument(
        "model",
        help="a merged or adapter folder, a point's config.yaml (serves what its eval.model names), or with --best "
        "a launch directory logs/<name>/<ts>",
    )
    p.add_argument(
        "--best",
        action="store_true",
        help="MODEL is a launch directory: serve its point with the lowest held-out loss (the report's choice)",
    )
    p.add_argument("--host", help="address to bind (default 127.0.0.1; for a config.yaml: this node's address)")
    p.add_argument("--port", type=int, help=f"default {DEFAULT_PORT} (for a config.yaml: the first free one from it)")
    p.add_argument(
        "--api-key-file",
        help=f"file (mode 600) holding the API key; default ${API_KEY_ENV}. Required off loopback",
    )
    p.add_argument(
        "--max-new-tokens-cap",
        type=int,
        help=f"most new tokens a request may ask (default {DEFAULT_MAX_NEW_TOKENS_CAP})",
    )
    p.add_argument(
        "--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="requests that may wait for the model; more get 429"
    )
    p.add_argument(
        "--max-running", type=int, default=DEFAULT_MAX_RUNNING, help="requests decoded together (continuous batching)"
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=DEFAULT_MAX_MODEL_LEN,
        help="prompt + new tokens of one request (sizes the KV cache); longer requests get 400",
    )
    p.add_argument("--no-batching", action="store_true", help="one request at a time (no continuous batching)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, help="larger bodies get 413")
    p.add_argument(
        "--served-model-name", help="the model id of /v1/models (default: <experiment>/pNNN or the folder name)"
    )
    return p


def cli(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = {
        "max_queue": args.max_queue,
        "max_request_bytes": args.max_request_bytes,
        "served_model_name": args.served_model_name,
        "max_running": args.max_running,
        "max_model_len": args.max_model_len,
        "batching": not args.no_batching,
    }
    try:
        if args.best:
            args.model = str(best_point_config(args.model))
        if args.model.endswith((".yaml", ".yml")):
            main(
                args.model,
                host=args.host,
                port=args.port,
                api_key_file=args.api_key_file,
                max_new_tokens_cap=args.max_new_tokens_cap,
                **options,
            )
        else:
            host, port = args.host or "127.0.0.1", args.port or DEFAULT_PORT
            api_key = resolve_api_key(args.api_key_file)
            require_key_off_loopback(host, api_key)
            print(f"{host}:{port}", flush=True)
            cap = args.max_new_tokens_cap or DEFAULT_MAX_NEW_TOKENS_CAP
            serve(args.model, host, port, cap, api_key=api_key, **options)
    except GptossHpcError as exc:
        print(f"serve failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
