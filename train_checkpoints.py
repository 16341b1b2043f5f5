"""The checkpoint files of a training run: written atomically after the complete check a loaded
checkpoint gets, with every rank's RNG state; epoch_NNNN.pt and latest.pt at the save interval,
old epochs pruned; and the newest checkpoint this run can resume from."""

import os

from checkpoint import CheckpointError, atomic_save, get_rng_state, prune_checkpoints, validate_checkpoint
from runtime import InputError, WriteError
from train_skips import NonFiniteError


class CheckpointWriter:
    """`last_saved`: (path, epoch, step) of the newest checkpoint a run can resume from (best.pt
    aside): one this run wrote, or the one it resumed from (`resumed_from`)."""

    def __init__(self, cfg, dist):
        t = cfg["training"]
        self.folder, self.save_interval, self.keep = t["checkpoint_dir"], t["save_interval"], t["keep_checkpoints"]
        self.dist = dist
        self.last_saved = None
        self.lock = None  # the folder's FolderLock (run.py): re-checked before each write
        self.latent_record = None  # the data root's manifest (run.py), recorded in every checkpoint

    def path(self, name):
        return os.path.join(self.folder, name)

    def resumed_from(self, path, epoch, step):
        self.last_saved = (path, epoch, step)

    def save(self, path, state, nets, epoch, step):
        """Atomic write (temporary file, fsync, rename) of `state()`, which rank 0 alone builds.
        Every rank calls it (their RNG states are gathered, their `nets` compared); rank 0 writes,
        after the same complete check a loaded checkpoint gets, so a checkpoint never holds
        non-finite weights. Every rank learns whether the write failed."""
        rng_per_rank = self.dist.gather(get_rng_state())
        self.dist.check_in_sync(nets)
        failed = None
        if self.dist.is_main:
            checkpoint = state()
            if self.dist.enabled:
                checkpoint["rng_per_rank"] = rng_per_rank
            if self.latent_record is not None:
                checkpoint["latent_space"] = dict(self.latent_record)
            try:
                if self.lock is not None:  # its file removed and another run in the folder: write nothing
                    self.lock.check()
                validate_checkpoint(checkpoint, path)
                atomic_save(checkpoint, path)
            except CheckpointError as err:
                failed = NonFiniteError(f"refusing to save: {err}")
            except (WriteError, InputError) as err:
                failed = err
        self.dist.raise_if_any_failed(failed)
        if os.path.basename(path) != "best.pt":
            self.last_saved = (path, epoch, step)
        return path

    def save_epoch(self, epoch, latest, save):
        """The end of `epoch`: every save_interval epochs epoch_NNNN.pt and latest.pt, the oldest
        epochs pruned; `latest` forces latest.pt (last epoch, stop signal). `save(path)` writes one
        (every rank calls it). Returns latest.pt's path."""
        path = self.path("latest.pt")
        if epoch % self.save_interval == 0:
            save(self.path(f"epoch_{epoch:04d}.pt"))
        if epoch % self.save_interval == 0 or latest:
            save(path)
            if self.dist.is_main:
                prune_checkpoints(self.folder, self.keep)
        return path

    def holds_latest(self, epoch):
        """Whether this run's newest save is latest.pt at the end of `epoch`."""
        return self.last_saved is not None and self.last_saved[:2] == (self.path("latest.pt"), epoch)

    def saved_summary(self):
        """What a failed write leaves: the newest checkpoint this run can resume from, intact."""
        if self.last_saved is None:
            return "No checkpoint of this run was written yet."
        path, epoch, step = self.last_saved
        return f"The last good checkpoint, {path} (epoch {epoch}, step {step}), is intact."
