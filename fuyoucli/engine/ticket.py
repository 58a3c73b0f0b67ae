"""Tickets: what a later operation must wait for, as one type.

Engine stage; no CUDA (the lanes do the waiting). An operation that finishes later is either a copy
queued on a lane (its Mark), or a job on a thread (an SSD read or write, the CPU optimizer's update)
whose result is the Mark of the last lane copy it queued, or None when it queued none. A Ticket holds
one of the two; whoever waits says who waits: the host thread, or the compute lane.
"""

from __future__ import annotations

from concurrent.futures import Future

from fuyoucli.engine.lanes import Mark


class Ticket:
    __slots__ = ("mark", "job")

    def __init__(self, *, mark: Mark | None = None, job: Future | None = None):
        if (mark is None) == (job is None):
            raise ValueError("a ticket holds a lane mark or a job, exactly one of the two")
        self.mark, self.job = mark, job

    @property
    def on_thread(self) -> bool:
        """A job still running on its thread (an SSD read, say): a wait now would block on it."""
        return self.job is not None and not self.job.done()

    def _lane_mark(self) -> Mark | None:
        # A job's result is the mark of the lane copy it queued last (None: it queued none). Asking for
        # it blocks until the job is done and re-raises what the job raised.
        return self.job.result() if self.job is not None else self.mark

    def host_wait(self, lanes) -> None:
        """Block this thread until the operation, and any lane copy it queued, is complete."""
        mark = self._lane_mark()
        if mark is not None:
            lanes.host_wait(mark)

    def compute_wait(self, lanes) -> None:
        """Order the compute lane after the operation (the host blocks only for a job still running)."""
        mark = self._lane_mark()
        if mark is not None:
            lanes.compute_wait(mark)
