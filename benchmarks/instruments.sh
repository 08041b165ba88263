#!/usr/bin/env bash
# Issue 28's instruments, each shown sensitive before a stage is compared with it:
#   benchmarks/instruments.sh OUT [random|noise|aspect|refexp|all]
# - random: the default model after 1 step (lr still ~0: a random tower of the same shape),
#   evaluated on every demo set, dense probe included; compare with a default run's metrics.json
#   (bar: dense-probe mIoU >= 15 points apart).
# - noise: the default job with data.caption_noise=0.3 (30% of train captions replaced by
#   another sample's); compare with the clean default job (bar: >= 5 zero-shot points lost).
# - aspect: a finished default run's words (elongated, squashed to 64 px) vs words_square
#   (the same draws laid out 2 x 2) zero-shot top-1: pass the run dir as RUN=...; bar: the
#   squashed words >= 10 points below (benchmarks/demo_probe.py --world words measures the same
#   two layouts supervised).
# - refexp: constant-box baselines on the demo's refexp set (benchmarks/refexp_baseline.py;
#   bar: the default job's acc@0.5 >= 3x the baseline).
# Each run writes OUT/<name>/metrics.json and prints its headline numbers. The demo is the
# default job's (~/.cache/siglip2/demo-n20000-s0, or paths.cache_dir via CACHE=...).
# One training job at a time on a 2-core machine: run this on an idle host.
set -euo pipefail
OUT=$(realpath -m "$1"); WHAT=${2:-all}
CACHE=${CACHE:-${SIGLIP2_CACHE:-$HOME/.cache/siglip2}}
mkdir -p "$OUT"
show() {
  python - "$1" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
keys = ("zeroshot/demo_zeroshot/top1", "zeroshot/demo_words/top1", "zeroshot/demo_words_square/top1",
        "retrieval/demo_retrieval/image_to_text_R@5",
        "refexp/demo_refexp/acc@0.5", "segmentation/demo_segmentation/miou", "zeroshot/demo_zeroshot/caption_names_object")
print(sys.argv[1], {k.split("/", 1)[1]: round(m[k], 4) for k in keys if k in m})
PY
}
run() {  # name, overrides...
  local name=$1; shift
  WANDB_MODE=disabled python train.py "paths.cache_dir=$CACHE" logger=csv "hydra.run.dir=$OUT/$name" "$@"
  show "$OUT/$name/metrics.json"
}
case $WHAT in random|all) run random trainer.max_steps=1 ;; esac
case $WHAT in noise|all) run noise30 data.caption_noise=0.3 ;; esac
case $WHAT in aspect|all)
  if [ -n "${RUN:-}" ]; then show "$RUN/metrics.json"; else echo "aspect: set RUN=<run dir trained with data.demo.word_share > 0>"; fi ;;
esac
case $WHAT in refexp|all) python benchmarks/refexp_baseline.py --root "$CACHE/demo-n20000-s0" ;; esac
