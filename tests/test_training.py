"""ClassifierModule: auxiliary-head losses, label smoothing, top-1/top-5, warm-up, LR scheduler wiring,
channels-last and torch.compile of the inner network."""
from collections import namedtuple

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightcnn.data import SyntheticDataModule
from lightcnn.models import registry
from lightcnn.training import ClassifierModule

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")

AuxOutputs = namedtuple("AuxOutputs", ["logits", "aux_logits2", "aux_logits1"])


class _AuxNet(nn.Module):
    """GoogLeNet-shaped outputs: a named tuple (logits, aux2, aux1) while training, logits in eval."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        self.heads = nn.ModuleList(nn.Linear(in_chans * 16, num_classes) for _ in range(3))

    def forward(self, x):
        x = x.flatten(1)
        main, aux2, aux1 = (h(x) for h in self.heads)
        return AuxOutputs(main, aux2, aux1) if self.training else main


class _Identity(nn.Module):
    """Its input is its logits: lets a test choose the logits exactly."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


@pytest.fixture(autouse=True)
def _test_models(monkeypatch):
    """Register the two test networks for the test's duration only: the model zoo's own tests iterate
    over `list_models()` and must not meet them."""
    monkeypatch.setitem(registry._MODELS, "_test_aux_net", lambda **kw: _AuxNet(**kw))
    monkeypatch.setitem(registry._MODELS, "_test_identity", lambda **kw: _Identity(**kw))


def _sgd(lr=0.1, **kw):
    return lambda params: torch.optim.SGD(params, lr=lr, **kw)


def test_aux_losses_are_added_with_their_weights():
    m = ClassifierModule("_test_aux_net", _sgd(), num_classes=5, in_chans=1, aux_loss_weights=[0.3, 0.2])
    x, y = torch.randn(6, 1, 4, 4), torch.randint(5, (6,))
    loss = m.training_step((x, y), 0)
    main, aux2, aux1 = m.net(x)
    expected = F.cross_entropy(main, y) + 0.3 * F.cross_entropy(aux2, y) + 0.2 * F.cross_entropy(aux1, y)
    torch.testing.assert_close(loss, expected)
    m.eval()
    with torch.no_grad():  # eval: the network returns plain logits, the loss is the main one only
        torch.testing.assert_close(m._step((x, y), m.val_metrics, "val"), F.cross_entropy(m.net(x), y))


def test_one_aux_weight_applies_to_every_head_and_a_wrong_count_is_an_error():
    m = ClassifierModule("_test_aux_net", _sgd(), num_classes=5, in_chans=1)  # default 0.3: GoogLeNet's
    x, y = torch.randn(6, 1, 4, 4), torch.randint(5, (6,))
    main, aux2, aux1 = m.net(x)
    expected = F.cross_entropy(main, y) + 0.3 * (F.cross_entropy(aux2, y) + F.cross_entropy(aux1, y))
    torch.testing.assert_close(m.training_step((x, y), 0), expected)
    bad = ClassifierModule("_test_aux_net", _sgd(), num_classes=5, in_chans=1, aux_loss_weights=[0.3])
    with pytest.raises(ValueError, match="2 auxiliary outputs but aux_loss_weights has 1"):
        bad.training_step((x, y), 0)


def test_label_smoothing_is_the_cross_entropy_one():
    m = ClassifierModule("_test_identity", _sgd(), num_classes=10, label_smoothing=0.1)
    logits, y = torch.randn(8, 10), torch.randint(10, (8,))
    torch.testing.assert_close(m.training_step((logits, y), 0), F.cross_entropy(logits, y, label_smoothing=0.1))
    with pytest.raises(ValueError, match="label_smoothing"):
        ClassifierModule("_test_identity", _sgd(), num_classes=10, label_smoothing=1.0)


def test_top1_and_top5_accuracy():
    m = ClassifierModule("_test_identity", _sgd(), num_classes=10)
    logits = torch.arange(10.0).repeat(4, 1)  # class 9 ranks first, 8 second, ..., 0 last
    y = torch.tensor([9, 5, 3, 0])  # ranks 1, 5, 7, 10
    m.test_step((logits, y), 0)
    got = m.test_metrics.compute()
    assert got["test/acc1"].item() == pytest.approx(1 / 4) and got["test/acc5"].item() == pytest.approx(2 / 4)


def test_no_top5_below_six_classes():
    assert set(ClassifierModule("_test_identity", _sgd(), num_classes=5).val_metrics) == {"val/acc1"}


class _RecordSteps(L.Callback):
    """Per step: the logged LR, and whether the update was exactly -lr x grad (plain SGD)."""

    def __init__(self):
        self.lrs, self.updates_match = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before = {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        lr = trainer.callback_metrics["lr"].item()
        self.lrs.append(lr)
        self.updates_match.append(all(
            torch.allclose(p.detach(), self.before[n][0] - lr * self.before[n][1], rtol=1e-5, atol=1e-7)
            for n, p in pl_module.named_parameters()))


def _fit(module, steps, callbacks=(), **trainer_kw):
    dm = SyntheticDataModule(num_classes=10, in_chans=1, image_size=32, num_samples=16, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=list(callbacks), **trainer_kw)
    trainer.fit(module, datamodule=dm)
    return trainer


def test_warmup_scales_the_lr_of_the_first_steps_only():
    rec = _RecordSteps()
    m = ClassifierModule("lenet5", _sgd(0.1), num_classes=10, in_chans=1, warmup_steps=2, warmup_factor=0.1)
    trainer = _fit(m, 4, [rec])
    assert rec.lrs == pytest.approx([0.01, 0.01, 0.1, 0.1])
    assert rec.updates_match == [True] * 4  # the optimiser really used those LRs
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1)  # the scheduler's LR untouched


def test_step_interval_scheduler_steps_every_iteration():
    rec = _RecordSteps()
    sched = lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 3], gamma=0.1)  # noqa: E731
    m = ClassifierModule("lenet5", _sgd(0.1), lr_scheduler=sched, lr_interval="step", num_classes=10, in_chans=1)
    _fit(m, 4, [rec])
    assert rec.lrs == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_plateau_scheduler_watches_the_monitored_metric():
    sched = lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max")  # noqa: E731
    m = ClassifierModule("lenet5", _sgd(), lr_scheduler=sched, num_classes=10, in_chans=1, lr_monitor="val/acc5")
    cfg = m.configure_optimizers()
    assert cfg["lr_scheduler"]["monitor"] == "val/acc5" and cfg["lr_scheduler"]["interval"] == "epoch"


def test_channels_last_gives_the_same_logits():
    ref = ClassifierModule("lenet5", _sgd(), num_classes=10, in_chans=1)
    cl = ClassifierModule("lenet5", _sgd(), num_classes=10, in_chans=1, channels_last=True)
    cl.load_state_dict(ref.state_dict())
    cl.setup("fit")
    assert cl.net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(cl(x), ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compile_keeps_the_state_dict_keys_and_the_logits():
    ref = ClassifierModule("lenet5", _sgd(), num_classes=10, in_chans=1)
    comp = ClassifierModule("lenet5", _sgd(), num_classes=10, in_chans=1, compile=True)
    comp.load_state_dict(ref.state_dict())
    comp.setup("fit")
    assert comp.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(comp(x), ref(x), rtol=1e-5, atol=1e-6)


def test_num_classes_defaults_to_the_network_s():
    m = ClassifierModule("lenet5", _sgd())
    assert m.num_classes == m.net.num_classes == 10


# --- callbacks -----------------------------------------------------------------------------------------------

def _filter_rms(module):
    return torch.cat([m.weight.detach().pow(2).mean(dim=(1, 2, 3)).sqrt()
                      for m in module.modules() if isinstance(m, nn.Conv2d)])


class _RecordRMS(L.Callback):
    """The largest conv filter RMS seen by each training batch (i.e. after the previous optimiser step)."""

    def __init__(self):
        self.before_batch = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before_batch.append(_filter_rms(pl_module).max().item())

    def on_fit_end(self, trainer, pl_module):
        self.before_batch.append(_filter_rms(pl_module).max().item())


def test_renormalize_filters_bounds_every_filter_after_every_optimizer_step():
    from lightcnn.training import RenormalizeFilters

    radius, lr = 0.05, 2.0  # a large LR pushes filters past the radius on every step
    free, rec = _RecordRMS(), _RecordRMS()
    torch.manual_seed(0)
    _fit(ClassifierModule("lenet5", _sgd(lr), num_classes=10, in_chans=1), 4, [free])
    assert max(free.before_batch[1:]) > radius  # without the callback the filters do grow past it
    renorm = RenormalizeFilters(radius=radius)
    torch.manual_seed(0)
    _fit(ClassifierModule("lenet5", _sgd(lr), num_classes=10, in_chans=1), 4, [renorm, rec])
    assert all(r <= radius * (1 + 1e-5) for r in rec.before_batch[1:])  # after each of the 4 steps
    assert renorm.rescaled > 0 and not renorm._handles  # it acted, and left no hook on the optimiser


def test_renormalize_filters_runs_once_per_real_step_with_gradient_accumulation(monkeypatch):
    from lightcnn.training import callbacks

    calls = []
    monkeypatch.setattr(callbacks, "renormalize_filters_", lambda model, radius: calls.append(radius) or 0)
    _fit(ClassifierModule("lenet5", _sgd(), num_classes=10, in_chans=1), 3,
         [callbacks.RenormalizeFilters(0.1)], accumulate_grad_batches=2)
    assert calls == [0.1] * 3  # 3 optimiser steps over 6 batches
    with pytest.raises(ValueError, match="radius"):
        callbacks.RenormalizeFilters(0.0)
