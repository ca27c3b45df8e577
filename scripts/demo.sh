#!/usr/bin/env sh
# The README's main job on sample_data/: a short CMID pretraining run on the NAIP crops.
# Usage: sh scripts/demo.sh OUT_DIR   (run through `make demo`, which puts .venv/bin on PATH)
set -eu
out=${1:-demo_out}
mkdir -p "$out"
echo "== 1/1 pretrain CMID (resnet18, 64 px, 20 steps) on sample_data/naip"
geocmid pretrain --rasters sample_data/naip -o "$out/pretrain" --backbone resnet18 \
  --patch-size 64 --batch-size 8 --max-steps 20 --workers 0 --seed 0 --overwrite
echo
echo "encoder:    $out/pretrain/encoder.pt"
echo "model card: $out/pretrain/model_card.json"
echo "checkpoint: $out/pretrain/checkpoints/last.ckpt"
