#!/usr/bin/env bash
# Times a no-op `fmnist-pipe run` on an up-to-date pipeline of command stages (the cost of
# loading, fingerprinting and checking outputs when nothing has to run). Target: < 20 ms.
# Usage: scripts/bench-noop.sh [STAGES] (default 20); needs hyperfine and a release build.
set -euo pipefail
stages="${1:-20}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
bin="$repo/target/release/fmnist-pipe"
[ -x "$bin" ] || (cd "$repo" && cargo build --release -p fmnist-pipe)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
{
    echo '[pipeline]'
    echo 'seed = 1'
    echo '[stages.s0]'
    echo 'cmd = "head -c 100000 /dev/zero > s0.bin"'
    echo 'outs = ["s0.bin"]'
    for i in $(seq 1 $((stages - 1))); do
        echo "[stages.s$i]"
        echo "cmd = \"cat s$((i - 1)).bin > s$i.bin\""
        echo "needs = [\"s$((i - 1))\"]"
        echo "outs = [\"s$i.bin\"]"
    done
} > "$work/pipeline.toml"
(cd "$work" && "$bin" run > /dev/null)
cd "$work"
hyperfine --warmup 5 --runs 50 -N "$bin run"
