"""The test tooling's meta-device shortcut (`tests.helpers.MetaShapes`) gives what torch's own meta kernels give:
the same shapes, dtypes, strides and devices, in place where torch is in place."""
import torch

from tests.helpers import MetaShapes


def test_meta_shapes_gives_torchs_meta_shapes_dtypes_and_strides():
    aten = torch.ops.aten
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.empty(2, 8, 5, 7, device="meta", dtype=dtype).to(memory_format=fmt)
            w, b, mean, var = (torch.empty(8, device="meta", dtype=dtype) for _ in range(4))
            calls = [(aten.native_batch_norm.default, (x, w, b, mean, var, True, 0.1, 1e-5)),
                     (aten.native_batch_norm.default, (x, w, b, mean, var, False, 0.1, 1e-5)),
                     (aten.native_batch_norm.default, (x, None, None, None, None, True, 0.1, 1e-5)),
                     (aten._native_batch_norm_legit.default, (x, w, b, mean, var, True, 0.1, 1e-5)),
                     (aten._native_batch_norm_legit.no_stats, (x, w, b, True, 0.1, 1e-5)),
                     (aten._native_batch_norm_legit_no_training.default, (x, w, b, mean, var, 0.1, 1e-5)),
                     (aten.relu.default, (x,)), (aten.relu.default, (x[:, ::2, 1:],)),
                     (aten.relu_.default, (x,)), (aten.normal_.default, (x, 0.0, 2.0)),
                     (aten.uniform_.default, (x, -1.0, 1.0))]
            for op, args in calls:
                with MetaShapes():
                    fast = op(*args)
                stock = op(*args)
                fast, stock = ([t] if isinstance(t, torch.Tensor) else list(t) for t in (fast, stock))
                assert [(t.shape, t.dtype, t.stride(), t.device) for t in fast] == \
                       [(t.shape, t.dtype, t.stride(), t.device) for t in stock], (op, dtype, fmt)
                if op in (aten.relu_.default, aten.normal_.default, aten.uniform_.default):  # in place: the input
                    assert fast[0] is args[0] and stock[0] is args[0]
    y = torch.randn(2, 3)  # real tensors: the op itself
    with MetaShapes():
        assert torch.equal(torch.relu(y), y.clamp(min=0))
