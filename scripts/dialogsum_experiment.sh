#!/usr/bin/env bash
# Summarization on DialogSum (../shared/data/dialogsum, or DATA=dir holding dialogsum.{train,dev,test}.jsonl
# from https://github.com/cylnlp/dialogsum): a sentencepiece tokenizer, document/summary pairs, a small
# encoder-decoder trained on 2 CPU ranks, and ROUGE on the test set's three references (README, "Summarization").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
DATA="${DATA:-../shared/data/dialogsum}"
OUT="${OUT:-runs/dialogsum}"
STEPS="${STEPS:-1500}"
rm -rf "$OUT"
mkdir -p "$OUT/data"
python -m pretrain.tokenizer "$DATA/dialogsum.train.jsonl" --field dialogue --vocab_size 4000 --output "$OUT/data/dialogsum.bpe4000"
for split in train dev; do
  python -m pretrain.preprocess_pairs --jsonl "$DATA/dialogsum.$split.jsonl" --source_field dialogue --target_field summary \
    --tokenizer "$OUT/data/dialogsum.bpe4000.model" --output_prefix "$OUT/data/$split" --workers 2
done
start=$(date +%s)
deepspeed --num_gpus 2 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" pretrain/main.py --task translation \
  --ds_config ds_configs/zero1.json --model_config models/configs/dialogsum-transformer.json \
  --train_data "$OUT/data/train" --val_data "$OUT/data/dev" --max_steps "$STEPS" --save_dir "$OUT/run" \
  --eval_interval 500 --log_interval 50
echo "training took $(( $(date +%s) - start )) s"
python -m eval.rouge "$OUT/run" --src "$DATA/dialogsum.test.jsonl" --src_field dialogue \
  --ref "$DATA/dialogsum.test.jsonl" --ref_fields summary1,summary2,summary3 --beam 4 --max_len_b 60 \
  --hyp_output "$OUT/test.summaries.txt" --output "$OUT/rouge.json"
