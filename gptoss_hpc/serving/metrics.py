"""``GET /metrics`` in Prometheus's text exposition format (version 0.0.4): requests by path and HTTP status,
generations by outcome, prompt and completion tokens, running and waiting requests, time to first token and
request latency histograms. Written by hand (a few counters and two histograms) rather than adding a client
library to the serving dependencies."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

PREFIX = "gptoss_serve"
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
COUNTED_PATHS = ("/v1/chat/completions", "/score")


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.total, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound:g}"}} {cumulative}')
        return [*out, f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()  # (path, status code)
        self.generations: Counter[str] = Counter()  # ok | cancelled | error
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.gauges: Callable[[], dict[str, int]] = dict

    def response(self, path: str, status: int) -> None:
        with self._lock:
            self.requests[(path, str(status))] += 1

    def admitted(self, prompt_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens

    def finished(self, completion: Any, outcome: str) -> None:
        import time

        with self._lock:
            self.generations[outcome] += 1
            self.completion_tokens += completion.completion_tokens
            if completion.first_token is not None:
                self.ttft.observe(completion.first_token - completion.started)
            if outcome == "ok":
                self.latency.observe(time.perf_counter() - completion.started)

    def render(self) -> str:
        p = PREFIX
        with self._lock:
            lines = [
                f"# HELP {p}_requests_total Requests to the generation paths, by HTTP status.",
                f"# TYPE {p}_requests_total counter",
            ]
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'{p}_requests_total{{path="{path}",status="{status}"}} {n}')
            lines += [
                f"# HELP {p}_generations_total Admitted generations by outcome (cancelled: the client left).",
                f"# TYPE {p}_generations_total counter",
            ]
            lines += [f'{p}_generations_total{{outcome="{k}"}} {v}' for k, v in sorted(self.generations.items())]
            for name, value, what in (
                ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens of admitted requests."),
                ("completion_tokens_total", self.completion_tokens, "Tokens generated."),
            ):
                lines += [f"# HELP {p}_{name} {what}", f"# TYPE {p}_{name} counter", f"{p}_{name} {value}"]
            for name, value in self.gauges().items():
                lines += [
                    f"# HELP {p}_requests_{name} Requests {name} now.",
                    f"# TYPE {p}_requests_{name} gauge",
                    f"{p}_requests_{name} {value}",
                ]
            for name, hist, what in (
                ("time_to_first_token_seconds", self.ttft, "From admission to the first generated token."),
                ("request_latency_seconds", self.latency, "From admission to the last token."),
            ):
                lines += [f"# HELP {p}_{name} {what}", f"# TYPE {p}_{name} histogram", *hist.lines(f"{p}_{name}")]
        return "\n".join(lines) + "\n"


class CountResponses:
    """ASGI middleware: counts each response of the generation paths by status (streams included)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in COUNTED_PATHS:
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.response(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
