"""Graceful stop on SIGINT / SIGTERM.

The first signal only sets :attr:`StopRequest.requested`; the training loop finishes the current step,
writes a checkpoint and returns (``stopped_reason="interrupted"``). A second SIGINT raises
``KeyboardInterrupt`` at once: checkpoints are written atomically (see checkpoint.py), so an interrupted
save leaves the previous one intact. The previous handlers are restored on exit.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopRequest:
    """Context manager installing the handlers (only in the main thread; elsewhere it is inert)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
