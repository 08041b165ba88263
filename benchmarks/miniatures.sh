#!/usr/bin/env bash
# Each stage of the recipe in miniature on the current demo (issue 28): one pair (or triple) per
# stage, the same seed, examples and budget, then one table (benchmarks/miniatures_table.py).
#   bash benchmarks/miniatures.sh OUT [base,locca,distill,resadapt,naflex,acid]   # ~75 min on 2 cores
# Every run is skipped when its output exists, so a second call resumes. The demo is the default
# job's (paths.cache_dir via CACHE=...). One training job at a time on a 2-core machine.
# - base: the default job (`python train.py`: sigmoid + LocCa, self-distillation and masked
#   prediction from 80%); its 90% and 95% checkpoints start the continuations below.
# - locca: the same without the LocCa decoder (stage.losses.locca=null): zero-shot, retrieval;
#   refexp only exists with the decoder (beside it: the constant-box baseline).
# - distill: the same without self-distillation and masked prediction; dense probe on the 95%
#   checkpoint (eval.py) and on the final one.
# - resadapt: the base's 95% checkpoint continued to the end at 96 px vs at 64 px (all losses).
# - naflex: the base's 90% checkpoint, the last 10% x3.75 (sigmoid + LocCa), NaFlex vs the fixed
#   64 px continuation of the same examples, both with stage.clock.lr=rewarm (at the paper's lr
#   neither moves a 750-step model: docs/results.md "NaFlex: mixed lengths and the continuation's lr");
#   evaluated on the elongated images (eval.aspect_min=1.6) at 32 / 64 / 144 tokens, the fixed
#   model also square at 64 px.
# - acid: captions 30% noisy (data.caption_noise=0.3): the default job on them is the student;
#   the base (clean captions) is the teacher; 300 steps of ACID vs random subsampling vs plain
#   continued training on the noisy stream, lr 1e-4 (docs/results.md "ACID in miniature" says why).
set -euo pipefail
OUT=$(realpath -m "$1"); PAIRS=${2:-base,locca,distill,resadapt,naflex,acid}
CACHE=${CACHE:-${SIGLIP2_CACHE:-$HOME/.cache/siglip2}}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export WANDB_MODE=disabled
has() { [[ ",$PAIRS," == *",$1,"* ]]; }
train() {  # name, overrides...
  local name=$1; shift
  [ -f "$OUT/$name/metrics.json" ] || python train.py "paths.cache_dir=$CACHE" logger=csv "hydra.run.dir=$OUT/$name" "$@"
}
evaluate() {  # name, checkpoint, overrides...
  local name=$1 ckpt=$2; shift 2
  [ -f "$OUT/$name/metrics.json" ] || python eval.py "ckpt_path=$ckpt" "paths.cache_dir=$CACHE" "hydra.run.dir=$OUT/$name" "$@"
}
SEG='eval.sets=[${data.demo.root}/eval/segmentation/segmentation.yaml]'
ZR='eval.sets=[${data.demo.root}/eval/zeroshot/zeroshot.yaml,${data.demo.root}/eval/retrieval/retrieval.yaml]'
BASE=$OUT/base/checkpoints
if has base || has resadapt || has naflex || has acid || has distill; then train base; fi
if has locca; then
  train no_locca stage.losses.locca=null
  [ -f "$OUT/refexp_baseline.txt" ] || python benchmarks/refexp_baseline.py --root "$CACHE/demo-n20000-s0" | tee "$OUT/refexp_baseline.txt"
fi
if has distill; then
  train no_distill stage.losses.local_to_global=null stage.losses.masked=null
  evaluate base_95 "$BASE/frac_0.95.ckpt" "$SEG"
  evaluate no_distill_95 "$OUT/no_distill/checkpoints/frac_0.95.ckpt" "$SEG"
fi
if has resadapt; then
  train resadapt_96 stage=resadapt init_from="$BASE/frac_0.95.ckpt" model.vision.image_size=96
  train resadapt_64 stage=resadapt init_from="$BASE/frac_0.95.ckpt"
fi
if has naflex; then
  INIT=(init_from="$BASE/frac_0.90.ckpt" eval=none stage.clock.lr=rewarm)
  train naflex stage=naflex "${INIT[@]}"
  train fixed stage=resadapt "${INIT[@]}" 'stage.clock.window=[0.9,1.0]' stage.clock.stretch=3.75 \
    stage.losses.local_to_global=null stage.losses.masked=null
  for len in 32 64 144; do
    evaluate "naflex_$len" "$OUT/naflex/checkpoints/last.ckpt" eval.naflex_seq_len=$len eval.aspect_min=1.6 "$ZR"
    evaluate "fixed_$len" "$OUT/fixed/checkpoints/last.ckpt" eval.naflex_seq_len=$len eval.aspect_min=1.6 "$ZR"
  done
  evaluate fixed_square "$OUT/fixed/checkpoints/last.ckpt" eval.aspect_min=1.6 "$ZR"
fi
if has acid; then
  NOISY=(data.caption_noise=0.3)
  train noisy "${NOISY[@]}"
  COMMON=(stage=acid init_from="$OUT/noisy/checkpoints/last.ckpt" trainer.max_steps=300
          stage.optim_overrides.lr=1e-4 "${NOISY[@]}")
  train acid "${COMMON[@]}" stage.acid.teacher="$BASE/last.ckpt"
  train random "${COMMON[@]}" stage.acid.method=random
  train plain "${COMMON[@]}" stage.acid.filter_ratio=0
fi
python benchmarks/miniatures_table.py "$OUT" | tee "$OUT/table.md"
