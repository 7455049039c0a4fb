"""SIGINT/SIGTERM as a request to stop training at the next step boundary.

SAELens's handler raises from inside whatever is running (an optimiser step, a checkpoint
write), so the state it then saves can be torn. Here the first signal is only recorded; the
trainer checks it between steps. A second signal stops at once, as users expect of Ctrl-C.
"""

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager installing the handlers; ``received()`` is the first signal's number."""

    def __init__(self) -> None:
        self._received: int | None = None
        self._previous: dict[int, Any] = {}

    def received(self) -> int | None:
        return self._received

    def _handle(self, signal_number: int, frame: FrameType | None) -> None:  # noqa: ARG002
        if self._received is not None:
            self._restore()
            raise KeyboardInterrupt(f"second stop signal ({signal_number}): stopping now, no checkpoint")
        self._received = signal_number
        logger.warning(
            "signal %d: finishing the current step, then saving a checkpoint and stopping "
            "(send it again to stop at once, without a checkpoint)",
            signal_number,
        )

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        # Signal handlers can only be set from the main thread; elsewhere keep the defaults.
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore()
