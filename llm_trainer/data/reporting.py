"""What a data preparation reports: its statistics (:class:`PrepareStats`) and its progress line. Shared by
:mod:`.prepare` and :mod:`.classify`; imports no torch."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

@dataclass
class PrepareStats:
    """What :func:`prepare` wrote. ``documents``: records written; ``truncated``: records cut to ``max_length``;
    ``skipped``: bad records (and empty files) skipped with ``skip_bad``; ``dropped``: records that could not be kept
    within ``max_length`` (an RL/DPO prompt already too long, or an SFT sample with no trained token left)."""

    stage: str
    output: str
    inputs: list[str]
    documents: int = 0
    tokens: int = 0
    truncated: int = 0
    skipped: int = 0
    dropped: int = 0
    seconds: float = 0.0
    skipped_examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.documents / self.seconds if self.seconds > 0 else 0.0
        trate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return (f"wrote {self.output} ({self.stage}): {self.documents:,} documents, {self.tokens:,} tokens, "
                f"{self.truncated:,} truncated, {self.skipped:,} skipped, {self.dropped:,} dropped in "
                f"{self.seconds:.1f}s ({rate:,.0f} docs/s, {trate:,.0f} tokens/s)")


# ================================================================================================ progress
class Progress:
    """A small stderr progress line: percent of input bytes, documents, docs/s, tokens/s."""

    def __init__(self, stage: str, total_bytes: int, enabled: bool, stream=None):
        self.stage, self.total, self.enabled = stage, max(total_bytes, 1), enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.done_bytes = self.docs = self.tokens = 0
        self.shown: tuple[int, int] | None = None  # (bytes, docs) of the last line written

    def update(self, nbytes: int, docs: int, tokens: int, force: bool = False) -> None:
        self.done_bytes += nbytes
        self.docs += docs
        self.tokens += tokens
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < (0.2 if self.tty else 10.0) or self.shown == (self.done_bytes, self.docs):
            return
        self.last, self.shown = now, (self.done_bytes, self.docs)
        dt = max(now - self.t0, 1e-9)
        frac = min(self.done_bytes / self.total, 1.0)
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        line = (f"prepare_data {self.stage} [{bar}] {frac * 100:5.1f}% | {self.docs:,} docs | "
                f"{self.docs / dt:,.0f} docs/s | {_human(self.tokens / dt)} tokens/s | {dt:.0f}s")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Write the final line, unless the last line written already shows the final state."""
        if self.enabled:
            self.update(0, 0, 0, force=True)
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()


def _human(x: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(x) < 1000:
            return f"{x:.1f}{unit}" if unit else f"{x:.0f}"
        x /= 1000
    return f"{x:.1f}T"
