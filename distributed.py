"""The process group under torchrun: gradient averaging, agreed decisions and RNG gathering. A
single process is world_size 1, rank 0, and every method a no-op."""

import datetime
import os

import torch

from runtime import OtherRankFailed


class Distributed:
    """Process-group facts; a single process is world_size 1, rank 0, and every method a no-op."""

    def __init__(self, rank=0, world_size=1):
        self.rank, self.world_size = rank, world_size
        # host-side decisions (stop signals, evaluation verdicts) travel through a CPU group: no GPU
        # sync for a flag. Its long timeout lets the other ranks wait while rank 0 evaluates.
        self.cpu_group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(hours=6)) \
            if world_size > 1 else None

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1

    def average_gradients(self, params, flags):
        """Average `params`' grads over ranks and sum `flags` (skip votes), one all-reduce.

        We all-reduce ourselves after every backward of the phase (as StyleGAN2-ADA does) instead
        of wrapping in DDP: a GAN phase runs several backward passes, R1 a double backward, and
        the G step drops E's grads between its two passes, none of which DDP's hooks handle well.
        Ranks with no grad for a parameter contribute zeros, so every rank takes the same decision.
        """
        if not self.enabled:
            return flags
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [flags.reshape(-1).float()])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = (flat[offset:offset + n] / self.world_size).view_as(p).to(p.dtype)
            offset += n
        return flat[offset:].view_as(flags)

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def raise_if_any_failed(self, error):
        """Every rank learns whether work that may fail on one rank alone (rank 0's writes, its
        evaluation, its grid) failed anywhere: the rank that failed raises `error`, the others
        OtherRankFailed, so none is left waiting in a collective. `error`: this rank's, or None."""
        if self.max_int(int(error is not None)):
            raise error or OtherRankFailed(f"rank {self.rank}: another rank failed (its error is above); stopping too")

    def max_int(self, value):
        """The largest of every rank's `value` (e.g. a stop signal number, 0 for none)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.cpu_group)
        return int(t.item())

    def gather(self, obj):
        """Every rank's `obj` in rank order (small host objects: RNG states)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def check_in_sync(self, modules):
        """Weights must stay identical on every rank: compare a float64 checksum of each net."""
        if not self.enabled:
            return
        sums = [float(sum(p.detach().double().sum() for p in m.parameters())) for m in modules.values()]
        ranks = self.gather(sums)
        if any(r != ranks[0] for r in ranks):
            raise RuntimeError(f"weights diverged across ranks: per-rank checksums {ranks}")


def setup_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: join the group (NCCL on CUDA, gloo on the CPU).
    Returns (Distributed, local rank or None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed(), None
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        torch.distributed.init_process_group("gloo")
    return Distributed(rank, world), local
