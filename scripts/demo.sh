#!/usr/bin/env sh
# The README's main job on sample_data/, in short steps: pretrain an encoder, fine-tune it on
# labelled footprints, map a scene with it, and detect change between two NAIP dates. Each step is tiny (resnet18, 64 px patches, a few
# dozen steps) so that it takes about a minute on a 2-core CPU: the outputs show the pipeline
# working end to end, not a useful model. Every command prints the files it writes.
# Usage: sh scripts/demo.sh OUT_DIR   (run through `make demo`, which puts .venv/bin on PATH)
set -eu
out=${1:-demo_out}
mkdir -p "$out"

echo "== 1/5 pretrain CMID (resnet18, 64 px, 20 steps) on sample_data/naip"
geocmid pretrain --rasters sample_data/naip -o "$out/pretrain" --backbone resnet18 \
  --patch-size 64 --batch-size 8 --max-steps 20 --workers 0 --seed 0 --overwrite

# The NAIP encoder takes 4 bands, the SpaceNet tile has 1, so segmentation gets its own
# encoder, pretrained label-free on the very tile it is then fine-tuned on. A random-init
# backbone (no --encoder) would be shorter, but would skip what geocmid is for: a
# self-supervised encoder carried into a downstream model (bands, normalisation and
# provenance travel through its model card).
echo
echo "== 2/5 pretrain CMID (resnet18, 64 px, 20 steps) on sample_data/spacenet (no labels)"
geocmid pretrain --rasters sample_data/spacenet/buildings.tif -o "$out/pretrain_spacenet" \
  --backbone resnet18 --patch-size 64 --batch-size 8 --max-steps 20 --workers 0 --seed 0 \
  --overwrite

# Dice loss: with a few steps, cross-entropy settles on "all background" (buildings cover
# about 6 % of the tile); Dice rewards the footprints from the start.
echo
echo "== 3/5 fine-tune a U-Net (30 steps) on the SpaceNet footprints"
printf 'loss: dice\n' > "$out/segment.yaml"
geocmid train segment --rasters sample_data/spacenet/buildings.tif \
  --labels sample_data/spacenet/buildings.geojson --classes 'background,building:#e6194b' \
  --encoder "$out/pretrain_spacenet" -o "$out/segment" --config "$out/segment.yaml" \
  --patch-size 64 --batch-size 8 --max-steps 30 --seed 0 --overwrite

echo
echo "== 4/5 map the tile: building polygons (GeoPackage) and labels (COG)"
geocmid segment sample_data/spacenet/buildings.tif -o "$out/buildings.gpkg" --raster \
  --model "$out/segment" --min-area 2 --overwrite

# Label-free change detection with the NAIP encoder of step 1: the distance between the two
# dates' encoder features, thresholded by Otsu's method.
echo
echo "== 5/5 change between NAIP 2012 and 2020 (label-free, encoder of step 1)"
geocmid change sample_data/naip/naip_2012.tif sample_data/naip/naip_2020.tif \
  -o "$out/changes.gpkg" --raster --encoder "$out/pretrain" --min-area 500 --overwrite
