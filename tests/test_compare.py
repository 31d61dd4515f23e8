"""`python -m lightcnn.compare`: counts against lightcnn.published, saved-activation bytes against a hand
count, the table/CSV/chart written, clear errors, and MACs that do not depend on the kernels."""
from __future__ import annotations

import csv

import matplotlib.image as mpimg
import pytest
from torch import nn

from lightcnn.compare import build, count_macs, main, saved_activation_bytes, select
from lightcnn.published import published


def test_compare_cli_writes_table_csv_and_chart_matching_published_counts(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["--models", "lenet5,resnet2*,alexnet", "--no-speed", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "compare.csv").read_text().splitlines()))
    assert [r["model"] for r in rows] == ["lenet5", "resnet20", "alexnet"]
    for r in rows:
        pub = published(r["model"])
        assert int(r["params"]) == pub.params
        assert float(r["gmacs"]) == pytest.approx(pub.gmacs, rel=0.01)
        assert float(r["act_mib_per_image"]) > 0
        assert r["infer_img_s"] == ""  # --no-speed
    assert rows[2]["top1_err"] == str(published("alexnet").top1_err)
    table = (out / "compare.md").read_text()
    assert "| alexnet | alexnet | imagenet | 227x227 | 60,965,224 | 0.7244 |" in table
    assert table == capsys.readouterr().out.split("wrote ")[0].rstrip("\n") + "\n"
    img = mpimg.imread(out / "compare.png")
    assert img.shape[0] > 200 and img[..., :3].std() > 0.01


def test_compare_measures_speed_when_asked(tmp_path):
    assert main(["--models", "lenet5", "--out", str(tmp_path), "--min-time", "0.05", "--batch-size", "4"]) == 0
    (row,) = csv.DictReader((tmp_path / "compare.csv").read_text().splitlines())
    assert float(row["infer_img_s"]) > 0 and float(row["train_img_s"]) > 0


def test_saved_activation_bytes_counts_what_autograd_keeps_for_the_backward():
    """conv keeps its input (its weight is a parameter: excluded); the ReLU keeps its output; the final
    linear layer keeps the ReLU's output again (the same storage, counted once) and its weight."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x_bytes = 2 * 3 * 8 * 8 * 4
    relu_bytes = 2 * 8 * 6 * 6 * 4
    assert saved_activation_bytes(model, (3, 8, 8), batch=2) == x_bytes + relu_bytes


def test_select_names_patterns_and_clear_errors(capsys):
    assert select("resnet2*,lenet5,wrn16_4") == ["resnet20", "lenet5", "wrn16_4"]
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'.*Closest: .*resnet20"):
        select("resnet21")
    with pytest.raises(ValueError, match="no registered model matches 'nosuch\\*'"):
        select("nosuch*")
    assert main(["--models", "vgg17"]) == 2
    assert "unknown model 'vgg17'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--no-speed" in capsys.readouterr().out


def test_kernel_backed_model_reports_the_same_macs_as_its_reference():
    kernel = count_macs(build("wrn16_4", "cpu", impl="kernel"), (3, 32, 32))
    reference = count_macs(build("wrn16_4", "cpu", impl="reference"), (3, 32, 32))
    assert kernel == reference

