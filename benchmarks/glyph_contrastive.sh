#!/usr/bin/env bash
# Zero-shot glyph reading of the default contrastive job (see benchmarks/glyph_contrastive.py).
#   benchmarks/glyph_contrastive.sh OUT single|multi [STEPS]     (OMIT=0.5: captions drop size/colour words)
# writes OUT/{train,eval_*} shards, trains OUT/tok/tokenizer.model, then trains the default job
# (tiny model, batch 32, STEPS=750 = 24k samples) into OUT/run_STEPS, which evaluates the zero-shot
# sets when it ends (metrics.json). STEPS=1 gives the instrument's chance level (~0.10).
# Data and tokenizer are reused when OUT/tok/tokenizer.model exists. Run from the repository root.
set -euo pipefail
OUT=$(realpath -m "$1"); VARIANT=$2; STEPS=${3:-750}
if [ ! -f "$OUT/tok/tokenizer.model" ]; then
  python benchmarks/glyph_contrastive.py --out "$OUT" --variant "$VARIANT" --omit "${OMIT:-0}" | tee "$OUT.cmds"
  python -m siglip2.data.tokenizer train --shards "$OUT/train/{000000..000023}.tar" --vocab 4000 --out "$OUT/tok"
fi
SETS="[$(ls "$OUT"/eval_*/eval_*.yaml | paste -sd,)]"
python train.py data=webdataset "data.train=\"$OUT/train/{000000..000023}.tar\"" data.batch_size=32 \
  data.num_workers=1 tokenizer=sentencepiece "tokenizer.path=$OUT/tok/tokenizer.model" logger=csv \
  "eval.sets=$SETS" trainer.max_steps="$STEPS" "hydra.run.dir=$OUT/run_$STEPS"
python - "$OUT/run_$STEPS/metrics.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print({k: round(v, 4) if isinstance(v, float) else v for k, v in m.items() if k.startswith("zeroshot/")})
EOF
