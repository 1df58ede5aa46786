#!/usr/bin/env bash
# Times the first `fmnist-pipe run` of a chain of command stages against the same commands
# from a shell loop, then a no-op run on the up-to-date pipeline (the cost of loading,
# fingerprinting and checking outputs when nothing has to run). Targets: no-op < 20 ms at 20
# stages, < 100 ms at 2,000; first run < 10 s plus the commands' own time at 2,000.
# With dvc and snakemake on PATH (or in $BENCH_VENV/bin, e.g. `python3 -m venv VENV &&
# VENV/bin/pip install dvc snakemake`, then BENCH_VENV=VENV), the same chain is timed as a
# dvc.yaml and a Snakefile no-op too, and the ratios printed.
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
# The first run, and the same commands from a plain shell loop: the engine's own share is
# the difference (issue 12's target: under 10 s for 2,000 stages).
first_start=$(date +%s.%N)
(cd "$work" && "$bin" run > /dev/null)
first=$(echo "$(date +%s.%N) - $first_start" | bc)
mkdir "$work/alone"
alone_start=$(date +%s.%N)
(cd "$work/alone" && head -c 100000 /dev/zero > s0.bin && for i in $(seq 1 $((stages - 1))); do
    sh -c "cat s$((i - 1)).bin > s$i.bin"
done)
alone=$(echo "$(date +%s.%N) - $alone_start" | bc)
rm -rf "$work/alone"
printf 'first run of %d stages: %.2f s; the same commands alone: %.2f s; engine: %.2f s\n' \
    "$stages" "$first" "$alone" "$(echo "$first - $alone" | bc)"
cd "$work"
hyperfine --warmup 5 --runs 50 -N --export-json "$work/ours.json" "$bin run"
ours=$(python3 -c "import json;print(json.load(open('$work/ours.json'))['results'][0]['mean'])")

if [ -n "${BENCH_VENV:-}" ]; then
    [ -d "$BENCH_VENV/bin" ] || { echo "error: BENCH_VENV=$BENCH_VENV has no bin/" >&2; exit 2; }
    export PATH="$BENCH_VENV/bin:$PATH"
fi
peer() { # name, folder, command
    local name=$1 dir=$2 cmd=$3
    (cd "$dir" && hyperfine --warmup 1 --runs 5 --export-json "$work/$name.json" "$cmd")
    python3 -c "import json;m=json.load(open('$work/$name.json'))['results'][0]['mean'];print(f'$name no-op: {m*1000:.0f} ms = {m/$ours:.0f}x fmnist-pipe ({$ours*1000:.1f} ms)')" >> "$work/summary"
}
if command -v dvc > /dev/null; then
    mkdir "$work/dvc" && cd "$work/dvc"
    git init -q . && dvc init -q && dvc config core.analytics false
    {
        echo 'stages:'
        echo '  s0:'
        echo '    cmd: head -c 100000 /dev/zero > s0.bin'
        echo '    outs: [s0.bin]'
        for i in $(seq 1 $((stages - 1))); do
            echo "  s$i:"
            echo "    cmd: cat s$((i - 1)).bin > s$i.bin"
            echo "    deps: [s$((i - 1)).bin]"
            echo "    outs: [s$i.bin]"
        done
    } > dvc.yaml
    dvc repro -q > /dev/null
    peer dvc "$work/dvc" "dvc repro"
fi
if command -v snakemake > /dev/null; then
    mkdir "$work/smk" && cd "$work/smk"
    {
        echo "rule all:"
        echo "    input: 's$((stages - 1)).bin'"
        echo "rule s0:"
        echo "    output: 's0.bin'"
        echo "    shell: 'head -c 100000 /dev/zero > {output}'"
        for i in $(seq 1 $((stages - 1))); do
            echo "rule s$i:"
            echo "    input: 's$((i - 1)).bin'"
            echo "    output: 's$i.bin'"
            echo "    shell: 'cat {input} > {output}'"
        done
    } > Snakefile
    snakemake -q -c1 > /dev/null 2>&1
    peer snakemake "$work/smk" "snakemake -c1"
fi
echo
echo "fmnist-pipe no-op run, $stages stages: $(python3 -c "print(f'{$ours*1000:.1f} ms')")"
[ -f "$work/summary" ] && cat "$work/summary"
