"""The whole command's progress bar, in seconds of estimated work (eval/estimate.py)."""

from __future__ import annotations


class OverallBar:
    """The whole command's progress bar (`Estimate.overall_bar`), drawn from its first advance on:
    a run refused before its work starts (bad data, the contamination gate) prints its one line and
    nothing else. Safe to advance from the threads of one command."""

    def __init__(self, estimate):
        import threading

        self.estimate, self.bar, self.lock = estimate, None, threading.Lock()

    @property
    def n(self) -> float:
        return self.bar.n if self.bar is not None else 0.0

    def update(self, seconds: float) -> None:
        with self.lock:
            if self.bar is None:
                self.bar = self.estimate.overall_bar()
            # more work than estimated (follow-ups drawn above their fraction) stops at 100%, where
            # tqdm past its total would show 0% and no time left
            self.bar.update(min(seconds, max(0.0, self.estimate.seconds - self.bar.n)))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
