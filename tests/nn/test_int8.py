"""Int8Linear / Int8Conv: the oneDNN path against the plain-PyTorch quantize/dequantize form,
and both against the float layer by SQNR."""
import copy
import pickle

import pytest
import torch
from torch import nn

import cpuboost
import cpuboost.nn.int8 as int8_module
from cpuboost.nn.int8 import (Int8Conv, Int8Linear, QuantizedWeight, pair_extent,
                              quantize_weight)
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


def _extreme_inputs(k: int, shape_rest=()) -> torch.Tensor:
    """Inputs at both ends of a 0..255 grid (scale 1, zero point 0): 255 where the weight
    pairs are large, so any int16 pair sum that could saturate does."""
    return torch.full((4, k, *shape_rest), 255.0)


@pytest.mark.parametrize("pairwise", [True, False])
def test_pairwise_weights_keep_neighbour_sums_within_int16(pairwise):
    """Pair-bounded (the default on x86 without VNNI): every two neighbouring input-channel
    weights sum to at most 128 in either sign, so 255 * sum fits vpmaddubsw's int16."""
    torch.manual_seed(0)
    w = torch.randn(16, 33, 3)
    w[:, 4:6] = 3.0  # neighbours both at the row's largest magnitude
    w[:, 10:12] = -3.0
    q, scale = quantize_weight(w, pairwise=pairwise)
    extent = pair_extent(q.float())
    assert (extent <= 128).all() if pairwise else (extent > 128).all()
    assert sqnr_db(w, q.float() * scale.view(-1, 1, 1)) > 30  # still a fine weight


def test_linear_with_large_neighbouring_weights_is_exact_at_extreme_inputs():
    """The adversarial case for non-VNNI CPUs: neighbouring weights 127, 127 fed 255s were off
    by thousands before weights were pair-bounded. Here the kernel equals its reference."""
    w = torch.zeros(8, 64)
    w[:, 0::4] = w[:, 1::4] = 1.0
    w[:, 2::4] = w[:, 3::4] = -1.0
    x = _extreme_inputs(64)
    q = Int8Linear(w, None, (1.0, 0))
    torch.testing.assert_close(q(x), q.reference_forward(x), atol=1e-3, rtol=1e-5)
    assert sqnr_db(x @ w.t(), q(x)) > 30


def test_a_given_int8_weight_that_would_saturate_is_quantized_again(monkeypatch):
    """A saved int8 weight from a VNNI CPU (neighbours 127, 127) loaded where pairs saturate:
    it is requantized pair-bounded from its float values, and the kernel is exact."""
    monkeypatch.setattr(int8_module, "pairs_saturate", lambda: True)
    qw = torch.tensor([127, 127, 0, -128] * 16, dtype=torch.int8).repeat(8, 1)
    given = QuantizedWeight(qw, torch.full((8,), 0.01))
    layer = Int8Linear(given, None, (1.0, 0))
    assert layer.requantized and "quantized again" in repr(layer)
    assert (pair_extent(layer.qweight.float()) <= 128).all()
    x = _extreme_inputs(64)
    torch.testing.assert_close(layer(x), layer.reference_forward(x), atol=1e-3, rtol=1e-5)
    assert sqnr_db(x @ (qw.float() * 0.01).t(), layer(x)) > 30
    safe = Int8Linear(QuantizedWeight(torch.full((8, 64), 60, dtype=torch.int8),
                                      torch.full((8,), 0.01)), None, (1.0, 0))
    assert not safe.requantized


@pytest.mark.parametrize("in_channels", [8, 16, 24])
@pytest.mark.parametrize("stride", [2, 3])
def test_strided_1x1_conv_is_exact_and_repeatable(in_channels, stride):
    """oneDNN's AVX2 int8 1x1 conv at stride 2 on channels-last input with 8 or 24 in-channels
    returned wrong, run-to-run different values (off by ~1); cpuboost subsamples first there."""
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, 16, 1, stride)
    x = torch.randn(2, in_channels, 14, 14).relu()
    q = Int8Conv(conv.weight, conv.bias, _act(x), (stride, stride), (0, 0), (1, 1), 1,
                 input_shape=tuple(x.shape))
    ref = q.reference_forward(x)
    cl = x.contiguous(memory_format=torch.channels_last)
    outs = [q(cl) for _ in range(4)] + [q(x)]
    for y in outs:
        assert y.shape == conv(x).shape
        torch.testing.assert_close(y, ref, atol=ATOL, rtol=1e-5)
    assert sqnr_db(conv(x), outs[0]) > MIN_SQNR


def test_loading_a_state_dict_into_int8_layers_says_how_to_load_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    q = cpuboost.quantize(model, config=cpuboost.DynamicInt8Config(),
                          example_inputs=torch.randn(4, 16))
    with pytest.raises(RuntimeError, match=r"0: Int8Linear holds int8 weights.*"
                                           r"cpuboost.load_quantized"):
        q.load_state_dict(q.state_dict())
