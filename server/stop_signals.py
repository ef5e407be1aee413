"""SIGTERM/SIGINT for the serve commands: the handler only counts, the main thread polls.

A Python handler runs on the main thread, between bytecodes, once that thread wakes. A bare
`Event.wait()` there may never wake: Linux may deliver a process's signal to any thread that does not
block it (gRPC's, torch's), and then the main thread sleeps on in its lock (a CI run hung 600 s so).
`Event.set()` inside a handler can deadlock too, when the handler interrupts the main thread while it
holds that Event's own lock. Counting touches no lock, and a poll every 0.1 s bounds the delay.
"""
from __future__ import annotations

import signal
import time

POLL_S = 0.1


class StopSignals:
    def __init__(self) -> None:
        self.count = 0
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, *_) -> None:
        self.count += 1

    def wait(self) -> None:
        """Returns after the first SIGTERM or SIGINT."""
        while self.count == 0:
            time.sleep(POLL_S)

    def hurried(self) -> bool:
        """A second signal: the operator wants the drain cut short."""
        return self.count > 1
