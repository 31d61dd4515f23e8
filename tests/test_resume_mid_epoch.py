"""A checkpoint saved in the middle of an epoch (`ModelCheckpoint(every_n_train_steps=k)`, or what a killed run
leaves) resumes to exactly the weights of the uninterrupted run, through `python -m lightcnn.fit`: the
loaders save their position in the epoch (digits and the torchvision CIFAR pipeline through
`ResumableDataLoader`, the batched CIFAR pipeline through `BatchedLoader`)."""
from pathlib import Path

import pytest
import torch

from lightcnn.training.cli import SaveRunConfig, main
from tests.helpers import recipe_with_checkpoint, write_cifar

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--test_after_fit", "false"]


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightcnn.fit"])


def _run_dir(cli) -> Path:
    return Path(next(cb for cb in cli.trainer.callbacks if isinstance(cb, SaveRunConfig)).run_dir)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def _digits_recipe(tmp_path: Path, every: int) -> Path:
    return recipe_with_checkpoint(ROOT / "experiments" / "lenet5_digits.yaml", tmp_path / "digits.yaml",
                                  f"{{save_last: true, every_n_train_steps: {every}, save_top_k: -1}}")


def _cifar_recipe(tmp_path: Path, every: int, pipeline: str, augmentation: str = "cutout: 8") -> Path:
    write_cifar(tmp_path, hundred=False, n_train=40, n_test=8)
    recipe = tmp_path / f"cifar_{pipeline}.yaml"
    recipe.write_text(f"""
seed_everything: 5
model:
  model: lenet5
  optimizer: {{class_path: torch.optim.SGD, init_args: {{lr: 0.05, momentum: 0.9}}}}
  lr_scheduler: {{class_path: torch.optim.lr_scheduler.CosineAnnealingLR, init_args: {{T_max: 4}}}}
data:
  class_path: lightcnn.data.CIFAR10DataModule
  init_args: {{root: {tmp_path}, batch_size: 8, verify_md5: false, {augmentation}, pipeline: {pipeline},
              num_workers: 0}}
trainer:
  accelerator: cpu
  deterministic: true
  limit_val_batches: 1
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true, every_n_train_steps: {every}, save_top_k: -1}}
""")
    return recipe


def _check_mid_epoch_resume(tmp_path: Path, recipe: Path, args: list[str], steps: int, every: int, epoch: int):
    common = [str(recipe), "--run_root", str(tmp_path / "runs"), *args, *QUIET]
    straight = main([*common, "--trainer.max_steps", str(steps)])
    first = main([*common, "--trainer.max_steps", str(every)])  # what a run killed after `every` steps leaves
    ckpt = _run_dir(first) / "checkpoints" / f"epoch={epoch}-step={every}.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["loops"]["fit_loop"]["state_dict"]
    assert state["combined_loader"][0]["handed_out"] > 0  # the checkpoint holds the loader's place in the epoch
    resumed = main([*common, "--trainer.max_steps", str(steps), "--ckpt_path", str(ckpt)])
    a, b = straight.model.state_dict(), resumed.model.state_dict()  # the weights at the end of both fits
    assert straight.trainer.global_step == resumed.trainer.global_step == steps
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"{k} differs after a mid-epoch resume")
    assert not torch.equal(_weights(ckpt)["net.classifier.weight"], a["net.classifier.weight"])


def test_digits_mid_epoch_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path):
    # 6 batches per epoch; saved after step 4 (mid epoch 0), resumed to step 9 (mid epoch 1).
    _check_mid_epoch_resume(tmp_path, _digits_recipe(tmp_path, every=4),
                            ["--trainer.limit_train_batches", "6", "--trainer.limit_val_batches", "1"],
                            steps=9, every=4, epoch=0)


# The torchvision pipeline's random crops draw from the process's RNG, which no checkpoint holds: its resume
# continues with the right images in the right order (checked here without augmentation), not the same crops.
@pytest.mark.parametrize("pipeline, augmentation", [("batched", "cutout: 8"), ("torchvision", "augment: false")])
def test_cifar_mid_epoch_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path, pipeline, augmentation):
    # 40 images in batches of 8: 5 per epoch; saved after step 3 (mid epoch 0), resumed to step 8 (mid epoch 1).
    _check_mid_epoch_resume(tmp_path, _cifar_recipe(tmp_path, 3, pipeline, augmentation), [], steps=8, every=3,
                            epoch=0)


def test_cifar_resume_in_a_later_epoch_sees_the_same_batches(tmp_path):
    # Saved after step 7 (batch 2 of epoch 1): the order and the augmentation of epoch 1 come back too.
    _check_mid_epoch_resume(tmp_path, _cifar_recipe(tmp_path, every=7, pipeline="batched"), [], steps=9, every=7,
                            epoch=1)
