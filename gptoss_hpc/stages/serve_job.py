"""The serve stage as a job: bind this node's address on a free port, always with an API key (the
submitting shell's $SERVE_API_KEY, else one generated into ``pNNN/serve/api_key``, mode 600), record the URL
and where the key is (never the key) in ``status/serve.json``, and end COMPLETED on scancel."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from gptoss_hpc.config.derive import eval_model
from gptoss_hpc.serving.app import DEFAULT_MAX_NEW_TOKENS_CAP, DEFAULT_PORT, default_model_name, serve
from gptoss_hpc.serving.auth import API_KEY_ENV, ServeError, job_api_key, read_key_file
from gptoss_hpc.stages.common import run_stage, write_status

log = logging.getLogger(__name__)


def free_port(host: str, start: int = DEFAULT_PORT, tries: int = 100) -> int:
    """The first port from ``start`` that can be bound on ``host``."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise ServeError(f"no free port in {start}..{start + tries - 1} on {host}")


def node_address() -> str:
    """The IPv4 address other nodes reach this one at: a non-loopback address of its hostname, else the
    interface of the default route (Debian maps the hostname to 127.0.1.1), else loopback (a one-box cluster)."""
    try:
        addresses = [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    except OSError:
        addresses = []
    for address in addresses:
        if not ipaddress.ip_address(address).is_loopback:
            return address
    # UDP connect sends nothing; it only picks the outgoing interface. Two targets: a route may miss one.
    for target in ("10.254.254.254", "8.8.8.8"):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((target, 9))
                address = s.getsockname()[0]
        except OSError:
            continue
        if not ipaddress.ip_address(address).is_loopback:
            return address
    return addresses[0] if addresses else "127.0.0.1"


def serve_job(
    config_path: str | os.PathLike[str],
    *,
    host: str | None = None,
    port: int | None = None,
    api_key_file: str | None = None,
    **options: Any,
) -> None:
    """Job body: serve the point's merged/ on this node's address ($GPTOSS_SERVE_HOST overrides) and a free
    port from $GPTOSS_SERVE_PORT or 8000, always with an API key: --api-key-file, else $SERVE_API_KEY of the
    submitting shell, else one generated into ``pNNN/serve/api_key`` (mode 600). Prints ``host:port`` to
    the job log and records the URL and where the key is (never the key) in status/serve.json."""

    def body(cfg: Any, paths: Any) -> None:
        # A job's normal end is scancel. Until uvicorn runs (choosing a port, loading the model), SIGTERM and
        # SIGINT stop the job here; uvicorn then handles them itself, shuts down gracefully and re-raises the
        # signal, which is taken here. Either way the stage ends as COMPLETED.
        serving = threading.Event()

        def on_signal(sig: int, _frame: Any) -> None:
            if not serving.is_set():
                raise _StoppedBeforeServing(signal.Signals(sig).name)
            log.info("server stopped by %s", signal.Signals(sig).name)

        stopped = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            _serve_point(cfg, paths, host, port, api_key_file, serving.set, dict(options))
        except _StoppedBeforeServing as stop:
            log.info("stopped by %s before serving", stop)
        finally:
            for sig, handler in stopped.items():
                signal.signal(sig, handler)

    run_stage("serve", config_path, body)


def _serve_point(  # the job body proper, under serve_job's signal handling
    cfg: Any,
    paths: Any,
    host: str | None,
    port: int | None,
    api_key_file: str | None,
    before_run: Callable[[], None],
    options: dict[str, Any],
) -> None:
    # eval.model=adapter (auto with model.experts_dtype=mxfp4): the base + adapter/ unmerged, as eval runs it
    folder = paths.adapter if eval_model(cfg) == "adapter" else paths.merged
    bind = host or os.environ.get("GPTOSS_SERVE_HOST") or node_address()
    bound_port = free_port(bind, port or int(os.environ.get("GPTOSS_SERVE_PORT", DEFAULT_PORT)))
    if api_key_file:
        key, where = read_key_file(api_key_file), {"api_key_source": "file", "api_key_file": str(api_key_file)}
    else:
        key, where = job_api_key(paths.root / "serve" / "api_key")
    name = options.pop("served_model_name", None) or default_model_name(folder)
    address = f"{socket.gethostname()}:{bound_port}"
    url_host = socket.gethostname() if bind in ("0.0.0.0", "::") else bind
    url = f"http://{url_host}:{bound_port}/v1"
    write_status(
        paths,
        "serve",
        "RUNNING",
        address=address,
        url=url,
        model=name,
        merged=str(folder),
        served_from=folder.name,
        **where,
    )
    print(address, flush=True)
    log.info("serving %s as %r at %s; API key: %s", folder, name, url, where.get("api_key_file", API_KEY_ENV))
    cap = options.pop("max_new_tokens_cap", None) or max(DEFAULT_MAX_NEW_TOKENS_CAP, cfg.eval.max_new_tokens)
    serve(
        folder,
        bind,
        bound_port,
        cap,
        api_key=key,
        served_model_name=name,
        before_run=before_run,
        cfg=cfg,
        **options,
    )


class _StoppedBeforeServing(BaseException):  # a BaseException: no `except Exception` in loading code eats it
    """SIGTERM/SIGINT arrived while the job was still loading the model."""
