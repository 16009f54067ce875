"""The HTTP server on a real (tiny, random) gpt-oss saved to disk, through fastapi's TestClient."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptoss_hpc.config import compose, to_run_config

CAP = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A merged-style folder: tiny gpt-oss (tiny-bpe vocab) + tokenizer with the gpt-oss chat template."""
    from gptoss_hpc.modeling.model import build_tiny_model
    from gptoss_hpc.modeling.tokenizer import load_tokenizer

    cfg = to_run_config(compose(["experiment=demo", "model.tokenizer=tiny-bpe"]))
    out = tmp_path_factory.mktemp("merged")
    build_tiny_model(cfg).save_pretrained(str(out))
    load_tokenizer(cfg.model).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def client(model_dir: Path):
    from fastapi.testclient import TestClient

    from gptoss_hpc.serve import create_app

    with TestClient(create_app(model_dir, max_new_tokens_cap=CAP)) as c:
        yield c


def _check_answer(r) -> dict:
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["output"], str) and isinstance(body["analysis"], str)
    assert isinstance(body["valid"], bool)
    return body


def test_health(client, model_dir):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": str(model_dir), "max_new_tokens_cap": CAP}


def test_both_payload_shapes_answer(client):
    chat = {
        "messages": [
            {"role": "system", "content": "reasoning language: German"},
            {"role": "user", "content": "¿Cuál es el capital de Australia?"},
        ],
        "max_new_tokens": 8,
    }
    _check_answer(client.post("/score", json=chat))
    _check_answer(client.post("/score", json={"prompt": "What is 2 + 2?", "max_new_tokens": 8}))
    # no max_new_tokens: the default, lowered to the server's cap
    _check_answer(client.post("/score", json={"prompt": "no max_new_tokens given"}))


def test_harmony_output_is_split_into_channels(model_dir, monkeypatch):
    """The random model cannot write Harmony, so make generate return a fixed Harmony completion and check
    that /score splits it (the parsing path is the real one)."""
    from fastapi.testclient import TestClient

    from gptoss_hpc import serve

    completion = (
        "<|channel|>analysis<|message|>Die Hauptstadt ist Canberra.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Canberra.<|return|>"
    )
    monkeypatch.setattr("gptoss_hpc.harmony.generate_completion", lambda *a, **k: completion)
    with TestClient(serve.create_app(model_dir, max_new_tokens_cap=CAP)) as c:
        body = _check_answer(c.post("/score", json={"prompt": "Hauptstadt?", "max_new_tokens": 4}))
    assert body["valid"] and body["output"] == "Canberra." and body["analysis"] == "Die Hauptstadt ist Canberra."


MALFORMED = [
    ("content", b"{not json"),
    ("content", b""),
    ("content", b"null"),
    ("content", b"[1, 2, 3]"),
    ("content", b'"just a string"'),
    ("json", {}),
    ("json", {"max_new_tokens": 4}),  # neither messages nor prompt
    ("json", {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}),  # both
    ("json", {"prompt": 42}),
    ("json", {"prompt": ["a", "b"]}),
    ("json", {"prompt": "hi", "max_new_tokens": "ten"}),
    ("json", {"prompt": "hi", "max_new_tokens": 0}),
    ("json", {"prompt": "hi", "max_new_tokens": -5}),
    ("json", {"prompt": "hi", "max_new_tokens": CAP + 1}),  # over the cap
    ("json", {"prompt": "hi", "max_new_tokens": 10**9}),
    ("json", {"prompt": "hi", "max_new_tokens": 2.5}),
    ("json", {"messages": []}),
    ("json", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("json", {"messages": [{"role": "user"}]}),
    ("json", {"messages": "hello"}),
    ("json", {"prompt": "hi", "temperature": 0.7}),  # unknown field
]


def test_twenty_malformed_requests_then_a_valid_one(client):
    assert len(MALFORMED) >= 20
    for kind, payload in MALFORMED:
        if kind == "json":
            r = client.post("/score", json=payload)
        else:
            r = client.post("/score", content=payload, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (payload, r.status_code, r.text)
        body = r.json()
        message = json.dumps(body)
        assert body["error"] == "invalid request" and body["problems"], body
        assert all(isinstance(p, str) and len(p) > 10 for p in body["problems"]), message
    over = client.post("/score", json={"prompt": "hi", "max_new_tokens": CAP + 1})
    assert "cap of 16" in over.json()["problems"][0]
    assert "not valid JSON" in client.post("/score", content=b"{x", headers={"content-type": "application/json"}).text
    both = client.post("/score", json={"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]})
    assert "exactly one" in json.dumps(both.json())
    _check_answer(client.post("/score", json={"prompt": "still there?", "max_new_tokens": 4}))


def test_missing_model_dir_fails_before_serving(tmp_path: Path):
    from gptoss_hpc.serve import ServeError, create_app

    with pytest.raises(ServeError, match=r"config\.json"):
        create_app(tmp_path)


def test_free_port_skips_a_taken_one():
    import socket

    from gptoss_hpc.serve import free_port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert free_port("127.0.0.1", taken) != taken


@pytest.mark.slow
def test_serve_job_prints_address_and_serves_a_point(model_dir: Path, tmp_path: Path):
    """`python -m gptoss_hpc.serve <point config.yaml>` as a job runs it: a real uvicorn process."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from gptoss_hpc.config import save_run_config
    from gptoss_hpc.paths import PointPaths

    paths = PointPaths(tmp_path / "p000")
    save_run_config(to_run_config(compose(["experiment=demo", "model.tokenizer=tiny-bpe"])), paths.config)
    shutil.copytree(model_dir, paths.merged)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GPTOSS_SERVE_HOST": "127.0.0.1", "GPTOSS_SERVE_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptoss_hpc.serve", str(paths.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address == f"{socket.gethostname()}:{port}"
        status = json.loads(paths.stage_status("serve").read_text())
        assert status["state"] == "RUNNING" and status["address"] == address
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        r = httpx.post(f"{url}/score", json={"prompt": "hi", "max_new_tokens": 4}, timeout=60)
        assert r.status_code == 200 and "output" in r.json()
        assert httpx.post(f"{url}/score", json={"prompt": 1}, timeout=10).status_code == 422
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert json.loads(paths.stage_status("serve").read_text())["state"] == "COMPLETED"
