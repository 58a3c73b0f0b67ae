"""Ctrl-C in the `fuyou` process: the first interrupt stops the command; a later one, while the process is
already shutting down (closing the trainer and sinks, running torch's atexit callbacks), is ignored instead of
cutting that cleanup short with an "Exception ignored in atexit callback" traceback. Imports nothing heavy.
"""

from __future__ import annotations

import signal
import threading
from typing import NoReturn

_stopping = False


def interrupt() -> NoReturn:
    """Raise KeyboardInterrupt as the interrupt that stops the process: the CLI's handler ignores later ones."""
    global _stopping
    _stopping = True
    raise KeyboardInterrupt


def _on_sigint(signum, frame) -> None:
    if not _stopping:
        interrupt()


class CliInterrupts:
    """Installed by the CLI's main() for one command. Leaving after an interrupt keeps SIGINT ignored (the
    process is about to exit); leaving otherwise restores the previous handler (main() run in-process)."""

    def __enter__(self) -> "CliInterrupts":
        global _stopping
        _stopping = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, _on_sigint)
        return self

    def shutting_down(self) -> None:
        """The command was interrupted: from now on SIGINT is ignored."""
        global _stopping
        _stopping = True
        if self._previous is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc) -> None:
        if self._previous is not None and not _stopping:
            signal.signal(signal.SIGINT, self._previous)
