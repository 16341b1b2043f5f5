"""What an epoch of training shows: the progress display and the JSON lines (training.log_json) at
their intervals, with TensorBoard's copy, each from one host sync of the step's losses and the skip
counters (SkipCounter.scalars); steps in between cost no sync."""

import time

from display import Display, json_line


class EpochLog:
    """One epoch's display, from batch `start` of `total`: `after_step` at every step, `close` at
    its end (or when it stops)."""

    def __init__(self, t, dist, skips, curves, keys, epoch, total, start):
        self.display = Display(t["progress_style"] if dist.is_main else "off", epoch, t["epochs"], total, start)
        self.t, self.dist, self.skips, self.curves, self.keys, self.epoch = t, dist, skips, curves, keys, epoch
        self.start, self.started = start, time.perf_counter()

    def after_step(self, losses, step, done):
        """Display and JSON log (and TensorBoard) at their intervals only. `losses`: the step's
        0-dim device tensors; `done`: batches done in the epoch."""
        show = step % self.t["display_interval"] == 0
        log = self.t["log_json"] and step % self.t["log_interval"] == 0
        if not (show or log):
            return
        values = self.skips.scalars(losses, self.keys, step)
        self.curves.scalars("train", values, step)
        if show:
            self.display.update(done, values)
        if log and self.dist.is_main:
            self.display.write(json_line({"step": step, "epoch": self.epoch, **values}))

    def close(self, done, values):
        """The epoch's last `values` (None when it failed) and its rate."""
        self.display.close(done, values, (done - self.start) / max(time.perf_counter() - self.started, 1e-9))
