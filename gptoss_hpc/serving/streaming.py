"""Text as it is generated, split for streaming: Harmony channels (analysis -> reasoning, final -> content) and
OpenAI's ``stop`` strings, both on text that arrives in pieces.

The channel split follows ``harmony.parse_completion`` on whole completions: the analysis channel is reasoning,
the final channel is content, other channels (commentary, tool calls) are neither, and a completion with no Harmony
markers at all is content as plain text. Markers (``<|channel|>`` ...) may arrive cut in two; they are held back
until whole.
"""

from __future__ import annotations

from collections.abc import Sequence

_OPEN, _CLOSE = "<|", "|>"
_ENDS = ("<|end|>", "<|return|>", "<|call|>")


class ChannelSplitter:
    """``feed(text)`` -> [(kind, text)], kind "reasoning" or "content"; ``flush()`` at the end."""

    def __init__(self) -> None:
        self._buffer = ""
        self._state = "plain"  # plain | header | message | between
        self._channel = ""

    def _target(self) -> str | None:
        if self._state == "plain":
            return "content"
        if self._state == "message":
            return {"analysis": "reasoning", "final": "content"}.get(self._channel.strip().split(" ")[0])
        return None

    def _text(self, text: str, out: list[tuple[str, str]]) -> None:
        if not text:
            return
        if self._state == "header":
            self._channel += text
            return
        kind = self._target()
        if kind is not None:
            if out and out[-1][0] == kind:
                out[-1] = (kind, out[-1][1] + text)
            else:
                out.append((kind, text))

    def _marker(self, marker: str) -> None:
        if marker == "<|channel|>":
            self._state, self._channel = "header", ""
        elif marker == "<|message|>" and self._state == "header":
            self._state = "message"
        elif marker in _ENDS or marker == "<|start|>":
            self._state = "between"
        # other special tokens (<|constrain|>, eos) carry no text

    def feed(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._buffer += text
        while True:
            start = self._buffer.find(_OPEN)
            if start < 0:
                keep = 1 if self._buffer.endswith("<") else 0
                self._text(self._buffer[: len(self._buffer) - keep], out)
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return out
            end = self._buffer.find(_CLOSE, start + len(_OPEN))
            self._text(self._buffer[:start], out)
            if end < 0:
                self._buffer = self._buffer[start:]
                return out
            self._marker(self._buffer[start : end + len(_CLOSE)])
            self._buffer = self._buffer[end + len(_CLOSE) :]

    def flush(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._text(self._buffer, out)
        self._buffer = ""
        return out


class StopMatcher:
    """OpenAI's ``stop``: the text up to the first stop string, with a possible start of one held back."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""  # all text accepted so far (before any stop string)
        self._sent = 0
        self.stopped = False

    def feed(self, text: str) -> str:
        """Accept ``text``; the part that may be sent now."""
        if self.stopped:
            return ""
        self.text += text
        hits = [i for i in (self.text.find(s, max(0, self._sent - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._send(len(self.text))
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._send(len(self.text) - hold)

    def flush(self) -> str:
        return self._send(len(self.text))

    def _send(self, upto: int) -> str:
        piece = self.text[self._sent : upto]
        self._sent = max(self._sent, upto)
        return piece
