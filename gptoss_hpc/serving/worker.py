"""One thread runs every generation (the model is not re-entrant and one GPU gains nothing from two), with a
bounded queue in front of it: a request that finds the queue full is refused at once (HTTP 429) instead of
waiting behind an unbounded backlog."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from gptoss_hpc.errors import GptossHpcError

log = logging.getLogger(__name__)


class QueueFullError(GptossHpcError):
    """Every queue slot is taken: the client should retry later."""


class GenerationQueue:
    """``submit(fn)`` runs ``fn`` on the worker thread; at most ``max_waiting`` calls wait behind the running one."""

    def __init__(self, max_waiting: int) -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1 (got {max_waiting})")
        self.max_waiting = max_waiting
        self._busy = False
        self._queue: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue(maxsize=max_waiting)
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    @property
    def busy(self) -> bool:
        """A call is running on the worker thread."""
        return self._busy

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            self._queue.put_nowait((fn, future))
        except queue.Full:
            raise QueueFullError(
                f"the server is busy: {self.max_waiting} request(s) already wait for the model; retry later"
            ) from None
        return future

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker after the calls already queued."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("generation queue still full at shutdown; the worker thread is left to the interpreter")
            return
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            self._busy = True
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the waiting request, which answers with it
                future.set_exception(exc)
            finally:
                self._busy = False


class OverCapError(GptossHpcError):
    """A request asked for more new tokens than the server allows."""


class GenerationFailedError(GptossHpcError):
    """generate raised for this input (e.g. the chat template rejecting a conversation)."""


@dataclass
class Answer:
    """One assistant completion, split: ``content`` is the final channel (or, when the model did not write
    Harmony, the completion as plain text), ``reasoning`` the analysis channel."""

    completion: str  # the raw text after the prompt, special tokens kept
    content: str
    reasoning: str
    valid: bool
    parse_error: str | None
    finish_reason: str  # "stop" (a stop token) or "length" (ran into max_new_tokens)


class Generator:
    """The model behind the bounded queue (the path when continuous batching is off). ``generate`` is
    harmony.generate_completion, or a test's stand-in."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        generate: Callable[..., str],
        *,
        max_new_tokens_cap: int,
        default_max_new_tokens: int,
        max_waiting: int,
        do_sample: bool = False,
    ) -> None:
        self.model, self.tokenizer, self._generate = model, tokenizer, generate
        self.max_new_tokens_cap = max_new_tokens_cap
        self.default_max_new_tokens = min(default_max_new_tokens, max_new_tokens_cap)
        self.do_sample = do_sample
        self.queue = GenerationQueue(max_waiting)

    def check_tokens(self, requested: int | None, field: str) -> int:
        n = requested or self.default_max_new_tokens
        if n > self.max_new_tokens_cap:
            raise OverCapError(f"{field}: {n} is over this server's cap of {self.max_new_tokens_cap}")
        return n

    def submit(
        self,
        messages: list[dict[str, Any]],
        max_new_tokens: int,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> Future[str]:
        """Queue the generation (QueueFullError at once when full): a future of the completion's text."""
        return self.queue.submit(lambda: self._run(messages, max_new_tokens, temperature, top_p))

    def _run(self, messages: list[dict[str, Any]], n: int, temperature: float | None, top_p: float | None) -> str:
        do_sample = self.do_sample if temperature is None else temperature > 0
        config = getattr(self.model, "generation_config", None)
        saved = (config.temperature, config.top_p) if config is not None else None
        # Only this worker thread generates, so the model's generation_config can carry this request's sampling
        # knobs and be restored afterwards.
        if do_sample and config is not None:
            if temperature is not None:
                config.temperature = temperature
            if top_p is not None:
                config.top_p = top_p
        try:
            return self._generate(self.model, self.tokenizer, messages, max_new_tokens=n, do_sample=do_sample)
        finally:
            if config is not None and saved is not None:
                config.temperature, config.top_p = saved

    def ends_on_stop(self, text: str) -> bool:
        from gptoss_hpc.modeling.harmony import STOP_TOKENS

        eos = self.tokenizer.eos_token
        return text.endswith((*STOP_TOKENS, *([eos] if eos else [])))

    def split(self, text: str, finish_reason: str) -> Answer:
        """``text`` (a completion, special tokens kept) as final and analysis channels."""
        from gptoss_hpc.modeling.harmony import parse_completion

        parsed = parse_completion(text)
        if parsed.valid:
            content = parsed.final or ""
        else:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            content = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Answer(text, content, parsed.analysis, parsed.valid, parsed.error, finish_reason)

    def close(self) -> None:
        self.queue.close()
