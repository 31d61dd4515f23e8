#!/usr/bin/env bash
# Regenerate the example pictures of the README's "Insight tools" section into docs/ (CPU, ~3 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=disabled OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
tmp=$(mktemp -d)
# 12 epochs of LeNet-5 on the digits, with weight snapshots for the feature-evolution picture
python -m lightcnn.fit experiments/lenet5_digits.yaml --trainer.logger false --run_root "$tmp/runs" \
  --trainer.max_epochs 12 --model.lr_scheduler.init_args.T_max 12 --trainer.enable_progress_bar false \
  --trainer.callbacks+=lightcnn.visualize.FeatureSnapshots --trainer.callbacks.epochs='[1,2,3,4,6,8,12]'
run=$(ls -d "$tmp"/runs/lenet5_digits/*)
digits="digits:0 digits:1 digits:2 digits:3 digits:4 digits:5 digits:6 digits:7 digits:8 digits:9"
python -m lightcnn.visualize --checkpoint "$run/checkpoints/last.ckpt" --images $digits --out "$tmp/lenet" \
  --what deconv occlusion --layers features.4
python -m lightcnn.visualize --checkpoint "$run/checkpoints/last.ckpt" --images digits:0 digits:1 digits:4 digits:7 \
  --out "$tmp/lenet" --what invariance --layers features.1 features.7
python -m lightcnn.visualize lenet5 --what evolution --snapshots "$run/snapshots" --images $digits --out "$tmp/lenet"
python -m lightcnn.visualize zfnet --images sklearn:china.jpg --what rf --out "$tmp/zfnet"
python -m lightcnn.compare --no-speed --impl reference --out "$tmp/compare"  # reference: MACs inside the fused ops counted
cp "$tmp/lenet/deconv_features.4.png" docs/lenet5_deconv.png
cp "$tmp/lenet/occlusion_2.png" docs/lenet5_occlusion.png
cp "$tmp/lenet/invariance.png" docs/lenet5_invariance.png
cp "$tmp/lenet/evolution.png" docs/lenet5_evolution.png
cp "$tmp/zfnet/receptive_fields.png" docs/zfnet_receptive_fields.png
cp "$tmp/compare/compare.png" docs/compare.png
rm -rf "$tmp"
