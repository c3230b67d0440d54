"""Progress of an LLM stage: a short line on the terminal and plain lines in the log, at a modest rate.

A rule's stderr goes to its log file and its stdout to the terminal Snakemake runs in, so the terminal
line goes to stdout (every ``terminal_s`` seconds) and the log gets a plain logging line (every
``log_s`` seconds), never carriage-return animation frames. Several jobs may print at once, so every
line names its stage.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    def __init__(
        self,
        stage: str,
        total: int,
        stats,
        *,
        cached: int = 0,
        terminal_s: float = 10.0,
        log_s: float = 30.0,
        stream=None,
    ):
        self.stage, self.total, self.stats, self.cached = stage, total, stats, cached
        self.terminal_s, self.log_s = terminal_s, log_s
        self.stream = stream or sys.stdout
        self.start = self.last_terminal = self.last_log = time.monotonic()
        self.done = 0
        self._emit(self.opening(), terminal=True, logged=True)

    def opening(self) -> str:
        cached = f" ({self.cached:,} answered from the cache)" if self.cached else ""
        return f"llm {self.stage}: {self.total:,} requests to send{cached}"

    def line(self) -> str:
        s = self.stats
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        pct = 100 * self.done / self.total if self.total else 100.0
        eta = (
            f"ETA {_duration((self.total - self.done) / rate)}"
            if rate and self.done < self.total
            else (f"done in {_duration(elapsed)}")
        )
        problems = f"{s.failed:,} failed, {s.refused:,} refused, {s.retries:,} retries"
        return (
            f"llm {self.stage}: {self.done:,}/{self.total:,} ({pct:.0f}%), {problems}; "
            f"{s.prompt_tokens + s.completion_tokens:,} tokens, ${s.cost_usd:,.2f}; {rate:,.0f} req/s, {eta}"
        )

    def update(self, n: int = 1) -> None:
        """Count ``n`` finished requests (cheap: one clock read unless a line is due)."""
        self.done += n
        now = time.monotonic()
        terminal = now - self.last_terminal >= self.terminal_s
        logged = now - self.last_log >= self.log_s
        if terminal or logged:
            self._emit(self.line(), terminal=terminal, logged=logged)

    def close(self) -> None:
        self._emit(self.line(), terminal=True, logged=True)

    def _emit(self, text: str, *, terminal: bool, logged: bool) -> None:
        now = time.monotonic()
        if terminal:
            self.last_terminal = now
            print(text, file=self.stream, flush=True)
        if logged:
            self.last_log = now
            log.info(text)
