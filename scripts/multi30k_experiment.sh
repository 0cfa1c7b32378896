#!/usr/bin/env bash
# Multi30k de->en (../shared/data/multi30k/raw, or DATA=dir with train.{de,en} and test_2016_flickr.{de,en}
# from https://github.com/multi30k/dataset): a shared 6000-piece BPE, the first 28,000 training pairs to
# train and the last 1,000 to validate, a small dense encoder-decoder and its Switch variant at equal
# FLOPs per token, each 600 steps on one CPU rank (validation loss and BLEU every 200 steps), then sacreBLEU on
# test_2016_flickr (README, "Translation"). MODELS="multi30k-switch-transformer" runs one of them.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
DATA="${DATA:-../shared/data/multi30k/raw}"
OUT="${OUT:-runs/multi30k}"
MODELS="${MODELS:-multi30k-transformer multi30k-switch-transformer}"
rm -rf "$OUT"
mkdir -p "$OUT/data"
for lang in de en; do
  head -n 28000 "$DATA/train.$lang" > "$OUT/data/train.$lang"
  tail -n 1000 "$DATA/train.$lang" > "$OUT/data/valid.$lang"
done
python -m pretrain.tokenizer "$OUT/data/train.de" "$OUT/data/train.en" --per_line --vocab_size 6000 --output "$OUT/data/bpe6000"
for split in train valid; do
  python -m pretrain.preprocess_pairs --source "$OUT/data/$split.de" --target "$OUT/data/$split.en" \
    --tokenizer "$OUT/data/bpe6000.model" --output_prefix "$OUT/data/$split" --workers 2
done
for model in $MODELS; do
  start=$(date +%s)
  python pretrain/main.py --task translation --ds_config ds_configs/translation_multi30k.json \
    --model_config "models/configs/$model.json" --train_data "$OUT/data/train" --val_data "$OUT/data/valid" \
    --max_steps 600 --save_dir "$OUT/$model" --log_interval 20 --eval_interval 200 --eval_iters 8 \
    --bleu_src "$OUT/data/valid.de" --bleu_ref "$OUT/data/valid.en"
  echo "$model: training took $(( $(date +%s) - start )) s"
  python -m eval.bleu "$OUT/$model" --src "$DATA/test_2016_flickr.de" --ref "$DATA/test_2016_flickr.en" --beam 5 \
    --lenpen 1.0 --hyp_output "$OUT/$model.test_2016_flickr.en" --output "$OUT/$model.bleu.json"
done
