"""A FAKE Hugging Face Hub: a folder served over HTTP on 127.0.0.1, for the real huggingface_hub client.

Point the client at it with HF_ENDPOINT=<url>. It answers the few endpoints `snapshot_download` uses:
repo info (`/api/{models,datasets}/<id>/revision/<rev>`) and file download
(`[/datasets]/<id>/resolve/<rev>/<file>`, HEAD and GET), with the headers the client reads
(X-Repo-Commit, ETag, Content-Length) and the Hub's error codes (X-Error-Code: GatedRepo / RepoNotFound /
RevisionNotFound). A repo listed in `gated` answers only requests bearing `Authorization: Bearer <token>`.
Every request is recorded in `requests`, so a test can show that jobs never called it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class FakeHub:
    root: Path  # <root>/models/<org>/<name>/... and <root>/datasets/<org>/<name>/...
    gated: dict[str, str] = field(default_factory=dict)  # repo id -> the token that may read it
    requests: list[str] = field(default_factory=list)
    url: str = ""

    def repo_dir(self, kind: str, repo_id: str) -> Path:
        return self.root / kind / repo_id

    @staticmethod
    def sha(repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _route(self) -> tuple[str, str, str, str | None] | None:
            """(kind, repo_id, revision, file; None for repo info, "/tree" for the file listing)."""
            parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
            if parts[:1] == ["api"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                return parts[1], f"{parts[2]}/{parts[3]}", parts[5], None if parts[4] == "revision" else "/tree"
            kind = "models"
            if parts[:1] == ["datasets"]:
                kind, parts = "datasets", parts[1:]
            if len(parts) >= 5 and parts[2] == "resolve":
                return kind, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            return None

        def _serve(self) -> None:
            hub.requests.append(f"{self.command} {self.path}")
            route = self._route()
            if route is None:
                return self._error(404, "EntryNotFound", f"fake hub has no route for {self.path}")
            kind, repo_id, revision, filename = route
            repo = hub.repo_dir(kind, repo_id)
            if not repo.is_dir():
                return self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
            if repo_id in hub.gated and self.headers.get("Authorization") != f"Bearer {hub.gated[repo_id]}":
                return self._error(
                    403, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it."
                )
            if revision not in ("main", hub.sha(repo_id)):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            files = sorted(p for p in repo.rglob("*") if p.is_file())
            if filename is None:
                body = json.dumps(
                    {
                        "id": repo_id,
                        "sha": hub.sha(repo_id),
                        "private": False,
                        "gated": repo_id in hub.gated,
                        "siblings": [{"rfilename": str(f.relative_to(repo))} for f in files],
                    }
                ).encode()
                headers = {"Content-Type": "application/json"}
            elif filename == "/tree":
                body = json.dumps(
                    [
                        {
                            "type": "file",
                            "path": str(f.relative_to(repo)),
                            "size": f.stat().st_size,
                            "oid": hashlib.sha1(f.read_bytes()).hexdigest(),
                        }
                        for f in files
                    ]
                ).encode()
                headers = {"Content-Type": "application/json"}
            else:
                path = repo / filename
                if not path.is_file():
                    return self._error(404, "EntryNotFound", f"{filename} does not exist in {repo_id}")
                body = path.read_bytes()
                headers = {
                    "X-Repo-Commit": hub.sha(repo_id),
                    "ETag": f'"{hashlib.sha1(body).hexdigest()}"',
                    "Content-Type": "application/octet-stream",
                }
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = _serve
        do_HEAD = _serve

    return Handler


@contextmanager
def serve(hub: FakeHub) -> Iterator[FakeHub]:
    """Serve `hub` on 127.0.0.1 (a free port) until the block ends; then the address refuses connections."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
