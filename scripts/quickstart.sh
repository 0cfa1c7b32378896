#!/usr/bin/env bash
# Set up on a fresh machine and pretrain a tiny Switch LM on Tiny Shakespeare (shipped in data/),
# 2 CPU ranks through the deepspeed launcher. On GPUs drop OMP_NUM_THREADS and pick your configs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # the launcher does not set it on CPU; 2 ranks on 2 cores
RUN_DIR="${RUN_DIR:-runs/quickstart}"
rm -rf "$RUN_DIR"
deepspeed --num_gpus 2 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" pretrain/main.py \
  --ds_config ds_configs/moe_ep2_zero2.json --model_config models/configs/tiny-switch.json \
  --train_data data/tinyshakespeare.txt --max_steps "${MAX_STEPS:-200}" --save_dir "$RUN_DIR" \
  --save_interval 100 --eval_interval 50 --log_interval 10 --wandb_project switchyard-quickstart
echo "metrics: $RUN_DIR/metrics.jsonl  checkpoints: $RUN_DIR"
