"""Load bench of the serve stage: 1, 8, 32 and 64 concurrent clients through the ``openai`` client (streamed chat
completions), then the same N requests sent one after another and all at once. Reports aggregate output tok/s,
time to first streamed token p50/p99, latency p50/p99 and every error by status; a request that gets neither an
answer nor an error is counted lost.

    python -m gptoss_hpc.bench serve --model logs/demo/<ts>/p000/merged               # starts the server
    python -m gptoss_hpc.bench serve --url http://host:8000 --api-key-file key.txt    # targets a running one
    python -m gptoss_hpc.bench serve --model M --clients 1,8,32,64 --max-tokens 256 --out serve_bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

QUESTIONS = (
    "What is the capital of Australia?",
    "Explain why the sky is blue in two sentences.",
    "Name three prime numbers.",
    "Write a haiku about the sea.",
)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_request(client: Any, model: str, i: int, max_tokens: int) -> dict[str, Any]:
    """One streamed chat completion: its TTFT, latency, output tokens, and whether it parsed (role ... finish)."""
    import openai

    started = time.perf_counter()
    row: dict[str, Any] = {"ok": False}
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        )
        chunks, finish, tokens = 0, None, None
        async for chunk in stream:
            choice = chunk.choices[0] if chunk.choices else None
            delta = choice.delta if choice else None
            text = (getattr(delta, "content", None) or "") + (getattr(delta, "reasoning_content", None) or "")
            if text and "ttft_s" not in row:
                row["ttft_s"] = time.perf_counter() - started
            chunks += bool(text)
            finish = (choice.finish_reason if choice else None) or finish
            usage = getattr(chunk, "usage", None)
            tokens = usage.completion_tokens if usage else tokens
        row.update(ok=finish is not None, finish=finish, tokens=tokens if tokens is not None else chunks)
        row["status"] = "200" if finish is not None else "unparsed"
    except openai.APIStatusError as exc:
        row["status"] = str(exc.status_code)
    except openai.APIConnectionError:
        row["status"] = "connection"
    except Exception as exc:  # every failure is a row of the table, by its type
        row["status"] = type(exc).__name__
    row["latency_s"] = time.perf_counter() - started
    return row


async def run_level(url: str, key: str, model: str, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """``requests`` requests from ``clients`` concurrent clients (each sends its next one when its last ends)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
    queue = list(range(requests))
    rows: list[dict[str, Any]] = []

    async def worker() -> None:
        while queue:
            rows.append(await one_request(client, model, queue.pop(), max_tokens))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - started
    await client.close()
    ok = [r for r in rows if r["ok"]]
    ttft = [r["ttft_s"] for r in ok if "ttft_s" in r]
    latency = [r["latency_s"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 1)

    return {
        "clients": clients,
        "requests": requests,
        "answered": len(rows),
        "lost": requests - len(rows),
        "by_status": dict(Counter(r["status"] for r in rows)),
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "output_tok_s": round(tokens / wall, 1) if wall > 0 else None,
        "ttft_ms_p50": ms(percentile(ttft, 50)),
        "ttft_ms_p99": ms(percentile(ttft, 99)),
        "latency_ms_p50": ms(percentile(latency, 50)),
        "latency_ms_p99": ms(percentile(latency, 99)),
    }


async def bench(
    url: str, key: str, model: str, clients: Sequence[int], requests: int | None, max_tokens: int, compare: int
) -> dict[str, Any]:
    levels = [await run_level(url, key, model, c, requests or max(c, 2 * c), max_tokens) for c in clients]
    result: dict[str, Any] = {"url": url, "model": model, "max_tokens": max_tokens, "levels": levels}
    if compare:
        sequential = await run_level(url, key, model, 1, compare, max_tokens)
        concurrent = await run_level(url, key, model, compare, compare, max_tokens)
        result["compare"] = {
            "n": compare,
            "sequential": sequential,
            "concurrent": concurrent,
            "concurrent_over_sequential_wall": round(concurrent["wall_s"] / sequential["wall_s"], 3),
        }
    return result


def table(result: dict[str, Any]) -> str:
    head = "| clients | requests | by status | lost | output tok/s | TTFT p50/p99 ms | latency p50/p99 ms |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for lv in result["levels"]:
        status = ", ".join(f"{k}: {v}" for k, v in sorted(lv["by_status"].items()))
        lines.append(
            f"| {lv['clients']} | {lv['requests']} | {status} | {lv['lost']} | {lv['output_tok_s']} | "
            f"{lv['ttft_ms_p50']} / {lv['ttft_ms_p99']} | {lv['latency_ms_p50']} / {lv['latency_ms_p99']} |"
        )
    if "compare" in result:
        c = result["compare"]
        lines.append(
            f"\n{c['n']} concurrent took {c['concurrent_over_sequential_wall']}x the wall time of the same "
            f"{c['n']} sent one after another ({c['concurrent']['wall_s']} s vs {c['sequential']['wall_s']} s)"
        )
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, key: str, extra: Sequence[str], log: Path, budget_s: float = 1800) -> tuple[Any, str]:
    """``python -m gptoss_hpc.serve MODEL`` on a free loopback port, waited for until /ready: (process, url)."""
    import httpx

    port = _free_port()
    env = {**os.environ, "SERVE_API_KEY": key}
    cmd = [sys.executable, "-m", "gptoss_hpc.serve", model, "--port", str(port), *extra]
    out = log.open("w", encoding="utf-8")
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + budget_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"{url}/ready", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    stop_server(proc)
    raise RuntimeError(f"the server was not ready within {budget_s:.0f} s; see {log}")


def stop_server(proc: Any) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # our own server's process group
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptoss_hpc.bench serve", description=__doc__.split("\n\n")[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="a merged or adapter folder (or a point's config.yaml) to serve")
    target.add_argument("--url", help="a running server's base URL")
    p.add_argument("--api-key-file", help="the running server's key (default $SERVE_API_KEY)")
    p.add_argument("--clients", default="1,8,32,64", help="concurrency levels, comma-separated")
    p.add_argument("--requests", type=int, help="requests per level (default 2 x clients)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--compare", type=int, default=16, help="N sent one after another vs at once (0: skip)")
    p.add_argument("--serve-arg", action="append", default=[], help="passed to gptoss_hpc.serve (repeatable)")
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    args = p.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    proc = None
    if args.model:
        key = os.urandom(16).hex()
        log = (args.out or Path("serve_bench.json")).with_suffix(".server.log")
        proc, url = start_server(args.model, key, args.serve_arg, log)
    else:
        from gptoss_hpc.serving.auth import resolve_api_key

        url, key = args.url.rstrip("/"), resolve_api_key(args.api_key_file) or "none"
    try:
        import httpx

        model = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"][0]["id"]
        result = asyncio.run(bench(url, key, model, clients, args.requests, args.max_tokens, args.compare))
    finally:
        if proc is not None:
            stop_server(proc)
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    bad = [lv for lv in result["levels"] if lv["lost"] or any(s.startswith("5") for s in lv["by_status"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
