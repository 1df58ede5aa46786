#!/usr/bin/env bash
# One prepared run on a GPU machine, through the binary alone (no Rust toolchain, no network
# needed there): builds nothing, finds the CUDA runtime libraries, then
#   1. `fmnist-pipe check`: a few training steps of both models on the GPU against the CPU's
#      portable path (losses, first-step gradients, weights and eval logits within the stated
#      tolerance), as JSON;
#   2. the study on the GPU, shortened with --set limits;
#   3. the full study (stopped at FULL_TIMEOUT seconds so the whole script fits in ~8 minutes);
# and prints per-stage times, images/s and accuracies as JSON (one object per study).
#
#   scripts/gpu-check.sh
#
# Env:
#   FMNIST_BIN    the CUDA build (default: target/cuda/fmnist-pipe-cuda, as scripts/cuda-build.sh
#                 leaves it)
#   DATA          folder with the four Fashion-MNIST .gz files (default: gpu-data/ in the repo,
#                 else /usr/share/datasets/fashion-mnist)
#   DEVICE        default cuda (cpu runs the same script on a machine without a GPU)
#   WORK          where the studies run (default: $OUT/gpu-check when $OUT is set, else
#                 target/gpu-check)
#   FULL=0        skip the full study; FULL_TIMEOUT (default 300) caps it
#   TORCH_PYTHON  optional: a python with a CUDA PyTorch, to time ../shared/peers'
#                 reference models on the same GPU
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

bin=${FMNIST_BIN:-target/cuda/fmnist-pipe-cuda}
device=${DEVICE:-cuda}
full=${FULL:-1}
full_timeout=${FULL_TIMEOUT:-300}
if [ -n "${DATA:-}" ]; then
  data=$DATA
elif [ -d gpu-data ]; then
  data=$repo/gpu-data
else
  data=/usr/share/datasets/fashion-mnist
fi
work=${WORK:-${OUT:+$OUT/gpu-check}}
work=${work:-target/gpu-check}

[ -x "$bin" ] || { echo "error: no binary at $bin (set FMNIST_BIN; build it with scripts/cuda-build.sh)" >&2; exit 2; }
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  [ -e "$data/$f.gz" ] || [ -e "$data/$f" ] || { echo "error: $data has no $f(.gz) (set DATA)" >&2; exit 2; }
done
data=$(cd "$data" && pwd)
mkdir -p "$work"
work=$(cd "$work" && pwd)

say() { printf '\n== %s (%s)\n' "$*" "$(date -u +%T)"; }

# The CUDA libraries the binary links (cublas, curand, nvrtc, cudart, cudnn) may already be on
# the machine, e.g. inside an installed PyTorch's site-packages/nvidia: find them.
say "libraries"
missing() { ldd "$bin" 2>/dev/null | awk '/not found/ {print $1}'; }
if [ -n "$(missing)" ]; then
  roots=(/usr/local/cuda /usr/local /opt /usr/lib /root /home)
  for py in python3 python; do
    command -v "$py" >/dev/null &&
      roots+=($("$py" -c 'import site,sys; print(" ".join(site.getsitepackages()+[site.getusersitepackages()]))' 2>/dev/null))
  done
  for lib in $(missing); do
    hit=$(find "${roots[@]}" -name "$lib" -not -path '*/stubs/*' 2>/dev/null | head -1)
    [ -n "$hit" ] && export LD_LIBRARY_PATH="$(dirname "$hit")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
fi
ldd "$bin" | grep -E 'cuda|cublas|curand|nvrtc|cudnn|not found' || true
if [ -n "$(missing)" ]; then
  echo "error: still missing: $(missing | tr '\n' ' ')" >&2
  exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

say "check: $device against the CPU's portable path"
"$bin" check --device "$device" --data "$data" --json > "$work/check.json"
check_rc=$?
cat "$work/check.json"
echo "check exit code: $check_rc"

# A workspace holding the repo's pipeline.toml with the data folder as the only source.
workspace() {
  rm -rf "$1" && mkdir -p "$1"
  sed -e "/^sources = \[/,/^\]/c\\sources = [\"$data\"]" -e "s/^device = .*/device = \"$device\"/" \
    "$repo/pipeline.toml" > "$1/pipeline.toml"
}

# Per-stage seconds, images/s and accuracies from the lock and the stages' metrics, as JSON.
summary() { # dir wall_seconds exit_code
  "$bin" status --json -f "$1/pipeline.toml" > "$1/status.json" 2>/dev/null
  if command -v python3 >/dev/null && python3 -c 'import tomllib' 2>/dev/null; then
    python3 - "$1" "$2" "$3" <<'PY'
import json, sys, tomllib
d, wall, rc = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
try:
    lock = tomllib.load(open(f"{d}/pipeline.lock", "rb"))["stages"]
except OSError:
    lock = {}
out = {"workspace": d, "exit_code": rc, "wall_seconds": wall, "stages": {}}
for name, e in lock.items():
    m = e.get("metrics", {})
    s = {"seconds": e.get("seconds"), "device": m.get("device", e.get("device"))}
    for k in ("train_images_per_s", "test_accuracy", "final_train_loss", "epochs", "kernels"):
        if k in m:
            s[k] = m[k]
    if name == "evaluate":
        s["accuracy"] = {k: v.get("accuracy") for k, v in m.get("models", {}).items() if isinstance(v, dict)}
    out["stages"][name] = s
print(json.dumps(out, indent=1))
PY
  else
    cat "$1/pipeline.lock"
  fi
}

study() { # name timeout run-args...
  local name=$1 limit=$2; shift 2
  local dir=$work/$name
  workspace "$dir"
  say "study ($name) on $device"
  local t0 rc wall
  t0=$(date +%s%N)
  timeout "$limit" "$bin" run -f "$dir/pipeline.toml" "$@" 2>&1 | tail -n 40
  rc=${PIPESTATUS[0]}
  wall=$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  summary "$dir" "$wall" "$rc"
}

study short 180 \
  --set train-baseline.epochs=1 --set train-baseline.train_limit=6400 \
  --set train-resnet.epochs=1 --set train-resnet.train_limit=6400 \
  --set evaluate.test_limit=2000
[ "$full" = 1 ] && study full "$full_timeout"

if [ -n "${TORCH_PYTHON:-}" ]; then
  say "PyTorch on the same GPU (one epoch each, ../shared/peers/torch_reference.py models)"
  timeout 180 "$TORCH_PYTHON" - "$repo/../shared/peers/torch_reference.py" "$data" <<'PY'
import importlib.util, json, os, sys, time, torch, torch.nn.functional as F
ref, data = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("torch_reference", ref)
tr = importlib.util.module_from_spec(spec); spec.loader.exec_module(tr)
dev = torch.device("cuda")
x = torch.from_numpy(tr.read_idx(os.path.join(data, "train-images-idx3-ubyte.gz")).astype("float32") / 255.0).unsqueeze(1)
y = torch.from_numpy(tr.read_idx(os.path.join(data, "train-labels-idx1-ubyte.gz")).astype("int64"))
x, y = ((x - 0.2860) / 0.3530).to(dev), y.to(dev)
for name in ("baseline", "resnet18"):
    torch.manual_seed(0)
    m = (tr.Baseline() if name == "baseline" else tr.resnet18()).to(dev)
    opt = torch.optim.Adadelta(m.parameters(), lr=1.0) if name == "baseline" else torch.optim.Adam(m.parameters(), lr=1e-4)
    perm = torch.randperm(len(x), device=dev)
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for i in range(0, len(x), 64):
        idx = perm[i:i + 64]
        opt.zero_grad(); F.cross_entropy(m(x[idx]), y[idx]).backward(); opt.step()
    torch.cuda.synchronize()
    print(json.dumps({"impl": "pytorch " + torch.__version__, "model": name, "device": torch.cuda.get_device_name(),
                      "train_images_per_s": round(len(x) / (time.perf_counter() - t0), 1)}))
PY
fi
exit "$check_rc"
