#!/usr/bin/env bash
# Side-by-side throughput: our candle models (fast CPU kernels) against the PyTorch reference,
# on the same first N training images and the same thread count, one after the other, and
# the ratios. Training: one epoch, batch 64, the study's optimizers. Inference: batch 1000.
#
#   scripts/bench-vs-torch.sh [baseline|resnet18|both] [IMAGES] [THREADS] [REPEATS]
#
# Prints the CPU model, its vector extensions and torch's CPU capability first, a line per
# repeat, then per model the medians and spreads (min-max) over the repeats.
#
# Env: PYTHON (required: a python with torch, and torchvision for resnet18; TORCH_PYTHON is
#      taken too), TORCH_REF (default ../shared/peers/torch_reference.py, relative to the
#      repository), DATA (required: the folder with the four Fashion-MNIST files, e.g.
#      Debian's /usr/share/datasets/fashion-mnist),
#      WITH_CANDLE=1 also runs the portable path (candle's ops only, as a GPU runs them),
#      FMNIST_CPU=avx2 stands in for an AVX2-only machine on an AVX-512 CPU: our side runs
#      its AVX2 kernels, and PyTorch is capped likewise (ATEN_CPU_CAPABILITY, and oneDNN's and
#      MKL's own ISA limits); the level each side ran at is printed.
set -euo pipefail
cd "$(dirname "$0")/.."

models=${1:-both}
images=${2:-3200}
threads=${3:-2}
repeats=${4:-1}
python=${PYTHON:-${TORCH_PYTHON:-}}
if [ -z "$python" ]; then
  echo "error: set PYTHON (or TORCH_PYTHON) to a python that has torch installed (e.g. a venv's bin/python)" >&2
  exit 2
fi
torch_ref=${TORCH_REF:-../shared/peers/torch_reference.py}
data=${DATA:?set DATA to the folder holding the four Fashion-MNIST files (e.g. /usr/share/datasets/fashion-mnist)}
[ "$models" = both ] && models="baseline resnet18"
if [ "${FMNIST_CPU:-auto}" = avx2 ]; then
  export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
fi

for tool in "$python" "$torch_ref" "$data"; do
  [ -e "$tool" ] || { echo "error: $tool not found (set PYTHON / TORCH_REF / DATA)" >&2; exit 2; }
done
# The reference's ResNet-18 comes from torchvision: check before minutes of benchmarking.
case " $models " in *" resnet18 "*) need="torch, torchvision" ;; *) need="torch" ;; esac
"$python" -c "import $need" 2>/dev/null ||
  { echo "error: $python cannot import $need (pip install ${need/, / } into it)" >&2; exit 2; }

cargo build --release -q
bin=${CARGO_TARGET_DIR:-target}/release/fmnist-pipe
ours() { # model [fast|portable]
  "$bin" bench --model "$1" --images "$images" --threads "$threads" \
    --data "$data" --kernels "${2:-fast}" --json
}

torch_infer() { # model -> images/s of eval-mode forward over the first N images, batch 1000
  "$python" - "$1" "$images" "$threads" "$data" "$torch_ref" <<'PY'
import importlib.util, os, sys, time, json, torch
model, n, threads, data, ref = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
torch.set_num_threads(threads)
spec = importlib.util.spec_from_file_location("torch_reference", ref)
tr = importlib.util.module_from_spec(spec); spec.loader.exec_module(tr)
x = tr.read_idx(os.path.join(data, "train-images-idx3-ubyte.gz"))[:n].astype("float32") / 255.0
x = (torch.from_numpy(x).unsqueeze(1) - 0.2860) / 0.3530
m = (tr.Baseline() if model == "baseline" else tr.resnet18()).eval()
with torch.no_grad():
    m(x[:64])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        m(x[i:i + 1000]).numpy()
    print(json.dumps({"infer_images_per_s": n / (time.perf_counter() - t0)}))
PY
}

printf '# %s  images=%s threads=%s  load average: %s  cpus: %s\n' \
  "$(date -u +%FT%TZ)" "$images" "$threads" "$(cut -d' ' -f1-3 /proc/loadavg)" "$(nproc)"
# Which machine: the figures differ by vector extension (AVX2 only vs AVX-512).
printf '# cpu: %s\n' "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
printf '# vector extensions: %s\n' \
  "$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|avx2|fma|avx512[a-z_]*|amx[a-z_]*)$' | sort -u | tr '\n' ' ')"
printf '# torch: %s\n' "$("$python" -c 'import torch; print(torch.__version__, "cpu capability", torch.backends.cpu.get_cpu_capability())')"
# The machine's ceiling for these models: PyTorch's sgemm at this thread count (2048^3,
# median of 10), against which the FLOPs per image (README, Speed) are read.
printf '# sgemm (torch, %s threads, 2048x2048x2048, median of 10): %s GFLOP/s\n' "$threads" \
  "$("$python" - "$threads" <<'PY'
import statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
a @ b
times = []
for _ in range(10):
    t0 = time.perf_counter(); a @ b; times.append(time.perf_counter() - t0)
print(f"{2 * 2048**3 / statistics.median(times) / 1e9:.0f}")
PY
)"
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for model in $models; do
  for _ in $(seq "$repeats"); do
    o=$(ours "$model")
    t=$("$python" "$torch_ref" --model "$model" --epochs 1 --limit "$images" --threads "$threads" --data "$data")
    ti=$(torch_infer "$model")
    c='{}'
    [ "${WITH_CANDLE:-0}" = 1 ] && c=$(ours "$model" portable)
    "$python" - "$model" "$o" "$t" "$ti" "$c" <<'PY'
import json, sys
model, o, t, ti, c = sys.argv[1], *map(json.loads, sys.argv[2:])
tr, ir = o["train_images_per_s"] / t["train_images_per_s"], o["infer_images_per_s"] / ti["infer_images_per_s"]
line = (f"{model:9s} train ours {o['train_images_per_s']:7.1f}  torch {t['train_images_per_s']:7.1f}  ratio {tr:5.2f}x | "
        f"infer ours {o['infer_images_per_s']:7.1f}  torch {ti['infer_images_per_s']:7.1f}  ratio {ir:5.2f}x | "
        f"peak RSS {o['peak_rss_mib']:.0f} MiB | ours at {o.get('cpu_level', '?')}")
if c:
    line += f" | portable train {c['train_images_per_s']:.1f} infer {c['infer_images_per_s']:.1f}"
print(line)
PY
    echo "{\"model\": \"$model\", \"ours\": $o, \"torch\": $t, \"torch_infer\": $ti}" >> "$results"
  done
done
# Medians and spreads over the repeats (the VM's speed drifts: compare like with like).
"$python" - "$results" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for model in dict.fromkeys(r["model"] for r in runs):
    rs = [r for r in runs if r["model"] == model]
    def show(name, xs):
        return f"{name} {statistics.median(xs):7.1f} ({min(xs):.1f}-{max(xs):.1f})"
    ot = [r["ours"]["train_images_per_s"] for r in rs]
    tt = [r["torch"]["train_images_per_s"] for r in rs]
    oi = [r["ours"]["infer_images_per_s"] for r in rs]
    ti = [r["torch_infer"]["infer_images_per_s"] for r in rs]
    tr = [a / b for a, b in zip(ot, tt)]
    ir = [a / b for a, b in zip(oi, ti)]
    print(f"median of {len(rs)}: {model:9s} train {show('ours', ot)} {show('torch', tt)} "
          f"ratio {statistics.median(tr):.2f}x ({min(tr):.2f}-{max(tr):.2f}) | infer {show('ours', oi)} "
          f"{show('torch', ti)} ratio {statistics.median(ir):.2f}x ({min(ir):.2f}-{max(ir):.2f})")
PY
