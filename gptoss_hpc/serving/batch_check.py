"""Greedy outputs under continuous batching against today's greedy ``generate``, token for token.

Where a sequence differs, the row names the first differing position and the gap between the two candidate
tokens' logits there (one unbatched forward over the prompt and the common prefix): a gap within rounding means
the two paths met a near-tie and each took one side; a large gap is a wrong batched path.

    python -m gptoss_hpc.serving.batch_check logs/demo/<ts>/p000/merged --prompts 8 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

PROMPTS = (
    "What is the capital of Australia?",
    "Write one sentence about the sea.",
    "List three prime numbers and explain why each is prime, step by step, in detail.",
    "Translate 'good morning' into German, French and Spanish.",
    "2 + 2 = ?",
    "Summarise the plot of a story about a lighthouse keeper who finds a message in a bottle " * 3,
    "Why is the sky blue?",
    "Name a colour.",
)
TIE_GAP = 0.05  # logits this close are a tie under bf16/fp32 rounding of a different reduction order


def messages_for(i: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + (f" ({i})" if i >= len(PROMPTS) else "")}]


def _greedy(model: Any, prompt: list[int], n: int, stops: list[int], pad: int) -> list[int]:
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=pad,
        )
    return out[0, len(prompt) :].tolist()


def logit_gap(model: Any, prefix: list[int], a: int, b: int) -> float:
    """|logit(a) - logit(b)| for the token after ``prefix`` (one unbatched forward)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prefix], device=device)).logits[0, -1].float()
    return abs(float(logits[a] - logits[b]))


async def _batched(engine: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    async def one(prompt: list[int]) -> list[int]:
        rid = engine.submit(prompt, n, temperature=None, top_p=None)
        tokens: list[int] = []
        async for step in engine.follow(rid):
            tokens = step.tokens
        return tokens

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def compare(model: Any, tokenizer: Any, count: int, max_new_tokens: int, plan: Any) -> list[dict[str, Any]]:
    """One row per prompt: equal, or the first differing position, both tokens and their logit gap. The batched
    run holds ``count`` requests at once (the manager switches the model's attention to paged|eager while it runs,
    so the references and the gaps come before and after it)."""
    from gptoss_hpc.modeling.harmony import prompt_ids, stop_token_ids
    from gptoss_hpc.serving.batching import BatchEngine

    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    prompts = [prompt_ids(tokenizer, messages_for(i)) for i in range(count)]
    wanted = [_greedy(model, prompt, max_new_tokens, stops, pad) for prompt in prompts]
    engine = BatchEngine(model, tokenizer, stops, max_running=count, max_waiting=count, plan=plan)
    try:
        batched = asyncio.run(_batched(engine, prompts, max_new_tokens))
    finally:
        engine.close()
    rows = []
    for i, (prompt, got, want) in enumerate(zip(prompts, batched, wanted, strict=True)):
        row: dict[str, Any] = {"prompt": i, "prompt_tokens": len(prompt), "tokens": len(want), "equal": got == want}
        if got != want:
            pos = next((k for k, (x, y) in enumerate(zip(got, want, strict=False)) if x != y), None)
            if pos is None:  # one is a prefix of the other: a stop token on one side only
                pos = min(len(got), len(want))
            row["first_difference"] = pos
            if pos < len(got) and pos < len(want):
                gap = logit_gap(model, prompt + want[:pos], got[pos], want[pos])
                row.update(batched_token=got[pos], generate_token=want[pos], logit_gap=round(gap, 5))
                row["tie"] = gap <= TIE_GAP
            else:
                row["tie"] = False
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptoss_hpc.serving.batch_check", description=__doc__)
    p.add_argument("model", help="a merged or adapter folder")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    from gptoss_hpc.serving.app import kv_plan, load_model
    from gptoss_hpc.serving.batching import batching_problem

    model, tokenizer = load_model(args.model)
    problem = batching_problem(model)
    if problem:
        print(json.dumps({"batched": False, "why": problem}))
        return 1
    rows = compare(model, tokenizer, args.prompts, args.max_new_tokens, kv_plan(model, None, args.prompts, 4096))
    ok = all(r["equal"] or r.get("tie") for r in rows)
    print(json.dumps({"batched": True, "ok": ok, "rows": rows}))  # one line: gpu_check_serve reads it
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
