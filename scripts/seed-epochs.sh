#!/usr/bin/env bash
# The seed's open question: were 5 epochs too few? Runs the default study (full data) at 5,
# then 10, then 15 epochs for both models, each run an experiment (epochs-5, -10, -15), in the
# workspace folder WS (created with a copy of the repository's pipeline.toml if it has none).
# The 10- and 15-epoch trainings continue from the shorter ones' end states, so the three
# cost 15 epochs per model. Ends with `exp show` and the curves page WS/seed-epochs.html.
#
#   scripts/seed-epochs.sh WS
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
ws=${1:?usage: scripts/seed-epochs.sh WORKSPACE_FOLDER}
(cd "$repo" && cargo build --release -q)
bin=$(cd "$repo" && realpath "${CARGO_TARGET_DIR:-target}/release/fmnist-pipe")
mkdir -p "$ws"
[ -e "$ws/pipeline.toml" ] || cp "$repo/pipeline.toml" "$ws/"
cd "$ws"
for n in 5 10 15; do
  echo "=== epochs $n: $(date -u +%FT%TZ)"
  /usr/bin/time -v "$bin" run --set train-baseline.epochs=$n --set train-resnet.epochs=$n --name epochs-$n
done
"$bin" exp show
"$bin" exp show --html seed-epochs.html
