#!/usr/bin/env bash
# Switch vs dense on Penn Treebank (../shared/data/ptb, or DATA=dir with ptb.train.txt and ptb.valid.txt): a dense
# GPT and the Switch LM with 2, 4, 8, 16 and 32 experts at the same FLOPs per token (same shapes; every other FFN
# a top-1 expert layer), each trained from the same seed on one CPU process for STEPS steps, less than one epoch
# (refused if the steps would repeat training data), validation loss every tenth of the run on the first
# sequences of ptb.valid. Then eval/plot.py draws validation loss against steps and against training seconds,
# and writes a markdown table (parameters, active parameters, final validation loss, seconds, tokens/s).
# README, "Switch vs dense on PTB". Environment:
#   STEPS=N           optimizer steps per model (default 320: 0.41 of an epoch of the 1.6M training tokens)
#   EXPERTS="2 8"     the Switch models (default 2 4 8 16 32; "" for none)
#   SWITCH_CONFIG=J   a JSON object of fields added to every Switch model config, e.g. '{"dropless": true}'
#                     (top_k 2 or a shared expert add FLOPs per token: the comparison is then no longer FLOP-matched)
#   INIT_SCALE=X      every model's init_scale (default 0.1, the Switch presets': the dense model starts from the same
#                     init distribution, so the curves differ by the experts, not by the init)
#   OUT=dir           where everything goes (default runs/switch_curves; replaced)
#   SMOKE=1           a tiny run (the first 1,500 training sentences, seq 32, 8 steps) to check the pipeline
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data/ptb}"
for split in train valid; do
  if [ ! -f "$DATA/ptb.$split.txt" ]; then
    echo "error: $DATA/ptb.$split.txt does not exist; put Penn Treebank in ../shared/data/ptb (../shared/data/README.md) or point DATA at a folder with ptb.train.txt and ptb.valid.txt" >&2
    exit 2
  fi
done
source scripts/setup.sh
set -euo pipefail  # setup.sh ends with set +e
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
OUT="${OUT:-runs/switch_curves}"
EXPERTS="${EXPERTS-2 4 8 16 32}"  # EXPERTS="": the dense model alone
SWITCH_CONFIG="${SWITCH_CONFIG:-}"
INIT_SCALE="${INIT_SCALE:-0.1}"
if [ "${SMOKE:-0}" = 1 ]; then
  TRAIN_LINES=1500 VALID_LINES=300 VOCAB=512 SEQ_LEN=32 MICRO_BATCH=4 STEPS="${STEPS:-8}" EVAL_ITERS=2 LOG_INTERVAL=2
else
  TRAIN_LINES=0 VALID_LINES=0 VOCAB=2048 SEQ_LEN=128 MICRO_BATCH=16 STEPS="${STEPS:-320}" EVAL_ITERS=8 LOG_INTERVAL=10
fi
EVAL_INTERVAL=$(( STEPS / 10 > LOG_INTERVAL ? STEPS / 10 / LOG_INTERVAL * LOG_INTERVAL : LOG_INTERVAL ))  # a log step: its time is logged
rm -rf "$OUT"
mkdir -p "$OUT/data" "$OUT/configs" "$OUT/logs"
for split in train valid; do
  lines=$([ "$split" = train ] && echo "$TRAIN_LINES" || echo "$VALID_LINES")
  if [ "$lines" = 0 ]; then cp "$DATA/ptb.$split.txt" "$OUT/data/$split.txt"; else head -n "$lines" "$DATA/ptb.$split.txt" > "$OUT/data/$split.txt"; fi
done
python -m pretrain.tokenizer "$OUT/data/train.txt" --per_line --vocab_size "$VOCAB" --output "$OUT/data/bpe$VOCAB" > "$OUT/logs/tokenizer.log"
for split in train valid; do
  python -m pretrain.preprocess "$OUT/data/$split.txt" --per_line --tokenizer "$OUT/data/bpe$VOCAB.model" \
    --output_prefix "$OUT/data/$split" --workers 2 > "$OUT/logs/preprocess.$split.log" 2>&1
done
# The model and DeepSpeed configs, and the refusal of a run that would see a training sequence twice.
python - "$OUT" "$VOCAB" "$SEQ_LEN" "$MICRO_BATCH" "$STEPS" "$INIT_SCALE" "$SWITCH_CONFIG" $EXPERTS <<'EOF'
import json
import sys
from pathlib import Path

from pretrain.data.indexed import IndexedTokens

out, vocab, seq_len, micro_batch, steps, init_scale, switch_config, *experts = sys.argv[1:]
out, vocab, seq_len, micro_batch, steps = Path(out), int(vocab), int(seq_len), int(micro_batch), int(steps)


def refuse(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


try:
    extra = json.loads(switch_config or "{}")
except json.JSONDecodeError as e:
    refuse(f"SWITCH_CONFIG is not JSON ({e}): {switch_config}")
if not isinstance(extra, dict):
    refuse(f"SWITCH_CONFIG must be a JSON object of Switch model-config fields, got {switch_config}")
tokens = len(IndexedTokens(out / "data" / "train").tokens)
sequences = (tokens - 1) // seq_len  # the training set's samples (pretrain/data/lm_dataset.py LMSamples): one epoch
if steps * micro_batch > sequences:
    refuse(
        f"STEPS={steps} x {micro_batch} sequences of {seq_len} tokens would repeat training data: "
        f"the {tokens:,}-token training set holds {sequences:,} sequences; use STEPS <= {sequences // micro_batch}"
    )
print(f"{steps} steps x {micro_batch} x {seq_len} tokens = {steps * micro_batch * seq_len:,} of the {tokens:,} training tokens ({steps * micro_batch / sequences:.2f} epochs)")
dense = {"family": "gpt", "vocab_size": vocab, "max_seq_len": seq_len, "d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 512, "dropout": 0.0}
dense["init_scale"] = float(init_scale)
models = {"dense": dense, **{f"switch-{e}": {**dense, "family": "switch", "num_experts": int(e), **extra} for e in experts}}
for name, model in models.items():
    (out / "configs" / f"{name}.json").write_text(json.dumps(model))
ds = json.loads(Path("ds_configs/zero0.json").read_text())
ds.update(train_batch_size=micro_batch, train_micro_batch_size_per_gpu=micro_batch)
ds["scheduler"]["params"]["warmup_num_steps"] = max(steps // 20, 1)
(out / "ds.json").write_text(json.dumps(ds))
EOF
runs=()
for model in dense $(for e in $EXPERTS; do echo "switch-$e"; done); do
  start=$(date +%s)
  python pretrain/main.py --ds_config "$OUT/ds.json" --model_config "$OUT/configs/$model.json" \
    --train_data "$OUT/data/train" --val_data "$OUT/data/valid" --max_steps "$STEPS" --save_dir "$OUT/$model" \
    --log_interval "$LOG_INTERVAL" --eval_interval "$EVAL_INTERVAL" --eval_iters "$EVAL_ITERS" > "$OUT/logs/$model.log" 2>&1 ||
    { echo "error: $model failed; see $OUT/logs/$model.log" >&2; tail -n 5 "$OUT/logs/$model.log" >&2; exit 1; }
  echo "$model: $(grep -m1 -o '[0-9,]* parameters, [0-9,]* active per token' "$OUT/logs/$model.log"); $STEPS steps, $(( $(date +%s) - start )) s with start-up and validation"
  runs+=("$OUT/$model")
done
python -m eval.plot "${runs[@]}" --panels val/loss --x steps --output "$OUT/val_loss_vs_steps.png" > /dev/null
python -m eval.plot "${runs[@]}" --panels val/loss --x seconds --output "$OUT/val_loss_vs_seconds.png" --table "$OUT/results.md" > /dev/null
cat "$OUT/results.md"
echo "plots: $OUT/val_loss_vs_steps.png $OUT/val_loss_vs_seconds.png  table: $OUT/results.md  runs: $OUT/<model>"
