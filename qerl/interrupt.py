"""Graceful stop on Ctrl-C / SIGTERM: the training loop finishes its step, checkpoints and exits.

`with GracefulStop() as stop:` installs handlers for SIGINT and SIGTERM (in the main thread; in
another thread it does nothing). The first signal is only recorded (`stop.signum`) and announced
in one line: the loop reads it after each step. SIGTERM (schedulers, preemption) always means
that; a second SIGINT raises KeyboardInterrupt at once (the CLI exits 130 on it). The previous
handlers come back when the block ends.
"""

from __future__ import annotations

import signal
import sys
import threading


class GracefulStop:
    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            print(
                f"\nqerl: {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                "(Ctrl-C again to quit at once)",
                file=sys.stderr,
                flush=True,
            )
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by the signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum if self.signum else 0
