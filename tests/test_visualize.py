"""The insight tools of lightcnn.visualize: pictures written and non-trivial, the deconvnet against a
hand-written projection and against the receptive fields, and the snapshot callback in a Lightning fit."""
from __future__ import annotations

import lightning as L
import matplotlib.image as mpimg
import pytest
import torch
import torch.nn.functional as F

from lightcnn import models
from lightcnn.data.digits import load_digits_tensors
from lightcnn.visualize import (
    FeatureSnapshots,
    feature_evolution,
    load_images,
    load_model,
    project,
    project_strongest,
    receptive_field_table,
    receptive_fields,
    resolve_layer,
    trace_chain,
    visualize,
)
from lightcnn.visualize.__main__ import main
from lightcnn.visualize.analysis import invariance, occlusion_map
from lightcnn.visualize.attribution import attribute, effective_receptive_field
from lightcnn.visualize.core import Chain
from lightcnn.visualize.names import label, short_label

PHOTOS = ["sklearn:china.jpg", "sklearn:flower.jpg"]


def _non_constant_png(path) -> bool:
    img = mpimg.imread(path)
    return img.ndim >= 2 and min(img.shape[:2]) > 20 and float(img[..., :3].std()) > 0.01


@pytest.fixture(scope="module")
def trained_lenet():
    """LeNet-5 after 3 epochs of Adam on scikit-learn's digits (plain torch, about a second)."""
    torch.manual_seed(0)
    x, y = load_digits_tensors()
    model = models.create("lenet5")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9, f"LeNet-5 did not learn the digits (train accuracy {acc:.2f})"
    return model


def _small(name: str, side: int):
    """A randomly initialised ImageNet-style net with narrow FC layers, fed `side` x `side` photographs."""
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, hidden_features=64).eval()
    x, _ = load_images(PHOTOS, model, side)
    return model, x


SMALL = [("alexnet", 131), ("zfnet", 112), ("vgg11", 64)]


def test_visualize_writes_every_picture_non_constant_for_trained_lenet(trained_lenet, tmp_path):
    x, labels = load_images(["digits:1", "digits:7"], trained_lenet)
    assert labels == [1, 7]
    written = visualize(trained_lenet, x, tmp_path, labels=labels, top=6)
    assert set(written) == {"filters", "maps", "deconv", "occlusion", "rf", "invariance", "gradcam", "guided", "erf"}
    pngs = [p for paths in written.values() for p in paths if p.suffix == ".png"]
    assert len(written["deconv"]) == 3 and len(written["occlusion"]) == 2
    for p in pngs:
        assert p.is_file() and _non_constant_png(p), p


@pytest.mark.parametrize("name,side,what", [("alexnet", 131, ("filters", "deconv", "rf", "maps")),
                                            ("vgg11", 64, ("deconv", "maps"))])
def test_visualize_writes_pictures_for_photographs(name, side, what, tmp_path):
    model, x = _small(name, side)
    written = visualize(model, x, tmp_path, layers=["relu1", "relu5"] if name != "vgg11" else ["relu1_1", "relu5_2"],
                        what=what, top=4, verbose=False)
    assert set(written) == set(what)
    for paths in written.values():
        for p in paths:
            assert p.is_file() and (p.suffix != ".png" or _non_constant_png(p)), p


def _deconv_cases():
    return [(name, side, layer) for name, side in SMALL
            for layer in (("relu1", "pool2", "relu3") if name != "vgg11" else ("relu1_1", "pool2", "relu4_1"))]


@pytest.mark.parametrize("name,side,layer", _deconv_cases())
def test_deconv_projection_is_zero_outside_the_receptive_field(name, side, layer):
    model, x = _small(name, side)
    chain = trace_chain(model, x)
    full = next(n for n in chain.spatial_names() if n.endswith("." + layer))
    field = {f.name: f for f in receptive_fields(chain)}[full]
    projs = project_strongest(chain, full, top=4)
    assert any(p.activation > 0 for p in projs)
    for p in projs:
        t, b, lft, r = field.box(*p.position, tuple(x.shape[-2:]))
        inside = torch.zeros(x.shape[-2:], dtype=torch.bool)
        inside[t:b + 1, lft:r + 1] = True
        support = p.pixels.abs().sum(0)
        assert (~inside).any(), "choose a layer whose receptive field is smaller than the image"
        assert support[~inside].abs().max() == 0, f"{name} {layer}: projection leaks outside its receptive field"
        assert support[inside].abs().max() > 0 or p.activation == 0


def test_deconv_projection_is_zero_outside_the_receptive_field_lenet(trained_lenet):
    x, _ = load_images([f"digits:{i}" for i in range(8)], trained_lenet)
    chain = trace_chain(trained_lenet, x)
    fields = {f.name: f for f in receptive_fields(chain)}
    for layer in ("features.1", "features.4"):
        for p in project_strongest(chain, layer, top=6):
            t, b, lft, r = fields[layer].box(*p.position, (32, 32))
            outside = p.pixels.clone()
            outside[:, t:b + 1, lft:r + 1] = 0
            assert outside.abs().max() == 0 and p.pixels.abs().max() > 0


def test_deconv_handles_lenet5_original_sparse_c3_and_trainable_subsampling():
    """The 1998 LeNet-5: a sparse C3 and trainable subsampling are linear (transposed), the scaled tanh
    is rectified; projections stay inside the receptive fields (C3: 14x14, S4: 16x16)."""
    model = models.create("lenet5_original").eval()
    x, _ = load_images([f"digits:{i}" for i in range(4)], model)
    chain = trace_chain(model, x)
    fields = {f.name: f for f in receptive_fields(chain)}
    assert fields["features.act3"].size == (14, 14) and fields["features.s4"].size == (16, 16)
    for layer in ("features.act3", "features.act4"):
        projs = project_strongest(chain, layer, top=4)
        assert any(p.pixels.abs().max() > 0 for p in projs)
        for p in projs:
            t, b, lft, r = fields[layer].box(*p.position, (32, 32))
            outside = p.pixels.clone()
            outside[:, t:b + 1, lft:r + 1] = 0
            assert outside.abs().max() == 0


def test_deconv_equals_unpooling_rectification_and_transposed_filtering():
    """AlexNet's first block by hand (Sec. 2.1): unpool with the switches, ReLU, LRN passed through,
    conv_transpose2d with conv1's weights."""
    model, x = _small("alexnet", 131)
    chain = trace_chain(model, x)
    conv = model.features.conv1
    a = F.relu(conv(x))
    pre_pool = model.features.norm1(a)
    pooled, switches = F.max_pool2d(pre_pool, 3, 2, return_indices=True)
    signal = torch.zeros_like(pooled)
    signal[0, 5, 3, 4] = pooled[0, 5, 3, 4]
    signal[1, 17, 10, 2] = pooled[1, 17, 10, 2]
    by_hand = F.conv_transpose2d(F.relu(F.max_unpool2d(signal, switches, 3, 2, output_size=pre_pool.shape[-2:])),
                                 conv.weight, stride=4, output_padding=(x.shape[-1] - 11) % 4)
    torch.testing.assert_close(project(chain, "features.pool1", signal), by_hand)


def test_receptive_fields_of_alexnet_match_the_published_sizes():
    """AlexNet's receptive fields (Araujo, Norris, Sim 2019, "Computing receptive fields of CNNs"):
    conv1 11, pool1 19, conv2 51, pool2 67, conv3 99, conv4 131, conv5 163, pool5 195."""
    model, x = _small("alexnet", 227)
    fields = {f.name.split(".")[-1]: f.size[0] for f in receptive_fields(trace_chain(model, x[:1])) if f.size}
    assert [fields[n] for n in ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5")] == \
        [11, 19, 51, 67, 99, 131, 163, 195]
    table = receptive_field_table(receptive_fields(trace_chain(model, x[:1])), (227, 227))
    assert "| features.pool5 | MaxPool2d | 6x6 | 195x195 | 32 |" in table


def test_occlusion_map_entry_equals_the_probability_with_the_square_there(trained_lenet):
    x, labels = load_images(["digits:3"], trained_lenet)
    prob = occlusion_map(trained_lenet, x, labels[0], size=8, stride=4)
    assert prob.shape == (7, 7)
    y = x.clone()
    y[..., 12:20, 8:16] = 0.0
    with torch.no_grad():
        direct = F.softmax(trained_lenet(y), 1)[0, 3]
    torch.testing.assert_close(prob[3, 2], direct)
    assert prob.max() - prob.min() > 1e-3  # occluding the stroke matters more than occluding the border


def test_invariance_is_zero_distance_at_the_identity_transformation(trained_lenet):
    x, labels = load_images(["digits:4", "digits:9"], trained_lenet)
    res = {r.kind: r for r in invariance(trained_lenet, x, ["features.1", "fc.2"], labels)}
    with torch.no_grad():
        p = F.softmax(trained_lenet(x), 1)[torch.arange(2), torch.tensor(labels)]
    for kind, identity in (("translation", 0.0), ("scale", 1.0), ("rotation", 0.0)):
        t = int(torch.isclose(res[kind].amounts, torch.tensor(identity)).nonzero()[0])
        for d in res[kind].distance.values():
            assert d[:, t].abs().max() < 1e-5
            assert d.max() > 0.01
        torch.testing.assert_close(res[kind].probability[:, t], p)


def test_unknown_layer_is_an_error_listing_the_valid_ones(trained_lenet, tmp_path):
    x, _ = load_images(["digits:0"], trained_lenet)
    with pytest.raises(ValueError, match=r"unknown layer 'conv9'.*Valid layers: features, features\.0"):
        visualize(trained_lenet, x, tmp_path, layers=["conv9"])
    resnet = models.create("resnet20").eval()
    xr = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"cannot be projected by the deconvnet.*no plain conv/ReLU/pool chain"):
        visualize(resnet, xr, tmp_path, layers=["layer2"], what=["deconv"])


def test_cli_writes_pictures_from_a_state_dict_and_reports_errors(trained_lenet, tmp_path, capsys):
    ckpt = tmp_path / "lenet.pt"
    torch.save(trained_lenet.state_dict(), ckpt)
    out = tmp_path / "pics"
    assert main(["lenet5", "--checkpoint", str(ckpt), "--what", "rf", "deconv", "--layers", "features.4",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| features.4 | Tanh | 10x10 | 14x14 | 2 |" in printed
    assert _non_constant_png(out / "deconv_features.4.png") and _non_constant_png(out / "receptive_fields.png")
    assert main(["lenet5", "--layers", "nope", "--what", "maps", "--out", str(out)]) == 2
    assert "unknown layer 'nope'" in capsys.readouterr().err
    assert main(["lenet5", "--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["lenet6"]) == 2
    assert "Unknown model 'lenet6'" in capsys.readouterr().err
    assert main(["lenet5", "--images", str(tmp_path / "no.png")]) == 2
    assert "image" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "deconvnet" in capsys.readouterr().out


def test_load_model_reads_the_class_count_of_a_plain_state_dict_and_rejects_another_model(tmp_path):
    path = tmp_path / "five.pt"
    torch.save(models.create("lenet5", num_classes=5).state_dict(), path)
    assert load_model("lenet5", path).classifier.out_features == 5
    with pytest.raises(ValueError, match="does not fit 'lenet5_original'"):
        load_model("lenet5_original", path)


def test_feature_snapshots_callback_in_a_lightning_fit_feeds_the_evolution_picture(tmp_path):
    from lightcnn.data import DigitsDataModule
    from lightcnn.training import ClassifierModule

    L.seed_everything(0)
    module = ClassifierModule("lenet5", optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                              num_classes=10, in_chans=1)
    snaps = FeatureSnapshots(epochs=[1, 2])
    trainer = L.Trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[snaps], default_root_dir=tmp_path)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    names = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert names == ["epoch=0000.pt", "epoch=0001.pt", "epoch=0002.pt"]
    last = load_model(None, tmp_path / "snapshots" / "epoch=0002.pt")
    for k, v in module.net.state_dict().items():
        torch.testing.assert_close(last.state_dict()[k], v)
    first = load_model("lenet5", tmp_path / "snapshots" / "epoch=0000.pt")
    assert not torch.equal(first.features[0].weight, last.features[0].weight)
    ckpt = tmp_path / "last.ckpt"  # a Lightning checkpoint of the same run loads as well
    trainer.save_checkpoint(ckpt)
    torch.testing.assert_close(load_model(None, ckpt).features[0].weight, last.features[0].weight)
    with pytest.raises(ValueError, match="trained as 'lenet5', not 'alexnet'"):
        load_model("alexnet", ckpt)
    x, _ = load_images([f"digits:{i}" for i in range(6)], last)
    path = feature_evolution(None, tmp_path / "snapshots", x, tmp_path / "evo", layers=["features.1", "features.4"],
                             maps=3)
    assert _non_constant_png(path)


def test_feature_snapshots_is_configurable_by_class_path():
    """What a recipe's `trainer.callbacks` entry does: jsonargparse builds the callback from class_path."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callback", type=L.Callback)
    cfg = parser.parse_args([('--callback={"class_path": "lightcnn.visualize.FeatureSnapshots", '
                             '"init_args": {"epochs": [1, 5], "dirpath": "snaps"}}')])
    cb = parser.instantiate(cfg).callback
    assert isinstance(cb, FeatureSnapshots) and cb.epochs == {1, 5} and cb.dirpath == "snaps"


def test_chain_reports_where_a_residual_network_stops_being_a_chain():
    chain = trace_chain(models.create("resnet20").eval(), torch.randn(1, 3, 32, 32))
    assert isinstance(chain, Chain) and chain.broken_at is not None
    assert "conv1" in chain.spatial_names() and "layer2.0.conv1" not in chain.spatial_names()


# --- any network: Grad-CAM, guided backpropagation, the empirical receptive field -------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small convolutions on a shared 2-core machine: one thread is many times faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_gradcam_equals_the_gradient_weighted_maps_of_the_last_stage_of_a_residual_network():
    """Selvaraju et al. 2017, eq. 1-2: weights = spatial mean of d y_c / d A, map = ReLU(sum_k w_k A_k),
    upsampled (bilinear) to the image."""
    torch.manual_seed(0)
    model = models.create("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    att = attribute(model, x, [3, 7])
    assert att.layer == "layer3"  # the last stage with a map larger than 1x1
    caught = {}
    hook = model.layer3.register_forward_hook(lambda m, a, out: caught.__setitem__("a", out))
    with torch.enable_grad():
        logits = model(x)
        (g,) = torch.autograd.grad(logits[0, 3] + logits[1, 7], caught["a"])
    hook.remove()
    cam = F.relu((g.mean((2, 3), keepdim=True) * caught["a"]).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(att.cam, cam.detach())
    assert att.cam.max() > 0


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x > 0) * (g > 0)  # Springenberg et al. 2015, Fig. 1: both the input and the signal


def test_guided_backprop_equals_a_hand_written_guided_relu_and_differs_from_the_gradient():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(inplace=True), torch.nn.Conv2d(4, 5, 3),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(5 * 4 * 4, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    att = attribute(net, x, [2, 0])
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        h = _GuidedReLU.apply(net[0](xg))
        out = net[5](net[4](_GuidedReLU.apply(net[2](h))))
        (guided,) = torch.autograd.grad(out[0, 2] + out[1, 0], xg)
        (plain,) = torch.autograd.grad(net(xg)[[0, 1], [2, 0]].sum(), xg)
    torch.testing.assert_close(att.guided, guided)
    assert not torch.allclose(guided, plain)
    torch.testing.assert_close(att.guided_cam, att.guided * att.cam[:, None])


def test_empirical_receptive_field_of_a_residual_stage_stays_inside_its_analytic_bound():
    """resnet20's layer1 (stride 1): the 3x3 stem and six 3x3 convolutions reach 15x15 pixels, shortcuts
    reach less; the centre unit's input gradient is zero outside that square and not inside it."""
    torch.manual_seed(0)
    model = models.create("resnet20").eval()
    f = effective_receptive_field(model, torch.randn(2, 3, 32, 32), "layer1")
    support = (f.grad > 0).nonzero()
    assert support.min(0).values.tolist() == [9, 9] and support.max(0).values.tolist() == [23, 23]
    assert f.centre == (16, 16) and 1 <= f.side <= 15


def test_empirical_receptive_field_of_a_chain_fills_the_analytic_one(trained_lenet):
    x, _ = load_images([f"digits:{i}" for i in range(4)], trained_lenet)
    field = {f.name: f for f in receptive_fields(trace_chain(trained_lenet, x))}["features.4"]
    erf = effective_receptive_field(trained_lenet, x, "features.4")
    t, b, lft, r = field.box(5, 5, (32, 32))  # the centre unit of C3's 10x10 maps
    support = (erf.grad > 0).nonzero()
    assert support.min(0).values.tolist() == [t, lft] and support.max(0).values.tolist() == [b, r]
    assert erf.side < field.size[0]  # Luo et al.: the effective field is a fraction of the theoretical one


@pytest.mark.parametrize("name,side", [("resnet20", None), ("densenet40_k12", None), ("googlenet", 64)])
def test_cli_writes_gradcam_guided_backprop_and_effective_fields_for_residual_dense_and_inception(
        name, side, tmp_path, capsys):
    args = [name, "--images", "sklearn:flower.jpg", "--num-classes", "10", "--out", str(tmp_path),
            "--what", "gradcam", "guided", "erf"] + (["--input-size", str(side)] if side else [])
    assert main(args) == 0
    printed = capsys.readouterr().out
    for png in ("gradcam.png", "guided_backprop.png", "effective_receptive_fields.png"):
        assert f"wrote {tmp_path / png}" in printed and _non_constant_png(tmp_path / png), png


def test_cli_on_a_residual_network_writes_what_applies_and_says_what_it_skips(tmp_path, capsys):
    assert main(["resnet20", "--images", "sklearn:china.jpg", "--out", str(tmp_path), "--occlusion-stride", "4"]) == 0
    out = capsys.readouterr().out
    assert "no plain conv/ReLU/pool chain" in out and "no deconv, rf" in out
    assert {p.name for p in tmp_path.glob("*.png")} >= {"filters.png", "gradcam.png", "guided_backprop.png",
                                                        "effective_receptive_fields.png", "occlusion_0.png"}


def test_layers_carry_the_papers_names(trained_lenet, tmp_path, capsys):
    assert resolve_layer(trained_lenet, "C3") == "features.4" and resolve_layer(trained_lenet, "f6") == "fc.2"
    assert short_label(trained_lenet, "features.4") == "C3" and label(trained_lenet, "features.1") == \
        "C1 [features.1]"
    alex = models.create("alexnet", num_classes=10, hidden_features=64)
    assert [short_label(alex, f"features.relu{n}") for n in (1, 5)] == ["conv1", "conv5"]
    assert resolve_layer(alex, "conv5") == "features.conv5"  # a module name keeps its meaning
    assert short_label(models.create("resnet20"), "layer1.0.conv1") == "conv1"  # no paper names: the module's
    ckpt = tmp_path / "lenet.pt"
    torch.save(trained_lenet.state_dict(), ckpt)
    assert main(["lenet5", "--checkpoint", str(ckpt), "--list-layers"]) == 0
    listed = capsys.readouterr().out
    assert any(line.split()[:2] == ["features.4", "C3"] for line in listed.splitlines())
    assert main(["lenet5", "--checkpoint", str(ckpt), "--layers", "C3", "--what", "maps", "--out", str(tmp_path)]) == 0
    assert _non_constant_png(tmp_path / "maps_features.4.png")


def test_a_nan_checkpoint_is_an_error_not_blank_pictures(trained_lenet, tmp_path, capsys):
    state = {k: v.clone() for k, v in trained_lenet.state_dict().items()}
    state["features.3.weight"][0, 0, 0, 0] = float("nan")
    ckpt = tmp_path / "diverged.pt"
    torch.save(state, ckpt)
    assert main(["lenet5", "--checkpoint", str(ckpt), "--out", str(tmp_path / "pics")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NaN or Inf in 1 of" in err and "features.3.weight" in err
    assert not (tmp_path / "pics").exists()
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_model("lenet5", ckpt)


def test_images_are_fed_at_the_size_and_normalisation_the_run_evaluated_with(tmp_path):
    # A run trained at 40 px with its own mean/std: the pictures of its checkpoint use those, not the
    # network's paper defaults (32 px for LeNet-5).
    net = models.create("lenet5")
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"model": "lenet5"},
                "lightcnn": {"eval": {"in_chans": 1, "image_size": 40, "mean": [0.25], "std": [0.5]}}}, path)
    loaded = load_model(None, path)
    assert loaded.default_cfg["input_size"] == (1, 40, 40)
    assert loaded.default_cfg["mean"] == (0.25,) and loaded.default_cfg["std"] == (0.5,)
    x, _ = load_images(["digits:3"], loaded)
    assert x.shape[-2:] == (40, 40)
    assert models.create("lenet5").default_cfg["input_size"] == (1, 32, 32)  # the registry's stays the paper's
