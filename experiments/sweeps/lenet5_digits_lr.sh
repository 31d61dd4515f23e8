#!/usr/bin/env bash
# A sweep without W&B: one run per (learning rate, weight decay), then a table of the finished runs.
#   bash experiments/sweeps/lenet5_digits_lr.sh                           # the full grid
#   bash experiments/sweeps/lenet5_digits_lr.sh --trainer.max_epochs 2    # extra keys go to every run
#   ROOT=runs/my_sweep bash experiments/sweeps/lenet5_digits_lr.sh
set -euo pipefail
ROOT=${ROOT:-runs/sweep_lenet5}
LRS=${LRS:-"0.01 0.05 0.1"}
WDS=${WDS:-"0 0.0005"}
for lr in $LRS; do
  for wd in $WDS; do
    python -m lightcnn.fit experiments/lenet5_digits.yaml --run_root "$ROOT" --name "lr${lr}_wd${wd}" \
      --model.optimizer.init_args.lr "$lr" --model.optimizer.init_args.weight_decay "$wd" "$@"
  done
done
python -m lightcnn.runs "$ROOT" --sort test/acc1 --csv "$ROOT/results.csv"
