"""The HTTP server on a real (tiny, random) gpt-oss saved to disk: fastapi's TestClient for the payload
rules, a real uvicorn on 127.0.0.1 for the real `openai` client, the API key and the bounded queue.

Faked: only the generation where a test needs a Harmony answer (the random model cannot write one) or a
slow one that fills the queue, injected through create_app's test-only `generate_for_tests` hook.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from gptoss_hpc.config import compose, to_run_config

CAP = 16
KEY = "serve-test-key-canary-0123456789abcdef"  # a canary: it must show up in no log and no file
AUTH = {"Authorization": f"Bearer {KEY}"}
HARMONY = (
    "<|channel|>analysis<|message|>Die Hauptstadt ist Canberra.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Canberra.<|return|>"
)


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

    from gptoss_hpc.serving.app import create_app

    with TestClient(create_app(model_dir, max_new_tokens_cap=CAP)) as c:
        yield c


def _check_answer(r) -> dict:
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["output"], str) and isinstance(body["analysis"], str)
    assert isinstance(body["valid"], bool)
    return body


@contextmanager
def running(app) -> Iterator[str]:
    """A real uvicorn serving ``app`` on a free 127.0.0.1 port, in a thread: yields its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_health(client, model_dir):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body.pop("mode").startswith("continuous batching")
    assert body == {
        "status": "ok",
        "model": model_dir.name,
        "max_new_tokens_cap": CAP,
        "queue": {"running": 0, "waiting": 0, "max_waiting": 32},
    }


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

    from gptoss_hpc.serving import app as serve

    completion = (
        "<|channel|>analysis<|message|>Die Hauptstadt ist Canberra.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Canberra.<|return|>"
    )
    monkeypatch.setattr("gptoss_hpc.modeling.harmony.generate_completion", lambda *a, **k: completion)
    with TestClient(serve.create_app(model_dir, max_new_tokens_cap=CAP, batching=False)) as c:
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
    ("json", {"prompt": ""}),  # empty prompt
    ("json", {"prompt": " \n\t"}),
    ("json", {"messages": [{"role": "system", "content": "reasoning language: German"}]}),  # no user turn
    ("json", {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "hi"}]}),
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
    assert "prompt is empty" in client.post("/score", json={"prompt": ""}).text
    no_user = client.post("/score", json={"messages": [{"role": "system", "content": "x"}]})
    assert no_user.status_code == 422 and "no user content" in no_user.text
    _check_answer(client.post("/score", json={"prompt": "still there?", "max_new_tokens": 4}))


def test_missing_model_dir_fails_before_serving(tmp_path: Path):
    from gptoss_hpc.serving.app import ServeError, create_app

    with pytest.raises(ServeError, match=r"config\.json"):
        create_app(tmp_path)


def test_free_port_skips_a_taken_one():
    import socket

    from gptoss_hpc.serving.job import free_port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert free_port("127.0.0.1", taken) != taken


# ------------------------------------------------------------------------- OpenAI API, key, queue


@pytest.fixture(scope="module")
def keyed_url(model_dir: Path) -> Iterator[str]:
    """The tiny merged model behind a real uvicorn that requires KEY."""
    from gptoss_hpc.serving.app import create_app

    with running(create_app(model_dir, max_new_tokens_cap=CAP, api_key=KEY)) as url:
        yield url


def test_openai_client_chats_with_the_merged_model(keyed_url: str, model_dir: Path):
    import openai

    client = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=KEY, max_retries=0)
    (model,) = client.models.list().data
    assert model.id == model_dir.name
    messages = [
        {"role": "system", "content": "reasoning language: German"},
        {"role": "user", "content": "¿Cuál es el capital de Australia?"},
    ]
    chat = client.chat.completions.create(model=model.id, messages=messages, max_tokens=8)
    (choice,) = chat.choices
    assert chat.object == "chat.completion" and chat.model == model.id
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    # greedy decoding: the same answer as the Azure-style /score route gives for the same chat
    score = httpx.post(f"{keyed_url}/score", json={"messages": messages, "max_new_tokens": 8}, headers=AUTH)
    assert score.status_code == 200 and choice.message.content == score.json()["output"]
    stream = client.chat.completions.create(model=model.id, messages=messages, max_tokens=8, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    # the caps and the empty-input rules, as the client sees them
    with pytest.raises(openai.UnprocessableEntityError, match="cap of 16"):
        client.chat.completions.create(model=model.id, messages=messages, max_tokens=CAP + 1)
    with pytest.raises(openai.UnprocessableEntityError, match="no user content"):
        client.chat.completions.create(model=model.id, messages=[{"role": "system", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=messages)


def test_requests_without_the_key_get_401(keyed_url: str, caplog: pytest.LogCaptureFixture):
    import openai

    for key in ("wrong-key", KEY[:-1]):
        bad = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for path, body in (("/v1/chat/completions", chat), ("/score", {"prompt": "hi"}), ("/v1/models", None)):
        r = httpx.post(f"{keyed_url}{path}", json=body) if body else httpx.get(f"{keyed_url}{path}")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
        assert "missing API key" in r.text
    assert httpx.get(f"{keyed_url}/openapi.json").status_code == 401
    assert httpx.get(f"{keyed_url}/health").status_code == 200  # the liveness probe needs no key
    # Azure's header works too, and a Bearer scheme in any case
    assert httpx.post(
        f"{keyed_url}/score", json={"prompt": "hi", "max_new_tokens": 2}, headers={"api-key": KEY}
    ).is_success
    lower = {"authorization": f"bearer {KEY}"}
    assert httpx.post(f"{keyed_url}/score", json={"prompt": "hi", "max_new_tokens": 2}, headers=lower).is_success
    assert KEY not in caplog.text


def test_chat_completion_splits_harmony_channels_and_passes_sampling(model_dir: Path):
    """The random model cannot write Harmony: a stand-in generation answers with a fixed Harmony completion
    and records the sampling it was asked for; the splitting and the OpenAI shapes are the real ones."""
    import openai

    from gptoss_hpc.serving.app import create_app

    seen: list[tuple[int, bool, float]] = []

    def harmony_generate_for_tests(model, tokenizer, messages, *, max_new_tokens, do_sample):
        seen.append((max_new_tokens, do_sample, model.generation_config.temperature))
        return HARMONY

    app = create_app(model_dir, max_new_tokens_cap=CAP, api_key=KEY, generate_for_tests=harmony_generate_for_tests)
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        messages = [{"role": "user", "content": [{"type": "text", "text": "Hauptstadt?"}]}]
        chat = client.chat.completions.create(model=model_dir.name, messages=messages, max_tokens=4, temperature=0.7)
        message = chat.choices[0].message
        assert message.content == "Canberra." and message.reasoning_content == "Die Hauptstadt ist Canberra."
        assert chat.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(model=model_dir.name, messages=messages, stream=True))
        deltas = [c.choices[0].delta for c in chunks]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Die Hauptstadt ist Canberra."
        assert "".join(d.content or "" for d in deltas) == "Canberra."
    default_temperature = seen[1][2]
    assert seen[0] == (4, True, 0.7)  # sampled at the request's temperature ...
    assert seen[1] == (CAP, False, default_temperature) and default_temperature != 0.7  # ... then restored


def test_a_full_queue_answers_429_and_the_queued_requests_finish(model_dir: Path):
    import openai

    from gptoss_hpc.serving.app import create_app

    started, release = threading.Event(), threading.Event()

    def slow_generate_for_tests(model, tokenizer, messages, *, max_new_tokens, do_sample):
        started.set()
        assert release.wait(120), "the test never released the generation"
        return HARMONY

    app = create_app(
        model_dir, max_new_tokens_cap=CAP, api_key=KEY, max_queue=2, generate_for_tests=slow_generate_for_tests
    )
    with running(app) as url:
        codes: list[int] = []

        def post(i: int) -> None:
            r = httpx.post(f"{url}/score", json={"prompt": f"q{i}", "max_new_tokens": 2}, headers=AUTH, timeout=120)
            codes.append(r.status_code)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(3)]
        try:
            threads[0].start()
            assert started.wait(60)  # one request is generating ...
            for t in threads[1:]:
                t.start()
            deadline = time.monotonic() + 60
            while httpx.get(f"{url}/health").json()["queue"] != {"running": 1, "waiting": 2, "max_waiting": 2}:
                assert time.monotonic() < deadline, "the two requests never reached the queue"
                time.sleep(0.05)
            # ... two wait: the queue is full, the next request is refused at once
            full = httpx.post(f"{url}/score", json={"prompt": "one more"}, headers=AUTH)
            assert full.status_code == 429 and full.headers["retry-after"] == "5"
            assert full.json()["error"] == "server busy" and "2 request(s) already wait" in full.json()["problems"][0]
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model=model_dir.name, messages=[{"role": "user", "content": "hi"}])
        finally:
            release.set()  # also when an assertion failed: no request left hanging on the fake
        for t in threads:
            t.join(timeout=120)
        assert codes == [200, 200, 200]
        assert (
            client.chat.completions.create(model=model_dir.name, messages=[{"role": "user", "content": "hi"}])
            .choices[0]
            .message.content
            == "Canberra."
        )


def test_request_body_over_the_limit_gets_413(model_dir: Path):
    from fastapi.testclient import TestClient

    from gptoss_hpc.serving.app import create_app

    with TestClient(create_app(model_dir, max_new_tokens_cap=CAP, api_key=KEY, max_request_bytes=2048)) as c:
        big = {"prompt": "x" * 3000, "max_new_tokens": 2}
        assert c.post("/score", json=big).status_code == 401  # the key is checked before the body is read
        r = c.post("/score", json=big, headers=AUTH)
        assert r.status_code == 413 and "limit of 2048 bytes" in r.json()["problems"][0]
        chunked = c.post("/score", content=iter([b'{"prompt": "', b"y" * 3000, b'"}']), headers=AUTH)
        assert chunked.status_code == 413  # no content-length: counted while reading
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "z" * 3000}]}, headers=AUTH)
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        assert c.post("/score", json={"prompt": "x" * 1000, "max_new_tokens": 2}, headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "reasoning language: German"}],
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": "   "}, {"role": "assistant", "content": "hello"}],
        [{"role": "user", "content": [{"type": "text", "text": " "}]}],
        [{"role": "user", "content": None}],
        [{"role": "tool", "content": "42"}],
        [],
    ],
)
def test_chat_without_user_content_is_422(client, messages):
    r = client.post("/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["message"]


def test_a_non_loopback_host_needs_a_key(model_dir: Path, monkeypatch, capsys):
    from gptoss_hpc.serving.app import ServeError, serve
    from gptoss_hpc.serving.auth import is_loopback
    from gptoss_hpc.stages.serve import cli

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.2") and not is_loopback("no-such-host.invalid")
    monkeypatch.delenv("SERVE_API_KEY", raising=False)
    with pytest.raises(ServeError, match="SERVE_API_KEY"):
        serve(model_dir, "0.0.0.0", 8000)
    assert cli([str(model_dir), "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "refusing to serve on 0.0.0.0 without an API key" in err and "--api-key-file" in err


def test_api_key_sources(tmp_path: Path):
    from gptoss_hpc.serving.auth import ServeError, job_api_key, resolve_api_key

    key_file = tmp_path / "key"
    key_file.write_text(f"{KEY}\n")
    key_file.chmod(0o644)
    with pytest.raises(ServeError, match="chmod 600"):
        resolve_api_key(key_file, env={})
    key_file.chmod(0o600)
    assert resolve_api_key(key_file, env={"SERVE_API_KEY": "from-env"}) == KEY  # the flag wins
    assert resolve_api_key(None, env={"SERVE_API_KEY": " from-env\n"}) == "from-env"
    assert resolve_api_key(None, env={"SERVE_API_KEY": ""}) is None
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "empty").chmod(0o600)
    with pytest.raises(ServeError, match="is empty"):
        resolve_api_key(tmp_path / "empty", env={})

    # the serve job: the submitting shell's key, else one generated into a 0600 file and reused
    generated = tmp_path / "p000" / "serve" / "api_key"
    assert job_api_key(generated, env={"SERVE_API_KEY": KEY}) == (KEY, {"api_key_source": "SERVE_API_KEY"})
    assert not generated.exists()
    old_umask = os.umask(0o000)  # the widest umask: the file must still be 0600
    try:
        key, where = job_api_key(generated, env={})
    finally:
        os.umask(old_umask)
    assert where == {"api_key_source": "file", "api_key_file": str(generated)}
    assert len(key) >= 32 and generated.read_text().strip() == key
    assert stat.S_IMODE(generated.stat().st_mode) == 0o600 and stat.S_IMODE(generated.parent.stat().st_mode) == 0o700
    assert job_api_key(generated, env={}) == (key, where)  # a requeued job keeps its key
    assert [p.name for p in generated.parent.iterdir()] == ["api_key"]


def test_the_key_cannot_be_put_in_a_config():
    """cluster.env is rendered into the job script: a key there would land in a file."""
    from gptoss_hpc.config.validate import validate
    from gptoss_hpc.errors import ConfigError

    with pytest.raises(ConfigError, match=r"cluster\.env\.SERVE_API_KEY is a secret"):
        validate(to_run_config(compose(["cluster=local_slurm", "experiment=demo", "+cluster.env.SERVE_API_KEY=x"])))


@pytest.mark.slow
def test_serve_job_binds_the_node_and_takes_the_submitting_shells_key(model_dir: Path, tmp_path: Path):
    """`python -m gptoss_hpc.serve <point config.yaml>` runs the job body in a real uvicorn process: it binds
    this node's address (not loopback when the node has another), takes SERVE_API_KEY from its environment,
    records the URL and the key's source (not the key) in status/serve.json and ends COMPLETED on SIGTERM."""
    import shutil
    import subprocess
    import sys

    from gptoss_hpc.config import save_run_config
    from gptoss_hpc.paths import PointPaths
    from gptoss_hpc.serving.job import node_address

    paths = PointPaths(tmp_path / "run" / "p000")
    save_run_config(to_run_config(compose(["experiment=demo", "model.tokenizer=tiny-bpe"])), paths.config)
    shutil.copytree(model_dir, paths.merged)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "GPTOSS_SERVE_HOST"}
    env |= {"GPTOSS_SERVE_PORT": str(port), "SERVE_API_KEY": KEY}
    out, err = tmp_path / "job.out", tmp_path / "job.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gptoss_hpc.serve", str(paths.config)], stdout=stdout, stderr=stderr, env=env
        )
    try:
        deadline = time.monotonic() + 120
        while not out.read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-2000:]
            time.sleep(0.2)
        address = out.read_text().splitlines()[0]
        bound_port = int(address.rsplit(":", 1)[1])
        assert address == f"{socket.gethostname()}:{bound_port}" and bound_port >= port
        status = json.loads(paths.stage_status("serve").read_text())
        assert status["state"] == "RUNNING" and status["address"] == address
        assert status["url"] == f"http://{node_address()}:{bound_port}/v1"
        assert status["api_key_source"] == "SERVE_API_KEY" and "api_key_file" not in status
        assert status["model"] == f"{tmp_path.name}/p000"  # <experiment>/pNNN in logs/<experiment>/<ts>/pNNN
        url = status["url"].removesuffix("/v1")
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        models = httpx.get(f"{url}/v1/models", headers=AUTH, timeout=10).json()
        assert [m["id"] for m in models["data"]] == [status["model"]]
        r = httpx.post(f"{url}/score", json={"prompt": "hi", "max_new_tokens": 4}, headers=AUTH, timeout=60)
        assert r.status_code == 200 and "output" in r.json()
        assert httpx.post(f"{url}/score", json={"prompt": 1}, headers=AUTH, timeout=10).status_code == 422
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert json.loads(paths.stage_status("serve").read_text())["state"] == "COMPLETED"
    assert "POST /score" in out.read_text() + err.read_text()  # uvicorn's access log is there ...
    leaked = [str(f) for f in tmp_path.rglob("*") if f.is_file() and KEY.encode() in f.read_bytes()]
    assert leaked == []  # ... and the key is in no log and no file
    assert not (paths.root / "serve").exists()


@pytest.mark.slow
def test_serve_job_stopped_while_loading_ends_completed(model_dir: Path, tmp_path: Path):
    """scancel (SIGTERM) can come before uvicorn runs: the job must end then, not load and serve forever."""
    import shutil
    import signal
    import subprocess
    import sys

    from gptoss_hpc.config import save_run_config
    from gptoss_hpc.paths import PointPaths

    paths = PointPaths(tmp_path / "p000")
    save_run_config(to_run_config(compose(["experiment=demo", "model.tokenizer=tiny-bpe"])), paths.config)
    shutil.copytree(model_dir, paths.merged)
    env = {**os.environ, "GPTOSS_SERVE_HOST": "127.0.0.1", "SERVE_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptoss_hpc.serve", str(paths.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # the address: printed before the model loads
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in err
    assert json.loads(paths.stage_status("serve").read_text())["state"] == "COMPLETED"
