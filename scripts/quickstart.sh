#!/usr/bin/env bash
# Set up on a fresh machine and pretrain a tiny Switch LM on Tiny Shakespeare (shipped in data/):
# train a BPE tokenizer, preprocess to a memory-mapped token file, then train on 2 CPU ranks
# through the deepspeed launcher. On GPUs drop OMP_NUM_THREADS and pick your configs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # the launcher does not set it on CPU; 2 ranks on 2 cores
RUN_DIR="${RUN_DIR:-runs/quickstart}"
rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR/data"
python -m pretrain.tokenizer data/tinyshakespeare.txt --vocab_size 320 --output "$RUN_DIR/data/shakespeare.bpe320"
python -m pretrain.preprocess data/tinyshakespeare.txt --tokenizer "$RUN_DIR/data/shakespeare.bpe320.model" \
  --output_prefix "$RUN_DIR/data/shakespeare" --workers 2
deepspeed --num_gpus 2 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" pretrain/main.py \
  --ds_config ds_configs/moe_ep2_zero2.json --model_config models/configs/tiny-switch.json \
  --train_data "$RUN_DIR/data/shakespeare" --max_steps "${MAX_STEPS:-200}" --save_dir "$RUN_DIR" \
  --save_interval 100 --eval_interval 50 --log_interval 10 --wandb_project switchyard-quickstart
echo "metrics: $RUN_DIR/metrics.jsonl  checkpoints: $RUN_DIR"
