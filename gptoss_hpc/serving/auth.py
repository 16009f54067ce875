"""API keys for the server: where the key comes from, when one is required, and the ASGI guard that checks
it (``Authorization: Bearer <key>`` or Azure's ``api-key: <key>``) and caps the request body size.

The key's value is never logged or written anywhere except the job's own 0600 key file.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gptoss_hpc.errors import GptossHpcError

log = logging.getLogger(__name__)

API_KEY_ENV = "SERVE_API_KEY"
# Paths any client may reach without a key: a liveness probe carries no secret.
OPEN_PATHS = frozenset({"/health"})

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ServeError(GptossHpcError):
    """The model folder cannot be served (missing, not a model, no free port, no API key where one is needed)."""


def read_key_file(path: str | os.PathLike[str]) -> str:
    """The key in ``path`` (surrounding whitespace stripped); refused when empty or readable by others."""
    file = Path(path)
    try:
        mode = file.stat().st_mode
        key = file.read_text().strip()
    except OSError as exc:
        raise ServeError(f"cannot read the API key file {file}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ServeError(f"API key file {file} is readable by others (mode {stat.S_IMODE(mode):o}): chmod 600 {file}")
    if not key:
        raise ServeError(f"API key file {file} is empty: write the key into it")
    return key


def resolve_api_key(key_file: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> str | None:
    """``--api-key-file`` when given, else $SERVE_API_KEY, else None (no key)."""
    if key_file:
        return read_key_file(key_file)
    value = (os.environ if env is None else env).get(API_KEY_ENV, "").strip()
    return value or None


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback one (127.0.0.0/8, ::1); 0.0.0.0 is not."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def require_key_off_loopback(host: str, api_key: str | None) -> None:
    if api_key is None and not is_loopback(host):
        raise ServeError(
            f"refusing to serve on {host} without an API key: anyone who can reach it could use the model. "
            f"export {API_KEY_ENV}=<key> or pass --api-key-file PATH (a mode-600 file), or bind --host 127.0.0.1"
        )


def job_api_key(key_file: Path, env: Mapping[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """The serve job's key and where a client finds it: $SERVE_API_KEY of the submitting shell, else a key
    generated into ``key_file`` (mode 600 from its creation; reused when a requeued job finds it)."""
    value = (os.environ if env is None else env).get(API_KEY_ENV, "").strip()
    if value:
        return value, {"api_key_source": API_KEY_ENV}
    if key_file.is_file():
        return read_key_file(key_file), {"api_key_source": "file", "api_key_file": str(key_file)}
    key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    tmp = key_file.with_name(f".{key_file.name}.{os.getpid()}.tmp")
    # O_EXCL + 0600 at creation: the key is never in a file anyone else could open, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, key_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("generated an API key into %s (mode 600)", key_file)
    return key, {"api_key_source": "file", "api_key_file": str(key_file)}


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key a request carries: ``Authorization: Bearer <key>`` or ``api-key: <key>``."""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif lowered == b"api-key" and value.strip():
            return value.decode("latin-1").strip()
    return None


# The short error word of this server's own {error, problems} shape (what /score's clients already read).
_SHORT = {
    "invalid_request_error": "invalid request",
    "authentication_error": "unauthorized",
    "rate_limit_error": "server busy",
}


def error_body(path: str, problems: list[str], *, kind: str, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape on /v1/* (what its clients parse), ``{"error", "problems"}`` elsewhere."""
    if path.startswith("/v1/"):
        return {"error": {"message": "; ".join(problems), "type": kind, "param": None, "code": code}}
    return {"error": _SHORT.get(kind, kind), "problems": problems}


class RequestGuard:
    """ASGI middleware: 401 without the right key (when the server has one), 413 for a body over
    ``max_body_bytes``. The body is read here (bounded) and replayed to the app."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self._key is not None and path not in OPEN_PATHS:
            given = presented_key(scope.get("headers", []))
            if given is None or not hmac.compare_digest(given.encode(), self._key):
                message = (
                    "missing API key: send 'Authorization: Bearer <key>' or 'api-key: <key>'"
                    if given is None
                    else "wrong API key"
                )
                await _respond(
                    send,
                    401,
                    error_body(path, [message], kind="authentication_error", code="invalid_api_key"),
                    extra=[(b"www-authenticate", b"Bearer")],
                )
                return
        body, too_big = await _read_body(receive, self.max_body_bytes, scope.get("headers", []))
        if too_big:
            message = f"request body is over this server's limit of {self.max_body_bytes} bytes"
            await _respond(send, 413, error_body(path, [message], kind="invalid_request_error"))
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _read_body(receive: Receive, limit: int, headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
    for name, value in headers:
        if name.lower() == b"content-length" and value.isdigit() and int(value) > limit:
            return b"", True
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", True
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks), False


async def _respond(send: Send, status: int, body: dict[str, Any], extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
