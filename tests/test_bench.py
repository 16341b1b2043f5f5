"""bench.py: the JSON line on the CPU at a tiny config; the plain step's FLOPs counted exactly from
per-network forwards, linear in the batch; step_ms the median iteration and samples_per_s, MFU from
it; no recompiles after warm-up (torch._dynamo counters; slow on the CPU). CUDA only: no host sync
inside steady-state train_steps (set_sync_debug_mode)."""

import json
import os

import pytest
import torch
import yaml

import bench
import benchmarks
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
    assert 0 < r["step_ms_min"] <= r["step_ms"]
    assert 0 < r["host_ms"] <= r["step_ms"]  # each iteration's train_step is part of that iteration
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
    assert r["flops_plain_step"] == r["batch_size"] * plain_step_flops_per_sample(tiny_cfg())


def plain_step_flops_per_sample(cfg):
    """A step without R1, counted from per-network forwards (convolutions and matmuls only).

    A forward with grad costs 3x: its backward computes the input gradient and the weight gradient,
    each as costly as the forward, except where the layer's input needs no gradient (the data, a
    z, a style made under no_grad): then only the weight gradient. D's weights get gradients in the
    G step too (requires_grad is never toggled); it only does not step.
    """
    f = bench.forward_flops(cfg, "cpu", size=SIZE)
    g, d, e, fm = f["generator"], f["discriminator"], f["style_encoder"], f["mapping_network"]
    m, hw = cfg["model"], SIZE * SIZE
    g_in = 2 * hw * 4 * m["gen_channels"] * 9  # G's first conv, on the content x
    g_fc = 2 * m["n_res_blocks"] * 2 * m["style_dim"] * 2 * m["gen_channels"]  # every AdaIN fc, on the style
    d_in = 2 * hw * 4 * m["disc_channels"] * 9  # D's first conv
    e_in = 2 * hw * 4 * m["style_encoder_channels"] * 9  # E's first conv
    f_in = 2 * m["latent_dim"] * m["mapping_hidden_dim"]  # F's first linear, on z
    d_step = fm + e + 2 * g + 3 * (3 * d - d_in)  # no_grad F, E, G; D on [x, fake_lat, fake_ref]
    ref_path = (3 * e  # no_grad E(x_ref), E(x_ref2), E(x, y_src)
                + (3 * g - g_in - g_fc) + 3 * d + 3 * e  # fake = G(x, s_ref), D(fake), E(fake)
                + g + (3 * g - g_fc))  # no_grad fake_2; cycle G(fake, s_src) with s_src made without grad
    lat_path = ((3 * fm - f_in) + fm + (3 * e - e_in)  # s_lat, no_grad s_lat2, s_src = E(x, y_src)
                + (3 * g - g_in) + 3 * d + 3 * e  # fake = G(x, s_lat), D(fake), E(fake)
                + g + 3 * g)  # no_grad fake_2; cycle G(fake, s_src)
    return d_step + ref_path + lat_path


def test_forward_flops_match_the_convolutions_by_hand():
    cfg = tiny_cfg()
    m = cfg["model"]
    c, s, hw = m["gen_channels"], m["style_dim"], SIZE * SIZE
    conv = lambda cin, cout: 2 * hw * cin * cout * 9  # noqa: E731  (3x3, padding 1: one MAC = 2 FLOP)
    adain_fc = 2 * s * 2 * c
    expected = conv(4, c) + m["n_res_blocks"] * (2 * conv(c, c) + 2 * adain_fc) + conv(c, 4)
    assert bench.forward_flops(cfg, "cpu", size=SIZE)["generator"] == expected


def test_the_step_and_forwards_run_in_the_configs_latent_space(tmp_path, capsys):
    """A 16-channel shifted space (SD3's numbers): G's first and last convolutions see 16 channels,
    and bench.py's step line runs on 16-channel data (a 4-channel batch would be refused)."""
    cfg = tiny_cfg()
    cfg["model"]["latent_channels"] = 16
    cfg["training"].update(latent_scale=1.5305, latent_shift=0.0609)
    m, hw = cfg["model"], SIZE * SIZE
    first_and_last = 2 * hw * 16 * m["gen_channels"] * 9 * 2
    four = bench.forward_flops(tiny_cfg(), "cpu", size=SIZE)["generator"]
    sixteen = bench.forward_flops(cfg, "cpu", size=SIZE)["generator"]
    assert sixteen - four == first_and_last - 2 * hw * 4 * m["gen_channels"] * 9 * 2
    config = tmp_path / "sd3.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert bench.main(["--config", str(config), "--device", "cpu", "--steps", "1", "--warmup", "0",
                       "--latent-size", str(SIZE)]) == 0
    r = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][0])
    assert r["latent_shape"] == [16, SIZE, SIZE] and r["flops_per_step"] > 0


def test_flops_per_step_linear_in_batch():
    small = bench.bench(tiny_cfg(batch_size=2), "cpu", steps=1, warmup=0, latent_size=SIZE)
    large = bench.bench(tiny_cfg(batch_size=4), "cpu", steps=1, warmup=0, latent_size=SIZE)
    assert large["flops_per_step"] == 2 * small["flops_per_step"]  # every sample costs the same


def test_step_ms_is_the_median_iteration(monkeypatch):
    """Fed known iteration times, every derived number is exact: step_ms is the median (a slow
    outlier such as an R1 step does not move it), samples_per_s = batch_size x 1000 / step_ms,
    MFU = flops_per_step / step time / peak."""
    real_time_steps = bench.time_steps

    def known_times(trainer, fetch, steps, device):
        real_time_steps(trainer, fetch, steps, device)  # the real iterations still run
        return [40.0, 10.0, 20.0, 25.0, 500.0], [4.0, 1.0, 2.0, 2.5, 50.0]

    monkeypatch.setattr(bench, "time_steps", known_times)
    flops = {"flops_per_step": 3e9, "flops_r1_step": 4e9, "flops_plain_step": 2e9}
    r = bench.bench(tiny_cfg(), "cpu", steps=5, warmup=0, peak_tflops=0.5, flops=flops, latent_size=SIZE)
    assert (r["step_ms"], r["step_ms_min"], r["step_ms_mean"], r["host_ms"]) == (25.0, 10.0, 119.0, 2.5)
    assert (r["samples_per_s"], r["steps_per_s"]) == (160.0, 40.0)  # batch 4
    assert r["achieved_tflops"] == pytest.approx(0.12, rel=1e-12)  # 3e9 FLOP in 25 ms
    assert r["mfu"] == pytest.approx(0.24, rel=1e-12)
    assert r["data_fraction"] == r["data_ms"] / 25.0


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


@pytest.mark.slow
def test_data_startup_lines(tmp_path, capsys):
    """--data-startup: per-file and packed sets of the same latents, fresh processes (two at once,
    then reading everything), one JSON line per rank with the figures docs/benchmarks.md reports."""
    config = write_config(tmp_path)
    for layout, extra in (("files", []), ("packed", ["--ranks", "2", "--touch"])):
        root = tmp_path / layout
        assert bench.main(["--config", config, "--data-startup", "31", "--latent-size", "8", "--layout", layout,
                           "--data-root", str(root), *extra]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert [r["rank"] for r in lines] == list(range(len(lines))) and len(lines) == (2 if extra else 1)
        for r in lines:
            assert r["layout"] == layout and r["latents"] == 31 and r["latent_shape"] == [4, 8, 8]
            assert 0 < r["startup_s"] and 0 < r["gather_ms"] and r["peak_rss_mb"] >= r["rss_mb"] > 0
            assert r["rss_mb"] == pytest.approx(r["rss_anon_mb"] + r["rss_file_mb"], abs=1)
        assert sorted(os.listdir(root)) == ["a", "b", "c"]  # kept: --data-root
    assert sorted(os.listdir(root / "a")) == ["index.json", "latents.npy"]
    assert len(os.listdir(tmp_path / "files" / "b")) == 10  # 31 latents: 11, 10, 10
    assert all(r["touch_all_s"] > 0 and "gather_ms_float16_copy" in r for r in lines)


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


@pytest.mark.parametrize("device,amp", [pytest.param("cpu", "fp32", marks=pytest.mark.slow),
                                        pytest.param("cuda", "bf16", marks=pytest.mark.cuda)])
def test_no_recompiles_after_warmup(device, amp):
    """Real torch.compile (on the CPU, Inductor's C++ backend: ~100 s on 2 cores in fp32, ~150 s in
    bf16, ~10 s with a warm Inductor cache): every graph is built in the warm-up steps, none after,
    R1 steps included."""
    compiled, recompiled, eager = bench.count_recompiles(tiny_cfg(amp_dtype=amp, device=device), device)
    assert eager == [], f"torch.compile fell back to eager for {eager}"
    assert compiled > 0
    assert recompiled == 0, f"{recompiled} graphs compiled after warm-up (TORCH_LOGS=recompiles shows why)"


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
def test_bench_on_cuda_reports_device_memory():
    r = bench.bench(tiny_cfg(amp_dtype="bf16", device="cuda"), "cuda", steps=5, warmup=3)
    assert r["peak_memory_kind"] == "cuda_max_allocated" and r["peak_memory_mb"] > 0
    assert r["data_device"].startswith("cuda")
    if bench.peak_tflops_for(r["device"], "bf16") is not None:
        assert 0 < r["mfu"] < 1


def test_evaluation_throughput_and_protocol_extrapolation(tmp_path, monkeypatch):
    """--evaluation: images/s through decode + features, and the full protocol's time from it."""
    import metrics
    from test_metrics import PlainFormStandIn, script_to

    monkeypatch.setattr(metrics, "INCEPTION_DIM", 16)
    monkeypatch.setattr(benchmarks, "SD15_VAE_CONFIG", dict(block_out_channels=[8, 16], latent_channels=4, norm_num_groups=8,
                                                       down_block_types=["DownEncoderBlock2D"] * 2,
                                                       up_block_types=["UpDecoderBlock2D"] * 2))
    weights = script_to(tmp_path / "inception.pt", PlainFormStandIn(dim=16))
    r = benchmarks.evaluation_throughput("cpu", weights, latent_size=8, batch_size=4, batches=2)
    assert r["protocol_images"] == 5 * 4 * 2 * 500 * 10 + 5 * 500  # 20 tasks x 2 modes x 500 x 10, and the reals
    assert r["images_per_s_decode"] > r["images_per_s_decode_features"] > 0
    assert r["protocol_minutes_extrapolated"] == pytest.approx(
        r["protocol_images"] / r["images_per_s_decode_features"] / 60)
    assert r["lpips_ms_per_image"] is None and r["inception"].startswith("inception.pt:")


@pytest.mark.slow
def test_export_latency_times_every_graph_and_backend():
    rows = benchmarks.export_latency(tiny_cfg(), [1, 2], latent_size=SIZE, repeats=1, warmup=0, threads=1)
    assert [(r["graph"], r["batch_size"]) for r in rows] == [
        ("latent_guided", 1), ("latent_guided", 2), ("reference_guided", 1), ("reference_guided", 2)]
    for r in rows:
        assert all(r[f"{name}{kind}_ms_per_image"] > 0 for name in ("eager", "onnx", "pt2") for kind in ("", "_cpu"))
        assert r["latent_shape"] == [4, SIZE, SIZE] and r["weights"] == "random" and r["threads"] == 1


def test_latent_spaces_prints_a_row_per_preset_and_vae_family(tmp_path, capsys, monkeypatch):
    """bench.py --latent-spaces end to end, on small stand-ins: presets with tiny widths (the 4- and
    32-channel spaces, 256 and 512 px) and test-sized VAE configs decoding 32 px."""
    presets = tmp_path / "presets"
    presets.mkdir()
    for name, channels, down in (("sd15_256", 4, 8), ("sd15_512", 4, 8), ("dcae_256", 32, 32)):
        preset = {"model": tiny_model_config(latent_channels=channels), "training": {"latent_downsample": down}}
        (presets / f"{name}.yaml").write_text(yaml.safe_dump(preset))
    monkeypatch.setattr(bench, "PRESETS", str(presets))
    monkeypatch.setattr(bench, "DECODE_SIZE", 32)
    monkeypatch.setattr(benchmarks, "SD15_VAE_CONFIG", dict(
        block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2, norm_num_groups=8,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4))
    monkeypatch.setattr(benchmarks, "DCAE_F32C32_CONFIG", dict(
        latent_channels=32, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(32, 32),
        decoder_block_out_channels=(32, 32), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), decoder_norm_types="rms_norm",
        decoder_act_fns="silu"))
    devices, step, decodes = [], benchmarks.latent_space_step, benchmarks.decode_costs
    monkeypatch.setattr(bench, "latent_space_step", lambda *a, device, **k: devices.append(device) or step(
        *a, device=device, **k))
    monkeypatch.setattr(bench, "decode_costs", lambda *a, device, **k: devices.append(device) or decodes(
        *a, device=device, **k))
    assert bench.main(["--config", write_config(tmp_path), "--device", "cpu", "--latent-spaces", "--steps", "1"]) == 0
    assert [str(d) for d in devices] == ["cpu"] * 4  # bench.py's --device reaches every measurement
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    steps = {r["preset"]: r for r in rows if "preset" in r}
    assert {k: v["latent_shape"] for k, v in steps.items()} == {"sd15_256": [4, 32, 32], "sd15_512": [4, 64, 64],
                                                              "dcae_256": [32, 8, 8]}
    assert steps["sd15_512"]["gflops_per_step"] == pytest.approx(4 * steps["sd15_256"]["gflops_per_step"], rel=0.02)
    assert all(r["step_ms"] > 0 and r["activation_mb"] > 0 for r in steps.values())
    decodes = [r for r in rows if "family" in r]
    assert [r["family"] for r in decodes] == ["SD1.5 / SDXL", "SD3 / FLUX.1", "DC-AE f32c32"]
    assert all(r["full_ms"] > 0 for r in decodes) and decodes[-1]["tiny_ms"] is None and decodes[0]["tiny_ms"] > 0
