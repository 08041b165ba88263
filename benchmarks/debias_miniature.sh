#!/usr/bin/env bash
# De-biasing in miniature (issue 30): the default job, same seed and budget, on the demo with a
# planted bias (glyph colours red / blue stand in for a sensitive attribute: red is ~70% of
# them; red : blue is 21 in the first half of the alphabet and 0.26 in the second), trained on that
# stream as is ("biased") and through an M4 keep table ("balanced": target 50/50, both
# bounds 0.01, attributes and concepts read from the samples' json), then both evaluated on
# the default eval sets, which include the representation- and association-bias sets and the
# few-shot probe. Resumable (a finished run is skipped); ~15 min on 2 cores.
#   bash benchmarks/debias_miniature.sh OUT
#   python benchmarks/debias_table.py OUT
set -euo pipefail
OUT=$(realpath -m "$1")
STRENGTH=${STRENGTH:-0.8}; SHARE=${SHARE:-0.7}
CACHE=$OUT/cache  # its own cache: a planted bias rebuilds the demo at its root
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export WANDB_MODE=disabled
BIAS=("data.demo.bias_strength=$STRENGTH" "data.demo.bias_share=$SHARE")
TRAIN=$(python -c "from siglip2.data.demo import ensure_demo; \
print(ensure_demo('$CACHE/demo-n20000-s0', num_train=20000, seed=0, bias_strength=$STRENGTH, bias_share=$SHARE).train_urls)")
cat > "$OUT/balance.yaml" <<YAML
# M4 on the demo's planted attribute (docs/own_data.md "De-biasing your data")
attributes: {red: [red], blue: [blue]}
json_attributes: "objects[].color"
concepts: {E: [E], H: [H], K: [K], M: [M], O: [O], S: [S], T: [T], V: [V], X: [X], Z: [Z]}
json_concepts: "objects[].category"
representation_tolerance: 0.01
association_tolerance: 0.01
YAML
[ -f "$OUT/keep.tsv" ] || python -m siglip2.data.balance --shards "$TRAIN" --config "$OUT/balance.yaml" \
  --out "$OUT/keep.tsv" | tee "$OUT/balance.txt"
train() {  # name, overrides...
  local name=$1; shift
  [ -f "$OUT/$name/metrics.json" ] || python train.py "paths.cache_dir=$CACHE" logger=csv "hydra.run.dir=$OUT/$name" \
    "${BIAS[@]}" "$@"
}
train biased
train balanced "data.balance_table=$OUT/keep.tsv"
python benchmarks/debias_table.py "$OUT"
