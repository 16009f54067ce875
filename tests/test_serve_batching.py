"""Continuous batching on a real tiny gpt-oss (random weights, CPU): greedy equality against ``generate`` for a
merged model and a base + unmerged LoRA adapter, token-by-token streaming through the ``openai`` client, a client
that disconnects, 429 under a burst, /ready and /metrics, ``--best``, and the CPU form of the load bench.

Faked: a gate on the model's forward (a pre-hook that waits on an event) where a test must hold requests in
flight; nothing else.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.test_report import complete_point, make_run
from tests.test_serve import AUTH, KEY, model_dir, running  # noqa: F401  (model_dir: a module fixture)

CAP = 16
MAX_LEN = 512


@pytest.fixture(scope="module")
def server(model_dir: Path):  # noqa: F811
    """One batched server for the module: a real uvicorn on loopback with the API key."""
    from gptoss_hpc.serving.app import create_app

    app = create_app(model_dir, max_new_tokens_cap=CAP, api_key=KEY, max_running=16, max_model_len=MAX_LEN)
    with running(app) as url:
        yield url, app


def test_batched_greedy_equals_generate_token_for_token(model_dir: Path):  # noqa: F811
    """8 prompts decoded together (longer than the tiny model's 16-token sliding window) give generate's tokens."""
    from gptoss_hpc.serving.app import kv_plan, load_model
    from gptoss_hpc.serving.batch_check import compare

    model, tokenizer = load_model(model_dir)
    rows = compare(model, tokenizer, 8, 24, kv_plan(model, None, 8, MAX_LEN))
    assert all(r["prompt_tokens"] > model.config.sliding_window for r in rows)
    assert [r for r in rows if not r["equal"]] == [], rows  # a row names its first differing position and gap
    assert model.config._attn_implementation == "eager"  # restored after the manager stopped


def test_batched_adapter_equals_generate(model_dir: Path, tmp_path: Path):  # noqa: F811
    """The 120b path's shape: base + unmerged LoRA (PEFT) batched through the base model with the LoRA in place."""
    import torch
    from peft import LoraConfig, get_peft_model

    from gptoss_hpc.serving.app import kv_plan, load_model
    from gptoss_hpc.serving.batch_check import compare

    base, tokenizer = load_model(model_dir)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():  # a non-zero adapter, so that a batched path without it would differ
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    rows = compare(peft.eval(), tokenizer, 4, 16, kv_plan(peft, None, 4, MAX_LEN))
    assert [r for r in rows if not r["equal"]] == [], rows


def test_stream_sends_tokens_in_order_and_matches_the_whole_answer(server, model_dir: Path):  # noqa: F811
    import openai

    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    whole = client.chat.completions.create(model=model_dir.name, messages=messages, max_tokens=CAP)
    assert whole.usage.completion_tokens == CAP or whole.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=model_dir.name, messages=messages, max_tokens=CAP, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks[1:-1]]
    assert len(deltas) > 1, "the answer came in one piece, not token by token"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    text = "".join((d.content or "") + (getattr(d, "reasoning_content", None) or "") for d in deltas)
    # the random model does not write Harmony, so the whole answer is plain content: the stream must add up to it
    assert whole.choices[0].message.content and text == whole.choices[0].message.content


def test_stop_strings_and_context_limit(server, model_dir: Path):  # noqa: F811
    url, _ = server
    body = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": CAP}
    whole = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60).json()
    content = whole["choices"][0]["message"]["content"]
    stop = content[len(content) // 2 : len(content) // 2 + 2]
    cut = httpx.post(f"{url}/v1/chat/completions", json={**body, "stop": [stop]}, headers=AUTH, timeout=60).json()
    assert cut["choices"][0]["message"]["content"] == content[: content.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    long = {"messages": [{"role": "user", "content": "sea " * 2000}], "max_tokens": CAP}
    r = httpx.post(f"{url}/v1/chat/completions", json=long, headers=AUTH, timeout=60)
    assert r.status_code == 400 and f"context of {MAX_LEN} tokens" in r.text
    assert httpx.get(f"{url}/ready", headers=AUTH).status_code == 200  # still serving


def test_ready_and_metrics_need_the_key_and_count(server):
    url, _ = server
    assert httpx.get(f"{url}/ready").status_code == 401 and httpx.get(f"{url}/metrics").status_code == 401
    ready = httpx.get(f"{url}/ready", headers=AUTH)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60).status_code == 200
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    for name in ("requests_running", "requests_waiting", "prompt_tokens_total", "completion_tokens_total"):
        assert f"# TYPE gptoss_serve_{name} " in text
    assert re.search(r'gptoss_serve_requests_total\{path="/v1/chat/completions",status="200"\} [1-9]', text)
    assert re.search(r"gptoss_serve_time_to_first_token_seconds_count [1-9]", text)
    assert 'gptoss_serve_request_latency_seconds_bucket{le="+Inf"}' in text


def test_disconnect_frees_the_slot_and_a_burst_gets_429(model_dir: Path):  # noqa: F811
    """One running + one waiting slot, held by two open streams while the model's forward is gated: a third
    request is refused at once with 429; both clients leave, the slots free, and the server answers again."""
    from gptoss_hpc.serving.app import create_app

    app = create_app(model_dir, max_new_tokens_cap=CAP, api_key=KEY, max_running=1, max_queue=1, max_model_len=256)
    gate = threading.Event()

    def wait_for_the_gate(module, args) -> None:
        gate.wait(120)

    hook = app.state.service.generator.model.register_forward_pre_hook(wait_for_the_gate)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": CAP, "stream": True}
    try:
        with running(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
            streams = [http.stream("POST", "/v1/chat/completions", json=body) for _ in range(2)]
            # the line iterators stay referenced: closing one (as garbage) would close its connection
            lines = [s.__enter__().iter_lines() for s in streams]
            for line in lines:
                first = next(line)  # the role chunk: the request is admitted
                assert first.startswith("data: ") and '"role": "assistant"' in first
            assert http.get("/health").json()["queue"] == {"running": 0, "waiting": 2, "max_waiting": 1}
            burst = [http.post("/v1/chat/completions", json={**body, "stream": False}) for _ in range(3)]
            assert {r.status_code for r in burst} == {429}
            assert all(r.headers["retry-after"] == "5" for r in burst)
            for s in streams:
                s.__exit__(None, None, None)  # the clients vanish mid-stream
            del lines
            gate.set()
            deadline = time.monotonic() + 60
            while http.get("/health").json()["queue"] != {"running": 0, "waiting": 0, "max_waiting": 1}:
                assert time.monotonic() < deadline, "a slot stayed taken after its client left"
                time.sleep(0.05)
            after = http.post("/v1/chat/completions", json={**body, "stream": False})
            assert after.status_code == 200
            metrics = http.get("/metrics").text
            assert 'gptoss_serve_generations_total{outcome="cancelled"} 2' in metrics
            assert 'path="/v1/chat/completions",status="429"} 3' in metrics
    finally:
        gate.set()
        hook.remove()


def test_best_serves_the_lowest_held_out_loss(tmp_path: Path, capsys):
    from gptoss_hpc.errors import GptossHpcError
    from gptoss_hpc.stages.serve import best_point_config

    run = make_run(tmp_path, [["lora.r=8"], ["lora.r=16"], ["lora.r=32"]])
    with pytest.raises(GptossHpcError, match=r"no point .* has a held-out loss"):
        best_point_config(run.root)
    complete_point(run, 0, loss=1.5, adherence=0.5)
    complete_point(run, 1, loss=1.25, adherence=0.5)
    assert best_point_config(run.root) == run.point(1).config
    out = capsys.readouterr().out
    assert "serving p001 (lora.r=16): lowest held-out loss 1.2500 of 2 scored point(s); next: p000 1.5000" in out


def test_cpu_load_bench_answers_every_request(server):
    """The CI form of ``python -m gptoss_hpc.bench serve``: bounded in count; timing is reported, not asserted."""
    from gptoss_hpc.bench.serve import bench, table

    url, _ = server
    name = httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"][0]["id"]
    result = asyncio.run(bench(url, KEY, name, [1, 8], 8, CAP, 16))
    print(table(result))  # the 16-concurrent vs 16-sequential ratio goes to docs/BENCHMARKS.md, not an assertion
    levels = [*result["levels"], result["compare"]["sequential"], result["compare"]["concurrent"]]
    for lv in levels:
        assert lv["lost"] == 0 and lv["answered"] == lv["requests"]
        assert lv["by_status"] == {"200": lv["requests"]}, lv  # no 5xx, no 429 under these limits, all parsed
        assert lv["output_tokens"] > 0
