#!/usr/bin/env bash
# NaFlex in miniature, issue 26 (docs/results.md "NaFlex: mixed lengths and the continuation's lr").
# Part A, from scratch on the demo (sigmoid only, 300 steps x 32, lr 3.5e-4, seed 0; evaluated
# at 64 tokens, each image at its own aspect ratio): one length vs the default mixed lengths
# {32, 64, 144, 196, 256} with the paper's halving at 256, the plain per-batch loss vs each
# negative weighted to the nominal batch (stage.losses.sigmoid.nominal_negatives), no halving,
# and timm/open_clip's token-budget batches.
# Part B, continuations of the default job's 90% checkpoint (the last 10% x3.75, sigmoid +
# LocCa): fixed 64 px vs NaFlex, each with the paper's lr (the recipe cosine's tail) and with
# stage.clock.lr=rewarm; evaluated on the demo's elongated images (eval.aspect_min=1.6) at
# 32 / 64 / 144 tokens (the fixed model: square 64 px).
#   bash benchmarks/naflex_batches.sh [OUT] [A|B|AB]     # A ~60 min, B ~45 min on 2 cores
set -euo pipefail
OUT=${1:-$HOME/.cache/siglip2/naflex-batches}
PARTS=${2:-AB}
STEPS=${STEPS:-300}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
SETS='eval.sets=[${data.demo.root}/eval/zeroshot/zeroshot.yaml,${data.demo.root}/eval/retrieval/retrieval.yaml]'

if [[ $PARTS == *A* ]]; then
  SCRATCH=(stage=naflex 'stage.clock.window=[0.0,1.0]' stage.clock.stretch=1.0 stage.clock.fit_window=false
           stage.losses.locca=null trainer.max_steps="$STEPS" stage.naflex.eval_seq_len=64 logger=csv "$SETS")
  run() { local name=$1; shift
    [ -f "$OUT/A_$name/metrics.json" ] || python train.py "${SCRATCH[@]}" hydra.run.dir="$OUT/A_$name" "$@"; }
  run one_length 'stage.naflex.seq_lens=[64]'
  run mixed_halved_plain stage.losses.sigmoid.nominal_negatives=false
  run mixed_halved_nominal
  run mixed_not_halved stage.naflex.halve_at_max=false
  run tokens_plain stage.naflex.batching=tokens stage.losses.sigmoid.nominal_negatives=false
  run tokens_nominal stage.naflex.batching=tokens
  for name in one_length mixed_halved_nominal mixed_not_halved; do  # the same models at other lengths
    for len in 32 144; do
      [ -f "$OUT/EA_${name}_$len/metrics.json" ] || python eval.py ckpt_path="$OUT/A_$name/checkpoints/last.ckpt" \
        eval.naflex_seq_len=$len "$SETS" hydra.run.dir="$OUT/EA_${name}_$len"
    done
  done
fi

if [[ $PARTS == *B* ]]; then
  PRE=$OUT/B_pretrain
  [ -f "$PRE/checkpoints/frac_0.90.ckpt" ] || python train.py logger=csv eval=none hydra.run.dir="$PRE"
  INIT=(init_from="$PRE/checkpoints/frac_0.90.ckpt" eval=none logger=csv)
  FIXED=(stage=resadapt 'stage.clock.window=[0.9,1.0]' stage.clock.stretch=3.75
         stage.losses.local_to_global=null stage.losses.masked=null)
  for lr in recipe rewarm; do
    [ -f "$OUT/B_fixed_$lr/checkpoints/last.ckpt" ] || \
      python train.py "${FIXED[@]}" "${INIT[@]}" stage.clock.lr=$lr hydra.run.dir="$OUT/B_fixed_$lr"
    [ -f "$OUT/B_naflex_$lr/checkpoints/last.ckpt" ] || \
      python train.py stage=naflex "${INIT[@]}" stage.clock.lr=$lr hydra.run.dir="$OUT/B_naflex_$lr"
    for len in 32 64 144; do
      [ -f "$OUT/E_naflex_${lr}_$len/metrics.json" ] || python eval.py ckpt_path="$OUT/B_naflex_$lr/checkpoints/last.ckpt" \
        eval.naflex_seq_len=$len eval.aspect_min=1.6 "$SETS" hydra.run.dir="$OUT/E_naflex_${lr}_$len"
    done
    [ -f "$OUT/E_fixed_${lr}_square/metrics.json" ] || python eval.py ckpt_path="$OUT/B_fixed_$lr/checkpoints/last.ckpt" \
      eval.aspect_min=1.6 "$SETS" hydra.run.dir="$OUT/E_fixed_${lr}_square"
    for len in 32 64 144; do  # the fixed model seen NaFlex-style: never trained on native aspect
      [ -f "$OUT/E_fixed_${lr}_$len/metrics.json" ] || python eval.py ckpt_path="$OUT/B_fixed_$lr/checkpoints/last.ckpt" \
        eval.naflex_seq_len=$len eval.aspect_min=1.6 "$SETS" hydra.run.dir="$OUT/E_fixed_${lr}_$len"
    done
  done
fi

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
keys = [("zeroshot/demo_zeroshot/top1", "zero-shot top-1"), ("retrieval/demo_retrieval/image_to_text_R@5", "I->T R@5"),
        ("retrieval/demo_retrieval/text_to_image_R@5", "T->I R@5")]
print("| run | " + " | ".join(k for _, k in keys) + " |\n|---|" + "---|" * len(keys))
for d in sorted(p for p in out.iterdir() if (p / "metrics.json").exists()):
    m = json.load(open(d / "metrics.json"))
    print(f"| {d.name} | " + " | ".join(f"{100 * m[k]:.1f}%" if k in m else "-" for k, _ in keys) + " |")
PY
