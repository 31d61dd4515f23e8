"""Evaluate a checkpoint on the test split: `python -m lightcnn.test CONFIG.yaml --ckpt_path CKPT [--key value ...]`.

CONFIG is the experiment file or, better, the `config.yaml` saved in the run folder, which holds every
override the run was trained with:

    python -m lightcnn.test runs/lenet5_digits/20260101-120000/config.yaml \
        --ckpt_path runs/lenet5_digits/20260101-120000/checkpoints/last.ckpt
    python -m lightcnn.test runs/lenet5_digits/20260101-120000/config.yaml --ckpt_path last   # the same

The checkpoint's checksum is verified first; a damaged one is an error naming the intact ones beside it.
"""
from lightcnn.training.cli import main

if __name__ == "__main__":
    main(stage="test")
