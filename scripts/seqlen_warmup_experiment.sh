#!/usr/bin/env bash
# Sequence-length warmup (Li, Zhang and He 2022) at small scale: does it let a too-high learning rate train without
# the loss spikes that rate gives without it? A GPT (d_model 128, 2 layers, seq 128, bytes) on data/tinyshakespeare.txt,
# trained from the same seed at a normal and at higher peak learning rates (10 LR warmup steps, then cosine), each without
# and with sequence-length warmup (8 -> 128 tokens, fixed_linear over WARMUP_STEPS steps, difficulty_step 8), one CPU
# process each. Then a table: spikes (steps whose training loss is above SPIKE x the lowest loss before them), the
# largest such ratio, the tokens trained on, and the final validation loss (the held-out 5% tail, full length).
# README, "Sequence-length warmup". Environment:
#   STEPS=N          steps per run (default 300)          WARMUP_STEPS=N  sequence-length warmup steps (default 100)
#   LRS="2e-3 5e-2 1e-1"  peak learning rates              SPIKE=X         the spike threshold (default 1.1)
#   SEED=N           the runs' --seed (default 1234, pretrain/args.py's): the same initial weights and data order in all
#   OUT=dir          where everything goes (default runs/seqlen_warmup; replaced)
#   SMOKE=1          4 steps each, to check the pipeline
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
set -euo pipefail  # setup.sh ends with set +e
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
OUT="${OUT:-runs/seqlen_warmup}"
LRS="${LRS:-2e-3 5e-2 1e-1}"
SPIKE="${SPIKE:-1.1}"
SEED="${SEED:-1234}"
if [ "${SMOKE:-0}" = 1 ]; then STEPS="${STEPS:-4}" WARMUP_STEPS="${WARMUP_STEPS:-2}"; else STEPS="${STEPS:-300}" WARMUP_STEPS="${WARMUP_STEPS:-100}"; fi
rm -rf "$OUT"
mkdir -p "$OUT/configs" "$OUT/logs"
python - "$OUT" "$LRS" "$WARMUP_STEPS" <<'PY'
import json
import sys
from pathlib import Path

out, lrs, warmup_steps = Path(sys.argv[1]), sys.argv[2].split(), int(sys.argv[3])
model = {"family": "gpt", "vocab_size": 320, "max_seq_len": 128, "d_model": 128, "n_layers": 2, "n_heads": 4, "d_ff": 512, "dropout": 0.0}
(out / "configs" / "model.json").write_text(json.dumps(model))
base = json.loads(Path("ds_configs/zero0.json").read_text())  # AdamW (0.9, 0.95), wd 0.1, clipping 1.0, 10 warmup + cosine
base["train_batch_size"], base["train_micro_batch_size_per_gpu"] = 8, 8
warmup = {
    "min_difficulty": 8,
    "max_difficulty": "auto",
    "schedule_type": "fixed_linear",
    "schedule_config": {"total_curriculum_step": warmup_steps, "difficulty_step": 8},
}
for lr in lrs:
    for name, extra in (("plain", {}), ("seqwarm", {"seqlen_warmup": warmup})):
        config = json.loads(json.dumps(base))
        config["optimizer"]["params"]["lr"] = float(lr)
        config.update(extra)
        (out / "configs" / f"lr{lr}_{name}.json").write_text(json.dumps(config, indent=2))
PY
EVAL_INTERVAL=$(( STEPS / 10 > 0 ? STEPS / 10 : 1 ))
for lr in $LRS; do
  for name in plain seqwarm; do
    run="lr${lr}_${name}"
    start=$(date +%s)
    python pretrain/main.py --ds_config "$OUT/configs/$run.json" --model_config "$OUT/configs/model.json" \
      --train_data data/tinyshakespeare.txt --max_steps "$STEPS" --log_interval 1 --eval_interval "$EVAL_INTERVAL" \
      --eval_iters 8 --seed "$SEED" --save_dir "$OUT/$run" > "$OUT/logs/$run.log" 2>&1
    echo "$run: $(( $(date +%s) - start )) s"
  done
done
python - "$OUT" "$LRS" "$SPIKE" "$WARMUP_STEPS" <<'PY' | tee "$OUT/table.md"
import json
import sys
from pathlib import Path

out, lrs, threshold, warmup_steps = Path(sys.argv[1]), sys.argv[2].split(), float(sys.argv[3]), int(sys.argv[4])


def ratios(losses):
    """The training loss ratio of Li et al.: each step's loss over the lowest loss of the steps before it."""
    lowest, out = float("inf"), []
    for loss in losses:
        out.append(loss / lowest if lowest < float("inf") else 1.0)
        lowest = min(lowest, loss)
    return out


print(
    f"| peak lr | seq-len warmup | spikes (loss ratio > {threshold:g}) | of them after step {warmup_steps} | largest ratio "
    f"| largest after step {warmup_steps} | tokens trained | final val loss |"
)
print("|---|---|---|---|---|---|---|---|")
for lr in lrs:
    for name in ("plain", "seqwarm"):
        records = [json.loads(line) for line in (out / f"lr{lr}_{name}" / "metrics.jsonl").read_text().splitlines()]
        train = {r["step"]: (r["train/lm_loss"], int(r.get("train/seq_len", 128))) for r in records if "train/lm_loss" in r}
        steps = sorted(train)
        ratio = dict(zip(steps, ratios([train[s][0] for s in steps])))
        late = [ratio[s] for s in steps if s > warmup_steps]
        val = [r["val/loss"] for r in records if "val/loss" in r]
        tokens = sum(8 * train[s][1] for s in steps)
        print(
            f"| {lr} | {'yes' if name == 'seqwarm' else 'no'} | {sum(r > threshold for r in ratio.values())} "
            f"| {sum(r > threshold for r in late)} | {max(ratio.values()):.3f} | {max(late, default=1.0):.3f} | {tokens:,} | {val[-1]:.4f} |"
        )
PY
