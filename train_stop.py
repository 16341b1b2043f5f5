"""Stopping a run cleanly: SIGINT / SIGTERM / SIGHUP (a closed terminal or SSH session) ask it to
stop at a safe point (after the current step, or at the next batch of a grid or an evaluation, which
then saves and exits); a second one stops at once. Long work beside the loop shows its progress and
checks for a request batch by batch."""

import contextlib
import os
import signal

from display import WorkProgress, leave_terminal
from runtime import StopNow, StopRequested

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def on_stop_signal(callback):
    """Call `callback(signum)` on SIGINT / SIGTERM / SIGHUP in this process (forked loader workers
    ignore them: the main process decides). Returns the previous handlers, for `signal.signal` to
    restore. After SIGHUP the terminal is gone: output to it goes to /dev/null, so that the lines
    of the stop (and the save) never fail on it."""
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() == owner:
            if signum == signal.SIGHUP:
                leave_terminal()
            callback(signum)

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in previous:
        signal.signal(sig, handler)
    return previous


class StopRequest:
    """The stop signal this process received (`signum`, None until one arrives)."""

    def __init__(self, log, progress_style):
        self.signum = None
        self.log, self.progress_style = log, progress_style

    def __call__(self, signum):
        """SIGINT / SIGTERM / SIGHUP: finish the current step (or end a grid or an evaluation at its next
        batch), then the loop saves and returns; a second one stops at once (StopNow)."""
        if self.signum is not None:
            raise StopNow
        self.signum = signum
        self.log(f"\nreceived {signal.Signals(signum).name}: finishing this step (or the grid / evaluation batch), "
                 "then saving latest.pt; a second one stops at once")

    def from_within(self, reason):
        """A stop this process asks for itself (another run took its folder), taken up as SIGTERM's at the
        next step; `reason` is logged. Safe from another thread: it only sets the request."""
        if self.signum is None:
            self.signum = signal.SIGTERM
            self.log(f"\n{reason}")

    @contextlib.contextmanager
    def handling_signals(self):
        """SIGINT / SIGTERM / SIGHUP come here while the block runs; the previous handlers after it."""
        previous = on_stop_signal(self)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def agreed(self, dist):
        """The stop signal every rank agreed on, 0 for none: one CPU all-reduce, no GPU sync, so
        ranks never part ways (one stopping while another waits in its next collective)."""
        return dist.max_int(self.signum or 0)

    def long_work(self, desc):
        """(display, per-batch hook) for work beside the loop: the hook, `hook(n, total)`, shows
        n of N and raises StopRequested once a stop signal has arrived."""
        progress = WorkProgress(desc, self.progress_style)

        def hook(n, total):
            progress(n, total)
            if self.signum is not None:
                raise StopRequested
        return progress, hook
