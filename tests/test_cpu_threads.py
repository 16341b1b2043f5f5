"""training.cpu_threads: null on the CPU: the faster of torch's default thread count and 1, measured
at start (train_backend.choose_cpu_threads), said in one line, never above the default."""

from types import SimpleNamespace

import pytest
import torch

import train_backend


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def slow_at(threads, monkeypatch):
    """A conv costs 5 ms at `threads` threads and 1 ms at the other count, on a fake clock: the busy
    machine (or the idle one) in miniature, whatever the load of the machine running the test."""
    clock = [0.0]

    def conv2d(*args, **kwargs):
        clock[0] += 0.005 if torch.get_num_threads() == threads else 0.001

    monkeypatch.setattr(train_backend.torch.nn.functional, "conv2d", conv2d)
    monkeypatch.setattr(train_backend, "time", SimpleNamespace(perf_counter=lambda: clock[0]))


@pytest.mark.parametrize("slow, chosen", [(2, 1), (1, 2)])
def test_the_faster_count_is_kept_and_said(two_threads, monkeypatch, slow, chosen):
    slow_at(slow, monkeypatch)
    lines = []
    rng = torch.get_rng_state()
    assert train_backend.choose_cpu_threads(lines.append) == chosen == torch.get_num_threads()
    assert torch.equal(torch.get_rng_state(), rng)  # the probe leaves the global RNG alone
    assert len(lines) == 1 and lines[0].startswith(f"cpu threads: {chosen} ") and "training.cpu_threads=N" in lines[0]


def test_one_thread_is_left_alone(monkeypatch):
    assert torch.get_num_threads() == 1  # conftest: the tests run on one thread
    monkeypatch.setattr(train_backend.torch.nn.functional, "conv2d", None)  # never called
    lines = []
    assert train_backend.choose_cpu_threads(lines.append) == 1 and lines == []
