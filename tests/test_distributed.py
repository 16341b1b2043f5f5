"""Multi-GPU training through torchrun, run here as 2 CPU processes on gloo."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from conftest import ROOT, tiny_run_config, write_latent_folders


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(cfg, *extra, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "run.py", "--config", cfg, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_two_process_run_and_resume(tmp_path):
    write_latent_folders(tmp_path / "data")
    cfg = tiny_run_config(tmp_path, training={"epochs": 2, "log_json": True, "log_interval": 1},
                          visualization={"every_epochs": 1, "vae_path": None})
    cfg["data"]["samples_per_epoch"] = 16  # 8 per rank: 2 steps of 4 on each
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))

    proc = torchrun(str(path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in proc.stdout.splitlines() if line.startswith("{")]
    assert steps == [1, 2, 3, 4]  # each step logged once (rank 0 only), 2 steps per epoch
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == [".run.lock", "config.yaml", "epoch_0001.pt", "epoch_0002.pt", "latest.pt", "vis"]
    assert sorted(os.listdir(out / "vis")) == ["epoch_0001.png", "epoch_0002.png"]
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert ckpt["step"] == 4 and len(ckpt["rng_per_rank"]) == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for sd in ckpt["models"].values() for k in sd)
    # the per-rank RNG streams differ (different z on each rank)
    assert not torch.equal(ckpt["rng_per_rank"][0]["torch"], ckpt["rng_per_rank"][1]["torch"])
    assert proc.stdout.count("done: 2 epochs") == 1

    proc = torchrun(str(path), "--resume", "training.epochs=3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in proc.stdout.splitlines() if line.startswith("{")]
    assert steps == [5, 6]
    assert torch.load(out / "latest.pt", weights_only=True)["step"] == 6


def _sync_worker(rank, port, perturb, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from distributed import Distributed

    dist = Distributed(rank, 2)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    # gradient averaging: rank r contributes grad r+1 -> both see 1.5
    net.weight.grad = torch.full_like(net.weight, float(rank + 1))
    flags = dist.average_gradients([net.weight, net.bias], torch.tensor(float(rank)))
    ok = bool(torch.allclose(net.weight.grad, torch.full_like(net.weight, 1.5))) and float(flags) == 1.0
    ok = ok and torch.equal(net.bias.grad, torch.zeros_like(net.bias))  # missing grads count as zeros
    if perturb and rank == 1:
        with torch.no_grad():
            net.weight[0, 0] += 1e-3
    try:
        dist.check_in_sync({"net": net})
        diverged = False
    except RuntimeError:
        diverged = True
    results[rank] = (ok, diverged, dist.max_int(rank * 7))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("perturb", [False, True])
def test_gradient_average_and_sync_check(perturb):
    results = mp.Manager().dict()
    mp.spawn(_sync_worker, args=(free_port(), perturb, results), nprocs=2)
    for rank in (0, 1):
        ok, diverged, max_int = results[rank]
        assert ok and diverged == perturb and max_int == 7


@pytest.mark.slow
def test_two_process_run_evaluates_on_rank_zero(tmp_path, tiny_vae_dir):
    """evaluation.every_epochs under torchrun: rank 0 evaluates (one metrics.jsonl line per epoch,
    printed once), the other rank waits for its verdict, and both write best.pt together."""
    import metrics
    from conftest import write_random_alexnet
    from test_metrics import PlainFormStandIn, script_to

    write_latent_folders(tmp_path / "data", domains=("a", "b"), files=4)
    cfg = tiny_run_config(tmp_path, training={"epochs": 2, "log_json": True, "log_interval": 100},
                          visualization={"every_epochs": 10, "vae_path": None})
    cfg["data"].update(domains=["a", "b"], samples_per_epoch=16)
    torch.manual_seed(0)
    cfg["evaluation"] = {"every_epochs": 1, "num_sources": 2, "num_outs": 2, "vae_path": tiny_vae_dir,
                         "inception_weights": script_to(tmp_path / "inception.pt", PlainFormStandIn()),
                         "lpips_weights": str(tmp_path / metrics.ALEXNET_FILE)}
    write_random_alexnet(tmp_path / metrics.ALEXNET_FILE)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = torchrun(str(path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert [line for line in proc.stdout.splitlines() if line.startswith('{"step"')] == lines
    best = torch.load(tmp_path / "out" / "best.pt", weights_only=True)
    assert best["best"]["metric"] == "FID_latent/mean" and len(best["rng_per_rank"]) == 2


@pytest.mark.slow
def test_a_failure_on_rank_0_alone_stops_every_rank(tmp_path):
    """Rank 0 alone writes the grid: when that write fails (a folder stands where the picture goes;
    the folder itself passes the writability check at start), every rank must stop, the others not
    wait in a collective until a timeout; and the checkpoint of that epoch, written before the grid,
    is intact."""
    import time

    write_latent_folders(tmp_path / "data")
    vis = tmp_path / "vis"
    (vis / "epoch_0001.png").mkdir(parents=True)
    cfg = tiny_run_config(tmp_path, training={"epochs": 2},
                          visualization={"every_epochs": 1, "vae_path": None, "save_dir": str(vis)})
    cfg["data"]["samples_per_epoch"] = 16
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start = time.monotonic()
    proc = torchrun(str(path))
    assert proc.returncode != 0 and time.monotonic() - start < 120, proc.stderr[-3000:]
    assert f"cannot write {vis / 'epoch_0001.png'}" in proc.stderr
    assert "run.py: error: rank 1: another rank failed (its error is above); stopping too" in proc.stderr
    assert torch.load(tmp_path / "out" / "latest.pt", weights_only=True)["epoch"] == 1
