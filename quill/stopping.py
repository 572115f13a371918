"""Stop strings on generated text, streamed: emit text as soon as it cannot be part of a stop string.

The stop that wins is the first one to complete (earliest end); among stops ending at the same place,
the one starting earliest (the longest). The output is the text before it (plus the stop itself when
`include_stop`), and nothing after. Streaming and `truncate` give the same result for any split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from quill.errors import InvalidParameter

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters


@dataclass
class StopStrings:
    """A validated set of stop strings; `None`, `[]` or `()` means none, a lone `str` means one."""

    stops: Sequence[str] | str | None = ()
    include_stop: bool = False

    def __post_init__(self) -> None:
        stops = [self.stops] if isinstance(self.stops, str) else self.stops
        if stops is None:
            stops = ()
        if not isinstance(stops, (list, tuple)):
            raise InvalidParameter(f"stop must be a string or a list of strings, got {stops!r}", param="stop")
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidParameter(
                f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop"
            )
        for stop in stops:
            if not isinstance(stop, str) or not stop:
                raise InvalidParameter(f"stop strings must be non-empty strings, got {stop!r}", param="stop")
            if len(stop) > MAX_STOP_LENGTH:
                raise InvalidParameter(
                    f"stop strings must be at most {MAX_STOP_LENGTH} characters, got {len(stop)}", param="stop"
                )
        self.stops = tuple(dict.fromkeys(stops))  # deduplicated, order kept

    def matcher(self) -> StopMatcher:
        """A fresh streaming matcher for one generated sequence."""
        return StopMatcher(self)

    def truncate(self, text: str) -> tuple[str, bool]:
        """The whole-text equivalent of streaming: (text to emit, whether a stop string was found)."""
        found = self._first_stop(text)
        if found is None:
            return text, False
        start, end = found
        return text[: end if self.include_stop else start], True

    def _first_stop(self, text: str) -> tuple[int, int] | None:
        """(start, end) of the stop occurrence that ends first (ties: starts first), or None."""
        best: tuple[int, int] | None = None
        for stop in self.stops:
            start = text.find(stop)  # a stop's first occurrence is also the one that ends first
            if start >= 0:
                end = start + len(stop)
                if best is None or (end, start) < (best[1], best[0]):
                    best = (start, end)
        return best

    def _pending_start(self, text: str) -> int:
        """Where the longest suffix of `text` that could still grow into a stop string starts (len: none)."""
        longest = max((len(stop) for stop in self.stops), default=1)
        for start in range(max(0, len(text) - longest + 1), len(text)):
            tail = text[start:]
            if any(stop.startswith(tail) for stop in self.stops):
                return start
        return len(text)


@dataclass
class StopMatcher:
    """Streaming state: holds back text that may be the start of a stop string."""

    stops: StopStrings
    held: str = ""
    stopped: bool = False

    def push(self, piece: str) -> tuple[str, bool]:
        """Add newly decoded text; returns (text now safe to emit, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        # Earlier text held no complete stop, and anything emitted cannot start one: only `held` + piece can.
        text = self.held + piece
        emitted, self.stopped = self.stops.truncate(text)
        if self.stopped:
            self.held = ""
            return emitted, True
        cut = self.stops._pending_start(text)
        self.held = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        """Release the held text at the end of generation (nothing once a stop string was hit)."""
        released, self.held = self.held, ""
        return released
