"""TensorBoard curves of a training run (training.tensorboard, rank 0): the displayed losses and
counters, each evaluation's metrics, and the grids. Closed, or never opened, it records nothing."""

import numpy as np


class Curves:
    def __init__(self):
        self.writer = None

    def open(self, folder):
        from torch.utils.tensorboard import SummaryWriter  # optional: only when training.tensorboard

        self.writer = SummaryWriter(folder)

    def scalars(self, group, values, step):
        """Every number of `values` as `group/key` at `step`."""
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{group}/{key}", value, step)

    def image(self, tag, path, step):
        """The PNG at `path`, e.g. the grid of an epoch."""
        if self.writer is not None:
            from PIL import Image  # optional: the grid was written without it

            self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
