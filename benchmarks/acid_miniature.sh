#!/usr/bin/env bash
# ACID in miniature (docs/results.md "ACID in miniature"): the demo job's student, a bigger demo teacher,
# then three continuations of the same steps, lr and seed: ACID (JEST joint selection from a
# super-batch of 2b), random subsampling of the same super-batches, and plain continued training.
#   bash benchmarks/acid_miniature.sh [OUT]      # ~45 min on 2 cores when nothing is cached
# The student and the teacher are cached under OUT and reused by a second call.
set -euo pipefail
OUT=${1:-$HOME/.cache/siglip2/acid-miniature}
STEPS=${STEPS:-300}
LR=${LR:-1e-4}
TEACHER_STEPS=${TEACHER_STEPS:-1500}   # docs/results.md: 1500 (first teacher) and 3000 (second)
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if [ ! -f "$OUT/student/checkpoints/last.ckpt" ]; then   # the default demo job (750 steps)
  python train.py logger=csv hydra.run.dir="$OUT/student"
fi
if [ ! -f "$OUT/teacher/checkpoints/last.ckpt" ]; then   # 1.5x wider, 1.5x deeper, more steps, sigmoid only
  python train.py logger=csv hydra.run.dir="$OUT/teacher" \
    model.vision.width=192 model.vision.depth=6 model.vision.mlp_dim=768 \
    model.text.width=192 model.text.depth=6 model.text.mlp_dim=768 model.embed_dim=192 \
    stage.losses.locca=null stage.losses.local_to_global=null stage.losses.masked=null trainer.max_steps="$TEACHER_STEPS"
fi
COMMON=(stage=acid init_from="$OUT/student/checkpoints/last.ckpt" trainer.max_steps="$STEPS"
        stage.optim_overrides.lr="$LR" logger=csv)
python train.py "${COMMON[@]}" hydra.run.dir="$OUT/acid" stage.acid.teacher="$OUT/teacher/checkpoints/last.ckpt"
python train.py "${COMMON[@]}" hydra.run.dir="$OUT/random" stage.acid.method=random
python train.py "${COMMON[@]}" hydra.run.dir="$OUT/plain" stage.acid.filter_ratio=0
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
keys = [("zeroshot/demo_zeroshot/top1", "zero-shot top-1"), ("retrieval/demo_retrieval/image_to_text_R@5", "I->T R@5"),
        ("retrieval/demo_retrieval/text_to_image_R@5", "T->I R@5")]
print("| run | " + " | ".join(k for _, k in keys) + " |")
for run in ("student", "teacher", "acid", "random", "plain"):
    m = json.load(open(f"{out}/{run}/metrics.json"))
    print(f"| {run} | " + " | ".join(f"{100 * m[k]:.1f}%" for k, _ in keys) + " |")
PY
