"""Damaged data files give an error that names the file and says what to do: one corrupt JPEG in an ImageNet
folder tree, one truncated CIFAR batch (with the MD5 check off, which would otherwise catch it)."""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightcnn.data import CIFAR10DataModule, ImageNetDataModule
from lightcnn.data.base import UnreadableDataError
from lightcnn.training.cli import main
from tests.helpers import write_cifar, write_folder_tree


def test_a_truncated_jpeg_in_an_imagenet_tree_is_named_in_the_error(tmp_path):
    write_folder_tree(tmp_path)
    bad = tmp_path / "train" / "n02" / "1.JPEG"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(buffer, "JPEG")
    bad.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # cut in the middle of the scan
    dm = ImageNetDataModule(root=str(tmp_path), batch_size=9, augmentation="alexnet", image_size=16, resize_size=20,
                            num_classes=3, num_workers=0)
    dm.setup("fit")
    with pytest.raises(UnreadableDataError, match=rf"{bad}.* truncated or corrupt\. Replace it .* or delete it"):
        next(iter(dm.train_dataloader()))
    assert next(iter(dm.val_dataloader()))[0].shape == (9, 3, 16, 16)  # the intact split still loads


def test_a_truncated_cifar_batch_is_named_in_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["lightcnn.fit"])
    write_cifar(tmp_path, hundred=False, n_train=20)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:100])
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=4, verify_md5=False)
    with pytest.raises(UnreadableDataError, match=rf"{bad} is not a readable CIFAR batch .*Download and extract"):
        dm.setup("fit")
    recipe = Path(__file__).resolve().parents[1] / "experiments" / "resnet110_cifar10.yaml"
    with pytest.raises(SystemExit) as exit_:
        main([str(recipe), "--data.root", str(tmp_path), "--data.verify_md5", "false", "--model.model", "lenet5",
              "--run_root", str(tmp_path / "runs"), "--trainer.logger", "false", "--trainer.accelerator", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lightcnn.fit: error: {bad} is not a readable CIFAR batch")
