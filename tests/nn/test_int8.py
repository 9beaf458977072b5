"""Int8Linear / Int8Conv: the oneDNN path against the plain-PyTorch quantize/dequantize form,
and both against the float layer by SQNR."""
import copy
import pickle

import pytest
import torch
from torch import nn

from cpuboost.nn.int8 import Int8Conv, Int8Linear, quantize_weight
from cpuboost.nn.postops import POST_OPS
from cpuboost.verify import sqnr_db

# oneDNN and the reference differ only in float rounding of the int32 -> float rescale
ATOL = 1e-5
MIN_SQNR = 30.0  # dB: 8-bit activations and weights on Gaussian data give ~38-45 dB


def _act(x: torch.Tensor) -> tuple[float, int]:
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / 255
    return scale, round(-lo / scale)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("post_op", sorted(Int8Linear.supported_post_ops))
@pytest.mark.parametrize("shape", [(6, 48), (2, 5, 48)])
def test_linear_matches_reference_and_float(dynamic, per_channel, post_op, shape):
    torch.manual_seed(0)
    lin = nn.Linear(48, 24)
    x = torch.randn(shape)
    q = Int8Linear(lin.weight, lin.bias, None if dynamic else _act(x), per_channel=per_channel,
                   post_op=POST_OPS[post_op])
    y = q(x)
    ref = q.reference_forward(x)
    assert y.shape == ref.shape == (*shape[:-1], 24)
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=1e-5)
    assert sqnr_db(POST_OPS[post_op].reference(lin(x)), y) > MIN_SQNR - 5 * (not per_channel)


@pytest.mark.parametrize("nd,groups,stride", [(1, 1, 1), (2, 1, 1), (2, 2, 2), (3, 1, 1)])
@pytest.mark.parametrize("post_op", ["none", "relu", "silu", "hardswish"])
def test_conv_matches_reference_and_float(nd, groups, stride, post_op):
    torch.manual_seed(0)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1](8, 12, 3, padding=1, stride=stride,
                                                     groups=groups)
    x = torch.randn((2, 8) + (7,) * nd)
    q = Int8Conv(conv.weight, conv.bias, _act(x), conv.stride, conv.padding, conv.dilation,
                 conv.groups, post_op=POST_OPS[post_op], input_shape=tuple(x.shape))
    if not q.accepts(POST_OPS[post_op]):
        assert nd == 3  # oneDNN's int8 conv3d takes no post-op; fuse_activations skips it
        return
    y = q(x)
    torch.testing.assert_close(y, q.reference_forward(x), atol=ATOL, rtol=1e-5)
    assert sqnr_db(POST_OPS[post_op].reference(conv(x)), y) > MIN_SQNR
    y_other = q(torch.randn((1, 8) + (9,) * nd))  # a shape it was not packed for
    assert y_other.shape[0] == 1


def test_weight_is_held_once_and_round_trips():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    q = Int8Linear(lin.weight, lin.bias, (0.02, 128))
    expected, scale = quantize_weight(lin.weight)
    assert q.packed and torch.equal(q.qweight, expected) and torch.equal(q.w_scale, scale)
    x = torch.randn(3, 32)
    y = q(x)
    for clone in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert clone.packed and torch.equal(clone(x), y)
    q.for_compile()
    assert not q.packed and torch.equal(q.qweight, expected)
    torch.testing.assert_close(q(x), y, atol=ATOL, rtol=1e-5)  # the reference form
    q.for_eager()
    assert q.packed and torch.equal(q(x), y)
    assert q.weight_bytes() == 32 * 16 + 16 * 4 + 16 * 4


def test_state_dict_holds_int8_weight_and_scales():
    lin = nn.Linear(8, 4)
    sd = Int8Linear(lin.weight, lin.bias, (0.1, 3)).state_dict()
    assert sd["weight"].dtype == torch.int8 and sd["weight"].shape == (4, 8)
    assert set(sd) == {"weight", "weight_scale", "bias", "input_scale", "input_zero_point"}


def test_cast_and_train_raise_clearly():
    lin = nn.Linear(8, 4)
    q = Int8Linear(lin.weight, lin.bias, (0.1, 3))
    with pytest.raises(RuntimeError, match="cannot be moved or cast"):
        q.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="int8 inference module"):
        q.train()


def test_bf16_input_gives_bf16_output():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x = torch.randn(4, 32)
    q = Int8Linear(lin.weight, lin.bias, _act(x))
    y = q(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert sqnr_db(lin(x), y.float()) > MIN_SQNR - 5


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_uint8_hand_off_matches_quantizing_in_the_next_layer(kind):
    torch.manual_seed(0)
    if kind == "linear":
        f1, f2 = nn.Linear(32, 48), nn.Linear(48, 16)
        x = torch.randn(8, 32)
        make = lambda f, act, op: Int8Linear(f.weight, f.bias, act, post_op=POST_OPS[op])
    else:
        f1, f2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        x = torch.randn(2, 4, 9, 9)
        make = lambda f, act, op: Int8Conv(f.weight, f.bias, act, f.stride, f.padding,
                                           f.dilation, f.groups, post_op=POST_OPS[op])
    a = make(f1, _act(x), "relu")
    b = make(f2, _act(torch.relu(f1(x))), "none")
    through_float = b(a(x))
    a.out_q = (b.x_scale, b.x_zp)
    handed = a(x)
    assert handed.dtype == torch.uint8
    y = b(handed)
    assert sqnr_db(through_float, y) > 40  # only rounding inside oneDNN differs
    torch.testing.assert_close(y, b.reference_forward(a.reference_forward(x)), atol=1e-4,
                               rtol=1e-4)
    assert sqnr_db(f2(torch.relu(f1(x))), y) > MIN_SQNR - 5


def test_transposed_weight_view_is_quantized_by_value_not_by_memory_layout():
    """transformers' Conv1D stores (in, out); its weight reaches Int8Linear as a transposed
    view. Packing the strided int8 tensor as if it were contiguous scrambled the weight."""
    torch.manual_seed(0)
    stored = torch.randn(48, 24)  # (in, out)
    bias = torch.randn(24)
    x = torch.randn(5, 48)
    act = _act(x)
    from_view = Int8Linear(stored.t(), bias, act)
    from_copy = Int8Linear(stored.t().contiguous(), bias, act)
    assert torch.equal(from_view(x), from_copy(x))
    assert sqnr_db(x @ stored + bias, from_view(x)) > MIN_SQNR
