"""Count, rate and ETA of a long loop (a stage's items, the training steps).

On a terminal a tqdm bar; when stderr is not a terminal (CI logs, a Prefect worker) tqdm is off
(`disable=None` is tqdm's own "only on a TTY"). Either way one log line at most every
`every_s` seconds and at the end — the line that reaches the Prefect UI.
"""

from __future__ import annotations

import time
from typing import Callable

from tqdm.auto import tqdm


class Progress:
    """`update()` per finished unit; `line()` is the `done/total (pct), rate, ETA` text."""

    def __init__(self, total: int, desc: str, log: Callable[[str], None] | None = None, *,
                 every_s: float = 10.0, unit: str = "item", initial: int = 0):
        self.total, self.desc, self.unit, self.log = total, desc, unit, log
        self.done, self.initial, self.every_s = initial, initial, every_s
        self.started = self.logged_at = time.monotonic()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=None,
                        dynamic_ncols=True, leave=False)

    def update(self, n: int = 1, postfix: str = "") -> None:
        self.done += n
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix_str(postfix, refresh=False)
        now = time.monotonic()
        if self.log and (now - self.logged_at >= self.every_s or self.done >= self.total):
            self.logged_at = now
            self.log(self.line(postfix))

    @property
    def rate(self) -> float:
        """Units per second since this loop (or its resume) started."""
        elapsed = time.monotonic() - self.started
        return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    @property
    def eta_text(self) -> str:
        return "?" if self.eta_s is None else tqdm.format_interval(self.eta_s)

    def line(self, postfix: str = "") -> str:
        pct = 100.0 * self.done / max(self.total, 1)
        text = (f"{self.desc}: {self.done}/{self.total} {self.unit}s ({pct:.0f}%), "
                f"{self.rate:.3g} {self.unit}s/s, ETA {self.eta_text}")
        return f"{text} | {postfix}" if postfix else text

    def close(self) -> None:
        self.bar.close()
