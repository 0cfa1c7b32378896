#!/usr/bin/env bash
# Distil a Switch LM into a dense one on Tiny Shakespeare (shipped in data/), on 2 CPU ranks, and
# report the share of the teacher's held-out gain the student keeps (README, "Distillation").
# The Switch teacher (8 experts, expert parallelism 2) trains TEACHER_STEPS steps; the dense baseline
# (the teacher without experts) and two dense students distilled from the teacher (starting from its
# non-expert weights, and from scratch) train STEPS steps each.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
OUT="${OUT:-runs/distill}"
STEPS="${STEPS:-600}"
TEACHER_STEPS="${TEACHER_STEPS:-$((2 * STEPS))}"
rm -rf "$OUT"
mkdir -p "$OUT/data"
# Held-out data: the last 5% of the corpus, from a paragraph start; the runs train on the rest.
python - "$OUT/data" <<'PY'
import sys
text = open("data/tinyshakespeare.txt", encoding="utf-8").read()
cut = text.index("\n\n", int(len(text) * 0.95)) + 2
open(f"{sys.argv[1]}/train.txt", "w", encoding="utf-8").write(text[:cut])
open(f"{sys.argv[1]}/heldout.txt", "w", encoding="utf-8").write(text[cut:])
PY
train() {  # DS_CONFIG MODEL_CONFIG RUN_DIR [extra flags]
  deepspeed --num_gpus 2 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" pretrain/main.py \
    --ds_config "ds_configs/$1" --model_config "models/configs/$2" --train_data "$OUT/data/train.txt" \
    --val_fraction 0.02 --max_steps "$STEPS" --save_dir "$3" --log_interval 50 "${@:4}"
}
train moe_ep2_zero2.json small-switch.json "$OUT/teacher" --max_steps "$TEACHER_STEPS"
train zero1.json small-gpt.json "$OUT/baseline"
train zero1.json small-gpt.json "$OUT/student" --task distill --teacher "$OUT/teacher"
train zero1.json small-gpt.json "$OUT/student_scratch" --task distill --teacher "$OUT/teacher" --no-init_from_teacher
for student in student student_scratch; do
  python -m eval.distill --teacher "$OUT/teacher" --student "$OUT/$student" --baseline "$OUT/baseline" \
    --text "$OUT/data/heldout.txt" --output "$OUT/report.$student.json"
done
