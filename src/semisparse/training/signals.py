"""SIGINT/SIGTERM during training: the first asks the loop to checkpoint after its current step, a second
aborts at once (`KeyboardInterrupt`)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class StopRequests:
    """SIGINT/SIGTERM set a flag so the loop finishes its step and checkpoints; a second signal aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\nsemisparse: {signal.Signals(signum).name} received, checkpointing after this step "
            "(send again to abort at once; the last checkpoint stays)",
            file=sys.stderr,
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequests]:
        """The handlers, for the `with` block (only in the main thread, where Python delivers signals)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
