#!/usr/bin/env bash
# Build the GPU binaries (`--features cuda`, `--features cudnn`) on a machine with no GPU and no
# CUDA install, from PyPI's NVIDIA CUDA 13.0 wheels (13.0: the GPU machines run driver 580, which
# may not load PTX from a newer toolkit).
#
#   scripts/cuda-build.sh [cuda|cudnn|both]        (default: both)
#
# Steps: pip-install the pinned wheels into a venv (skipped when already there); lay out a folder
# like a CUDA install under target/cuda/root (bin, include, nvvm, lib64 with unversioned .so
# names); compile a stub libcuda.so there (the driver's library is in no wheel: every driver
# function cudarc declares, each returning CUDA_ERROR_STUB_LIBRARY); then cargo-build each feature
# in the normal target dir, so the dependencies the CPU build and tests compiled are shared.
# Results: target/cuda/fmnist-pipe-cuda and target/cuda/fmnist-pipe-cudnn (stable copies to carry
# to a GPU machine, with target/cuda/root/lib64's libraries or the same wheels on LD_LIBRARY_PATH;
# the real libcuda.so.1 comes from the driver there).
#
# Env: CUDA_VENV         venv for the wheels (default target/cuda/venv)
#      PYTHON            interpreter that creates the venv (default python3)
#      CUDA_COMPUTE_CAP  GPU architecture the kernels are compiled for (default 90: H100/H200)
#      CARGO_TARGET_DIR  honoured as cargo does (default target)
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "cuda-build: error: $*" >&2; exit 1; }

case "${1:-both}" in
  cuda | cudnn) features=$1 ;;
  both) features="cuda cudnn" ;;
  *) die "unknown argument '$1' (expected cuda, cudnn or both)" ;;
esac
[ $# -le 1 ] || die "too many arguments (expected one of cuda, cudnn, both)"

# CUDA 13.0 (Update 2 where there is one). nvidia-cudnn-cu13 9.21: the cuDNN API version cudarc
# 0.19's bindings are generated for (cudarc's `cudnn` feature = cudnn-09021).
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
  nvidia-cuda-nvrtc==13.0.88
)
cudnn_wheel=nvidia-cudnn-cu13==9.21.1.3
case " $features " in *" cudnn "*) wheels+=("$cudnn_wheel") ;; esac

venv=${CUDA_VENV:-target/cuda/venv}
python=${PYTHON:-python3}
out=target/cuda
root=$out/root
target_dir=${CARGO_TARGET_DIR:-target}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
[[ $CUDA_COMPUTE_CAP =~ ^[0-9]+$ ]] || die "CUDA_COMPUTE_CAP='$CUDA_COMPUTE_CAP' is not a number like 90"

for tool in cargo gcc readelf; do
  command -v "$tool" >/dev/null || die "'$tool' not found on PATH"
done
mkdir -p "$out"

# --- 1. The wheels --------------------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  command -v "$python" >/dev/null || die "python '$python' not found (set PYTHON)"
  echo "cuda-build: creating venv $venv"
  "$python" -m venv "$venv" ||
    die "'$python -m venv $venv' failed (on Debian: apt-get install python3-venv; or set PYTHON)"
fi
vpy=$venv/bin/python
missing=()
installed=$("$vpy" -m pip list --format=freeze 2>/dev/null) ||
  die "pip does not run in $venv (remove the folder to recreate it)"
for w in "${wheels[@]}"; do
  grep -qixF "$w" <<<"$installed" || missing+=("$w")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "cuda-build: pip install ${missing[*]}"
  # --no-deps: the pins are the whole closure (nvcc needs nvvm, runtime, crt; cudnn needs cublas).
  "$vpy" -m pip install --quiet --disable-pip-version-check --no-deps "${missing[@]}" ||
    die "pip install of the CUDA wheels failed (network to PyPI?)"
else
  echo "cuda-build: wheels already installed in $venv"
fi
site=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cu=$site/nvidia/cu13
cudnn_dir=$site/nvidia/cudnn
[ -x "$cu/bin/nvcc" ] || die "no nvcc at $cu/bin/nvcc (wheel layout changed?)"
[ -x "$cu/nvvm/bin/cicc" ] || die "no cicc at $cu/nvvm/bin/cicc (nvidia-nvvm missing?)"
[ -f "$cu/include/cuda_runtime.h" ] || die "no cuda_runtime.h in $cu/include (nvidia-cuda-runtime missing?)"
[ -d "$cu/include/cccl/thrust" ] || die "no thrust in $cu/include/cccl (nvidia-cuda-cccl missing?)"

# --- 2. A folder laid out like a CUDA install -----------------------------------------------
# Rebuilt every run (symlinks only, plus the stub): absolute links into the venv, never committed.
rm -rf "$root"
mkdir -p "$root/lib64/stubs"
cu_abs=$(cd "$cu" && pwd -P)
ln -s "$cu_abs/bin" "$root/bin"
ln -s "$cu_abs/nvvm" "$root/nvvm"
ln -s "$cu_abs/include" "$root/include"
ln -s lib64 "$root/lib"
libdirs=("$cu_abs/lib")
[ -d "$cudnn_dir/lib" ] && libdirs+=("$(cd "$cudnn_dir/lib" && pwd -P)")
for d in "${libdirs[@]}"; do
  for f in "$d"/lib*.so* "$d"/lib*.a; do
    [ -e "$f" ] || continue
    name=${f##*/}
    ln -sf "$f" "$root/lib64/$name"
    # libfoo.so.13 -> also libfoo.so, the name the linker looks for (-lfoo).
    if [[ $name =~ ^(lib[A-Za-z0-9_]+)\.so\.[0-9]+$ ]] && [ ! -e "$root/lib64/${BASH_REMATCH[1]}.so" ]; then
      ln -s "$name" "$root/lib64/${BASH_REMATCH[1]}.so"
    fi
  done
done

# --- 3. The stub libcuda.so -----------------------------------------------------------------
# Every cu* function in the driver bindings of each cudarc version in Cargo.lock (so the list
# follows a cudarc update). Only for linking: soname libcuda.so.1, so at run time the binary
# loads the driver's libcuda.so.1; and it sits in lib64/stubs, as in a real CUDA install.
cudarc_dirs=$(cargo metadata --format-version 1 --features cudnn 2>/dev/null | "$vpy" -c '
import json, os, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "cudarc":
        print(os.path.dirname(p["manifest_path"]))') || die "cargo metadata failed"
[ -n "$cudarc_dirs" ] || die "no cudarc package in Cargo.lock's dependency graph"
stub_c=$out/libcuda-stub.c
{
  echo "/* Generated by scripts/cuda-build.sh from cudarc's driver bindings: link-time stub only. */"
  echo "#define STUB(f) __attribute__((visibility(\"default\"))) int f(void) { return 34; /* CUDA_ERROR_STUB_LIBRARY */ }"
  # The two error-text functions answer, so an error read off the stub says what happened.
  echo "#define TEXT(f, t) __attribute__((visibility(\"default\"))) int f(int e, const char **s) { if (s) *s = t; return 0; }"
  echo 'TEXT(cuGetErrorName, "CUDA_ERROR_STUB_LIBRARY")'
  echo 'TEXT(cuGetErrorString, "libcuda.so.1 is the stub from scripts/cuda-build.sh: no NVIDIA driver here")'
  for d in $cudarc_dirs; do
    [ -d "$d/src/driver/sys" ] || die "no driver bindings in $d/src/driver/sys (cudarc layout changed?)"
    find "$d/src/driver/sys" -name '*.rs' -exec grep -ohE '\bfn cu[A-Z][A-Za-z0-9_]*' {} +
  done | sed 's/^fn //' | grep -vxE 'cuGetError(Name|String)' | sort -u | sed 's/.*/STUB(&)/'
} >"$stub_c"
nsyms=$(grep -cE '^(STUB|TEXT)\(' "$stub_c" || true)
[ "$nsyms" -ge 100 ] || die "only $nsyms driver functions found in cudarc's bindings ($cudarc_dirs)"
gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$root/lib64/stubs/libcuda.so" "$stub_c" ||
  die "compiling the stub libcuda.so failed"
# For trying a binary on a machine without a GPU only (never on a GPU machine's library path):
# LD_LIBRARY_PATH=target/cuda/root/lib64:target/cuda/nogpu makes `device = "cuda"` fail cleanly.
mkdir -p "$out/nogpu"
cp "$root/lib64/stubs/libcuda.so" "$out/nogpu/libcuda.so.1"
echo "cuda-build: stub libcuda.so with $nsyms driver functions ($(echo $cudarc_dirs | xargs -n1 basename | tr '\n' ' '))"

need=(cudart nvrtc curand cublas cublasLt)
case " $features " in *" cudnn "*) need+=(cudnn) ;; esac
for l in "${need[@]}"; do
  [ -e "$root/lib64/lib$l.so" ] || die "lib$l.so missing from $root/lib64 (its wheel missing?)"
done

# --- 4. Build ---------------------------------------------------------------------------------
root_abs=$(cd "$root" && pwd)
export CUDA_ROOT=$root_abs CUDA_PATH=$root_abs
# cudarc adds every one of these that is set to its link search; nvcc on PATH gives the version.
unset CUDA_HOME CUDA_TOOLKIT_ROOT_DIR CUDNN_LIB CUDARC_CUDA_VERSION
export PATH=$root_abs/bin:$PATH
nvcc_version=$(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
[ "$nvcc_version" = 13.0 ] || die "nvcc on PATH is release '$nvcc_version', expected 13.0"
echo "cuda-build: CUDA_ROOT=$root CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP nvcc $nvcc_version"

bin=$target_dir/release/fmnist-pipe
# Each build below replaces target/release/fmnist-pipe; on the way out (success or not) put the
# CPU binary back for the scripts that run it (cargo relinks it from its cache: seconds).
if [ -x "$bin" ]; then
  restore_cpu_bin() {
    env -u CUDA_ROOT -u CUDA_PATH cargo build --release -q ||
      echo "cuda-build: warning: could not rebuild the CPU $bin" >&2
  }
  trap restore_cpu_bin EXIT
fi
report=()
for f in $features; do
  start=$(date +%s)
  cargo build --release --features "$f" || die "cargo build --release --features $f failed"
  secs=$(($(date +%s) - start))
  echo "$f build: $secs s"
  # Through a new file and a rename: the old copy may be running (cp onto it: text file busy).
  cp "$bin" "$out/fmnist-pipe-$f.new" && mv -f "$out/fmnist-pipe-$f.new" "$out/fmnist-pipe-$f" ||
    die "could not copy $bin to $out/fmnist-pipe-$f"
  report+=("$f build: $secs s; $out/fmnist-pipe-$f ($(du -h "$out/fmnist-pipe-$f" | cut -f1))")
  # The CUDA libraries it uses must be dynamic dependencies: the driver's by the stub's soname
  # (libnvrtc and libcublasLt are linked too but dropped as unused; libcublas loads cublasLt).
  libs="libcuda.so.1 libcudart.so libcublas.so libcurand.so"
  [ "$f" = cudnn ] && libs+=" libcudnn.so"
  needed=$(readelf -d "$out/fmnist-pipe-$f") || die "readelf failed on $out/fmnist-pipe-$f"
  for l in $libs; do
    grep -q "NEEDED.*\[$l" <<<"$needed" || die "$out/fmnist-pipe-$f does not link $l"
  done
done
echo
printf '%s\n' "${report[@]}"
echo "To run one on a GPU machine: LD_LIBRARY_PATH=<site-packages>/nvidia/cu13/lib (wheels"
echo "nvidia-cuda-runtime, nvidia-cublas, nvidia-curand as pinned above), plus nvidia/cudnn/lib"
echo "(nvidia-cudnn-cu13) for the cudnn one; libcuda.so.1 is the driver's. Here: $root/lib64."
