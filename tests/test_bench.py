"""bench.py (SPEC.md §2): the JSON line on the CPU at a tiny config, FLOPs linear in the batch,
samples_per_s from step_ms, MFU from a given peak. CUDA only: no host sync inside steady-state
train_steps (set_sync_debug_mode), no recompiles after warm-up (torch._dynamo counters)."""

import json

import pytest
import torch
import yaml

import bench
from config import resolve_config
from conftest import tiny_model_config

SIZE = 16  # latent H = W: small and fast; D's patch map is 2x2


def tiny_cfg(**training):
    return resolve_config({
        "data": {"domains": ["a", "b", "c"]},
        "model": tiny_model_config(),
        "loss": {"r1_interval": 2},
        "training": {"batch_size": 4, "amp_dtype": "fp32", "device": "cpu", "num_workers": 0, **training},
    })


@pytest.fixture(scope="module")
def cpu_result():
    return bench.bench(tiny_cfg(), "cpu", steps=3, warmup=1, latent_size=SIZE)


def test_bench_returns_every_key_with_sane_values(cpu_result):
    r = cpu_result
    missing = [k for k in bench.RESULT_KEYS if k not in r]
    assert not missing, missing
    assert (r["batch_size"], r["steps"], r["warmup"]) == (4, 3, 1)
    assert (r["amp_dtype"], r["use_compile"], r["compile_mode"]) == ("fp32", False, "default")
    assert r["device"].startswith("cpu") and r["torch"] == torch.__version__
    assert r["latent_shape"] == [4, SIZE, SIZE] and r["data_device"] == "cpu"
    assert 0 < r["step_ms_min"] <= r["step_ms"] < 60_000
    assert 0 < r["host_ms"] <= r["step_ms"] * 1.5
    assert 0 < r["data_ms"] < r["step_ms"]
    assert r["data_fraction"] == pytest.approx(r["data_ms"] / r["step_ms"])
    assert r["mfu"] is None and r["peak_tflops"] is None  # no known peak for a CPU
    assert r["peak_memory_kind"] == "process_peak_rss" and 50 < r["peak_memory_mb"] < 100_000  # MB
    assert r["oom_skipped"] == 0 and r["compile_fell_back_to_eager"] == []
    json.loads(json.dumps(r))  # the line is plain JSON


def test_flops_count_both_r1_and_plain_steps(cpu_result):
    r = cpu_result
    # R1 adds a double backward through D: the R1 step costs more; r1_interval 2 averages the two
    assert r["flops_r1_step"] > r["flops_plain_step"] > 0
    assert r["flops_per_step"] == pytest.approx((r["flops_r1_step"] + r["flops_plain_step"]) / 2)
    # an independent bound from per-network forwards: a plain step runs, per sample, 8 G, 5 D (3 in
    # the D step on [x, fake_lat, fake_ref], 1 per path in the G step), 7 E and 3 F forwards, and a
    # backward costs at most twice its forward
    f = bench.forward_flops(tiny_cfg(), "cpu", size=SIZE)
    forwards = r["batch_size"] * (8 * f["generator"] + 5 * f["discriminator"] + 7 * f["style_encoder"]
                                  + 3 * f["mapping_network"])
    assert forwards < r["flops_plain_step"] < 3 * forwards


def test_forward_flops_match_the_convolutions_by_hand():
    cfg = tiny_cfg()
    m = cfg["model"]
    c, s, hw = m["gen_channels"], m["style_dim"], SIZE * SIZE
    conv = lambda cin, cout: 2 * hw * cin * cout * 9  # noqa: E731  (3x3, padding 1: one MAC = 2 FLOP)
    adain_fc = 2 * s * 2 * c
    expected = conv(4, c) + m["n_res_blocks"] * (2 * conv(c, c) + 2 * adain_fc) + conv(c, 4)
    assert bench.forward_flops(cfg, "cpu", size=SIZE)["generator"] == expected


def test_flops_per_step_linear_in_batch():
    small = bench.bench(tiny_cfg(batch_size=2), "cpu", steps=1, warmup=0, latent_size=SIZE)
    large = bench.bench(tiny_cfg(batch_size=4), "cpu", steps=1, warmup=0, latent_size=SIZE)
    assert large["flops_per_step"] / small["flops_per_step"] == pytest.approx(2.0, rel=0.05)


def test_samples_per_s_is_batch_over_step_time(cpu_result):
    r = cpu_result
    assert r["samples_per_s"] == pytest.approx(r["batch_size"] * 1000 / r["step_ms"], rel=1e-12)
    assert r["steps_per_s"] == pytest.approx(1000 / r["step_ms"], rel=1e-12)


def write_config(tmp_path):
    path = tmp_path / "bench.yaml"
    cfg = {"data": {"domains": ["a", "b", "c"]}, "model": tiny_model_config(), "loss": {"r1_interval": 2},
           "training": {"batch_size": 4, "amp_dtype": "fp32", "device": "cpu", "num_workers": 0}}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_main_prints_one_json_line(tmp_path, capsys):
    config = write_config(tmp_path)
    rc = bench.main(["--config", config, "--device", "cpu", "--steps", "2", "--warmup", "1", "--latent-size",
                     str(SIZE), "--peak-tflops", "0.5", "training.batch_size=2"])
    assert rc == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out
    r = json.loads(lines[0])
    assert r["batch_size"] == 2 and r["config"] == config and r["overrides"] == ["training.batch_size=2"]
    assert r["peak_tflops"] == 0.5
    assert r["mfu"] == pytest.approx(r["flops_per_step"] / (r["step_ms"] / 1000) / 0.5e12, rel=1e-9)


def test_main_rejects_an_unknown_key(tmp_path, capsys):
    rc = bench.main(["--config", write_config(tmp_path), "--device", "cpu", "training.batchsize=2"])
    assert rc == 2
    assert "training.batchsize" in capsys.readouterr().err


def test_format_table_has_a_row_per_result(cpu_result):
    table = bench.format_table([cpu_result, {**cpu_result, "amp_dtype": "bf16", "mfu": 0.4}]).splitlines()
    assert len(table) == 4 and table[0].startswith("| amp |")
    assert table[2].startswith("| fp32 | off |") and f"{cpu_result['step_ms']:.2f}" in table[2]
    assert "n/a" in table[2] and "40.0%" in table[3]


@pytest.mark.parametrize("name,amp,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H100 80GB HBM3", "fp32", 494.0),
    ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA H200", "fp16", 989.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", 156.0), ("NVIDIA GeForce RTX 4090", "bf16", None),
])
def test_peak_table(name, amp, peak):
    assert bench.peak_tflops_for(name, amp) == peak


# ---------------------------------------------------------------------- CUDA only

@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16", "fp32"])
def test_train_step_has_no_host_sync(amp):
    result = bench.sync_check(tiny_cfg(amp_dtype=amp, device="cuda"), "cuda")
    assert result["train_step"] is None, result["train_step"]


@pytest.mark.cuda
def test_batch_fetch_has_no_host_sync():
    result = bench.sync_check(tiny_cfg(amp_dtype="bf16", device="cuda"), "cuda")
    assert result["fetch"] is None, result["fetch"]


@pytest.mark.cuda
def test_no_recompiles_after_warmup():
    compiled, recompiled, eager = bench.count_recompiles(tiny_cfg(amp_dtype="bf16", device="cuda"), "cuda")
    assert eager == [], f"torch.compile fell back to eager for {eager}"
    assert compiled > 0
    assert recompiled == 0, f"{recompiled} graphs compiled after warm-up (TORCH_LOGS=recompiles shows why)"


@pytest.mark.cuda
def test_bench_on_cuda_reports_device_memory():
    r = bench.bench(tiny_cfg(amp_dtype="bf16", device="cuda"), "cuda", steps=5, warmup=3)
    assert r["peak_memory_kind"] == "cuda_max_allocated" and r["peak_memory_mb"] > 0
    assert r["data_device"].startswith("cuda")
    assert r["samples_per_s"] == pytest.approx(r["batch_size"] * 1000 / r["step_ms"], rel=1e-12)
    if bench.peak_tflops_for(r["device"], "bf16") is not None:
        assert 0 < r["mfu"] < 1
