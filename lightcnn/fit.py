"""Train a network with a paper's recipe: `python -m lightcnn.fit experiments/NAME.yaml [--key value ...]`.

    python -m lightcnn.fit experiments/lenet5_digits.yaml                           # the first run, CPU, ~1 min
    python -m lightcnn.fit experiments/wrn28_10_cifar10.yaml --trainer.max_epochs 1  # override any key
    python -m lightcnn.fit experiments/wrn28_10_cifar10.yaml --help                  # every knob, typed
    python -m lightcnn.fit experiments/wrn28_10_cifar10.yaml --print_config          # the resolved config
    python -m lightcnn.fit experiments/wrn28_10_cifar10.yaml --ckpt_path last        # resume the newest run
    python -m lightcnn.fit experiments/wrn28_10_cifar10.yaml \
        --ckpt_path runs/wrn28_10_cifar10/RUN/checkpoints/last.ckpt                  # or this one
    python -m lightcnn.fit experiments/wrn28_10_cifar10.yaml --trainer.devices 8 --trainer.strategy ddp  # 8 GPUs
    torchrun --nproc_per_node 8 -m lightcnn.fit experiments/wrn28_10_cifar10.yaml \
        --trainer.devices 8 --trainer.strategy ddp                                   # the same, under torchrun

Each run writes runs/NAME/TIMESTAMP/{config.yaml,checkpoints/} and, after training, tests the final
weights on the test split (`--test_after_fit false` to skip). See lightcnn/training/cli.py.
Exit codes (docs/reliability.md): 0 finished and tested, 1 diverged (non-finite loss), 2 an error to fix
(one line), 130 Ctrl-C, 143 SIGTERM (after saving a resumable last.ckpt).
"""
from lightcnn.training.cli import main

if __name__ == "__main__":
    main(stage="fit")
