#!/usr/bin/env bash
# GPU check: the cuda-marked tests and the GPU benchmarks, in one command on a machine with CUDA.
#
#   pip install -r requirements-test.txt -r requirements-app.txt   # the test install, as in the README
#   bash scripts/gpu_check.sh            # from anywhere; results in $OUT (default /tmp/gpu_check)
#
# diffusers must be installed (pip install -r requirements.txt, which the line above includes): the
# tests and the evaluation stage use it.
#
# It runs, most important first, so that a timeout loses the least:
#   1. the cuda-marked tests (no host sync per step, no recompiles after warm-up, CUDA preload, ...)
#   2. bench.py --matrix at the default config (bf16/fp32 x compile off/on, batch 32)
#   3. a batch sweep, bf16 eager: peak memory and the largest batch that fits (doubling until OOM)
#   4. bf16 + compile with CUDA graphs (compile_mode reduce-overhead, compile_cudagraphs true)
#   5. evaluation throughput (bench.py --evaluation): SD1.5-config VAE decode + Inception features
#   6. per latent-space preset (bench.py --latent-spaces): step time, FLOPs, memory; full VAE vs tiny
#      autoencoder decode (not in the CPU dry run: it builds the presets' real widths)
# How long: no stage starts after START_BY seconds (480) and each has its own timeout, so the whole
# command ends within about 9.5 minutes. Results: $OUT holds env.txt (date, GPU, torch, commit),
# status.txt (each stage's exit code and time), stderr.log, cuda_tests.txt, matrix.txt, sweep.txt,
# cudagraphs.txt, latent_spaces.txt and summary.md, the table printed at the end (docs/benchmarks.md explains its columns).
# If a .whl/ folder of wheels is present in the repo root, they are installed first (into /tmp/site).
# Dry run of every path on a CPU (tiny model, minutes):
#   DEVICE=cpu QUICK=1 OUT=/tmp/gpu_check bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-configs/stargan_v2_latent.yaml}
STEPS=${STEPS:-30}
WARMUP=${WARMUP:-10}
SWEEP=${SWEEP:-"64 128 256 512 1024"}
START_BY=${START_BY:-480}  # seconds: no stage starts later than this
EXTRA=()
if [ -n "${QUICK:-}" ]; then  # CPU dry run: tiny model, few steps, one thread, no warm-up to speak of
  EXTRA=(model.gen_channels=8 model.n_res_blocks=2 model.style_dim=8 model.latent_dim=4
         model.mapping_hidden_dim=16 model.mapping_shared_layers=2 model.style_encoder_channels=8
         model.disc_channels=8 training.num_workers=0 --threads 1 --latent-size 16)
  STEPS=2 WARMUP=1 SWEEP="8 16" EVAL_BATCH=2
fi
mkdir -p "$OUT"
ERR="$OUT/stderr.log"
: > "$ERR"

if ls .whl/*.whl >/dev/null 2>&1; then  # optional: wheels for a machine without a package index
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>>"$ERR" \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "warning: wheel install failed" | tee -a "$ERR"
fi
if ! python3 -c "import diffusers" 2>/dev/null; then
  echo "warning: diffusers is not installed (pip install -r requirements.txt): tests that need it will fail or skip" \
    | tee -a "$ERR"
fi
export PYTHONUNBUFFERED=1

left() {  # seconds a stage may run: its cap, cut so that everything ends by START_BY + 80
  local cap=$1 remain=$((START_BY + 80 - SECONDS))
  echo $((remain < cap ? remain : cap))
}
stage() {  # stage NAME CAP OUTFILE CMD...: run CMD under a timeout unless it is too late
  local name=$1 cap=$2 out=$3
  shift 3
  if [ "$SECONDS" -ge "$START_BY" ]; then
    echo "$name: not started (${SECONDS}s elapsed)" | tee -a "$OUT/status.txt"
    return 1
  fi
  local t0=$SECONDS limit
  limit=$(left "$cap")
  echo "== $name (limit ${limit}s) at ${SECONDS}s" | tee -a "$ERR"
  timeout --kill-after=10 "$limit" "$@" >>"$out" 2>>"$ERR"
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/status.txt"
  return $rc
}

{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
                                  'available', torch.cuda.is_available())"
  git log -1 --format='commit %H' 2>/dev/null; git status --short 2>/dev/null | head -20
} > "$OUT/env.txt" 2>>"$ERR"
: > "$OUT/status.txt"

# 1. cuda-marked tests (the whole suite's; CPU dry run: only this file's CPU tests, as a path check)
if [ "$DEVICE" = cpu ]; then
  stage tests 180 "$OUT/cuda_tests.txt" python3 -m pytest -q -rfEs -p no:cacheprovider tests/test_bench.py
else
  stage tests 180 "$OUT/cuda_tests.txt" python3 -m pytest -m cuda -v -rfEs -p no:cacheprovider tests/
fi

# 2. the matrix at the default config (batch 32): JSON lines, then a markdown table
stage matrix 300 "$OUT/matrix.txt" python3 bench.py --config "$CONFIG" --device "$DEVICE" --matrix \
  --steps "$STEPS" --warmup "$WARMUP" "${EXTRA[@]}"

# 3. batch sweep, bf16 eager: stop at the first batch that skipped a phase for OOM (or failed)
for batch in $SWEEP; do
  stage "sweep_b$batch" 60 "$OUT/sweep.txt" python3 bench.py --config "$CONFIG" --device "$DEVICE" \
    --steps 5 --warmup 2 training.amp_dtype=bf16 training.batch_size="$batch" "${EXTRA[@]}" || break
  tail -n 1 "$OUT/sweep.txt" | grep -q '"oom_skipped": 0,' || break
done

# 4. CUDA graphs through torch.compile (compile_cudagraphs decides, whatever the mode)
stage cudagraphs 150 "$OUT/cudagraphs.txt" python3 bench.py --config "$CONFIG" --device "$DEVICE" \
  --steps "$STEPS" --warmup "$WARMUP" training.amp_dtype=bf16 training.use_compile=true \
  training.compile_mode=reduce-overhead training.compile_cudagraphs=true "${EXTRA[@]}"

# 5. evaluation throughput: random SD1.5-config VAE decode + Inception features (+ LPIPS). No weights
# are downloaded: torchvision's Inception v3 with random weights has the real TF-Inception's cost (a
# tiny stand-in where torchvision is missing, e.g. the CPU dry run). Its output stays out of $OUT,
# which keeps to the files above; the summary below prints it.
EVAL_OUT=/tmp/gpu_check_eval.txt
: > "$EVAL_OUT"
python3 - /tmp/inception_random.pt >>"$ERR" 2>&1 <<'PY'
import sys

import torch

try:
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    net.fc = torch.nn.Identity()  # 2048-d pool features
except Exception:  # no torchvision: a stand-in with the right interface
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2048, 8, stride=8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
torch.jit.save(torch.jit.script(net.eval()), sys.argv[1])
PY
stage evaluation 120 "$EVAL_OUT" python3 bench.py --config "$CONFIG" --device "$DEVICE" --evaluation \
  --inception-weights /tmp/inception_random.pt --eval-batch "${EVAL_BATCH:-32}" "${EXTRA[@]}"

# 6. the latent-space presets (random weights): JSON lines
if [ -z "${QUICK:-}" ]; then
  stage latent_spaces 120 "$OUT/latent_spaces.txt" python3 bench.py --config "$CONFIG" --device "$DEVICE" \
    --latent-spaces --steps 3
fi

EVAL_OUT="$EVAL_OUT" python3 - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, os, sys

out = sys.argv[1]


def rows(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return []
    result = []
    for line in open(path):
        if line.startswith("{"):
            try:
                result.append(json.loads(line))
            except ValueError:
                pass
    return result


def mfu(r):
    return "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"


print("\n## gpu_check summary")
if os.path.exists(os.path.join(out, "env.txt")):
    print("\n".join(open(os.path.join(out, "env.txt")).read().splitlines()[:3]))
print("| run | amp | compile | batch | step ms | samples/s | host ms | data % | MFU | peak MB | oom |")
print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for name in ("matrix.txt", "cudagraphs.txt", "sweep.txt"):
    for r in rows(name):
        compiled = (r["compile_mode"] + (" +graphs" if r["compile_cudagraphs"] else "")) if r["use_compile"] else "off"
        if r.get("compile_fell_back_to_eager"):
            compiled += " (fell back: " + ",".join(r["compile_fell_back_to_eager"]) + ")"
        print(f"| {name[:-4]} | {r['amp_dtype']} | {compiled} | {r['batch_size']} | {r['step_ms']:.2f} | "
              f"{r['samples_per_s']:.0f} | {r['host_ms']:.2f} | {100 * r['data_fraction']:.3f} | {mfu(r)} | "
              f"{r['peak_memory_mb']:.0f} | {r['oom_skipped']} |")
first = (rows("matrix.txt") or rows("sweep.txt") or [{}])[0]
if first:
    g = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    print(f"flops_per_step {g(first['flops_per_step'])} (R1 step {g(first['flops_r1_step'])}, plain "
          f"{g(first['flops_plain_step'])}, r1_interval {first['r1_interval']}); device {first['device']}; "
          f"torch {first['torch']}")
tests = open(os.path.join(out, "cuda_tests.txt")).read().strip().splitlines() if os.path.exists(
    os.path.join(out, "cuda_tests.txt")) else []
print("tests:", tests[-1] if tests else "no output")
for line in tests:
    if line.startswith(("FAILED", "ERROR")):
        print("  " + line[:300])
for line in open(os.environ["EVAL_OUT"]) if os.path.exists(os.environ.get("EVAL_OUT", "")) else []:
    if line.startswith("{"):
        e = json.loads(line)
        print(f"evaluation: {e['images_per_s_decode']:.1f} img/s decode, {e['images_per_s_decode_features']:.1f} img/s "
              f"decode+features ({e['amp_dtype']}, batch {e['batch_size']}, {e['image_size']} px); full protocol "
              f"({e['protocol_images']} images) ~{e['protocol_minutes_extrapolated']:.1f} min")
for r in rows("latent_spaces.txt"):
    if "preset" in r:
        print(f"latent space {r['preset']}: {'x'.join(map(str, r['latent_shape']))}, step {r['step_ms']:.1f} ms "
              f"(batch {r['batch_size']}), {r['gflops_per_step']:.1f} GFLOP, {r['activation_mb']:.0f} MB activations")
    else:
        tiny = "none" if r["tiny_ms"] is None else f"{r['tiny_ms']:.1f} ms"
        print(f"decode {r['family']} ({r['image_size']} px): full VAE {r['full_ms']:.1f} ms, tiny {tiny}")
status = os.path.join(out, "status.txt")
print("stages:", "; ".join(open(status).read().split("\n")).strip("; ") if os.path.exists(status) else "none")
EOF
