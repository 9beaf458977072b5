"""Each fused module against its plain-PyTorch reference path and the module it replaces."""
import copy
import io

import pytest
import torch
from torch import nn

from cpuboost.nn import POST_OPS, FusedConv, FusedConvTranspose, FusedLinear, set_backend
from cpuboost.errors import UnsupportedRequestError
from tests.conftest import onednn_packs, rel_err, skip_unless_onednn_packs

RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _build(kind, backend, dtype):
    if backend == "onednn":
        skip_unless_onednn_packs(dtype)
    torch.manual_seed(0)
    if kind == "linear":
        src, x = nn.Linear(24, 40), torch.randn(3, 5, 24)
        return src, FusedLinear(src, dtype, backend, batch_hint=15), x
    if kind == "conv1d":
        src, x = nn.Conv1d(6, 8, 3, stride=2, padding=1), torch.randn(2, 6, 17)
        return src, FusedConv(src, (1,), dtype, backend, input_shape=x.shape), x
    if kind == "conv2d_grouped":
        src, x = nn.Conv2d(8, 12, 3, padding=2, dilation=2, groups=4), torch.randn(2, 8, 9, 9)
        return src, FusedConv(src, (2, 2), dtype, backend, input_shape=x.shape), x
    if kind == "conv3d":
        src, x = nn.Conv3d(3, 5, 3, padding=1, bias=False), torch.randn(1, 3, 5, 6, 6)
        return src, FusedConv(src, (1, 1, 1), dtype, backend, input_shape=x.shape), x
    src, x = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1), torch.randn(2, 6, 5, 5)
    return src, FusedConvTranspose(src, dtype, backend, input_shape=x.shape), x


KINDS = ["linear", "conv1d", "conv2d_grouped", "conv3d", "conv_transpose2d"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["onednn", "aten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("post_op", list(POST_OPS))
def test_matches_reference_and_original(kind, backend, dtype, post_op):
    src, fused, x = _build(kind, backend, dtype)
    fused.post_op = POST_OPS[post_op]
    with torch.no_grad():
        out = fused(x)
        expected = POST_OPS[post_op].reference(src(x))
        reference = fused.reference_forward(x)
    assert out.dtype == dtype and out.shape == expected.shape
    assert rel_err(reference.float(), out.float()) <= RTOL[dtype]
    assert rel_err(expected, out.float()) <= RTOL[dtype] * 2


@pytest.mark.parametrize("kind", ["conv1d", "conv2d_grouped", "conv3d"])
@pytest.mark.parametrize("backend", ["onednn", "aten"])
def test_convs_take_one_unbatched_input_as_torch_does(kind, backend):
    """nn.Conv*d takes an input without its batch dim; the packed conv did not (oneDNN's
    channels-last needed rank 4) and raised where the original ran."""
    src, fused, x = _build(kind, backend, torch.float32)
    with torch.no_grad():
        assert rel_err(src(x[0]), fused(x[0])) <= RTOL[torch.float32]


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_has_original_keys_shapes_dtypes(kind):
    # bf16 storage of an fp32 model; packed where this CPU's oneDNN can pack bf16
    src, fused, _ = _build(kind, "onednn" if onednn_packs(torch.bfloat16) else "aten",
                           torch.bfloat16)
    sd, fsd = src.state_dict(), fused.state_dict()
    assert list(sd) == list(fsd)
    for k in sd:
        assert fsd[k].shape == sd[k].shape and fsd[k].dtype == sd[k].dtype
        assert torch.allclose(fsd[k], sd[k], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_load_state_dict_repacks(kind):
    src, fused, x = _build(kind, "onednn", torch.float32)
    other = copy.deepcopy(src)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-0.5)
    fused.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert rel_err(other(x), fused(x)) <= 1e-5
    with pytest.raises(RuntimeError, match="size mismatch"):
        fused.load_state_dict({k: v[:1] for k, v in other.state_dict().items()})


@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_pickle_and_backend_switch(kind):
    src, fused, x = _build(kind, "onednn", torch.float32)
    with torch.no_grad():
        ref = fused(x)
        assert torch.equal(copy.deepcopy(fused)(x), ref)
        buf = io.BytesIO()
        torch.save(fused, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), ref)
        set_backend(fused, "aten")
        assert rel_err(ref, fused(x)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_weight_is_the_only_copy(dtype):
    src, fused, _ = _build("linear", "onednn", dtype)
    assert fused._w.is_mkldnn and not list(fused.parameters())
    assert fused.weight_bytes() == (40 * 24 + 40) * dtype.itemsize  # no fp32 copy kept


def test_onednn_refuses_a_dtype_it_cannot_pack_here(monkeypatch):
    """On an AVX2-only CPU torch's bf16 reorder raises a bare RuntimeError; the module says
    what is missing and what to do instead, and the aten backend still works."""
    import cpuboost.hw.features as features
    monkeypatch.setattr(features, "onednn_runs", lambda dtype, hw: dtype != torch.bfloat16)
    src, x = nn.Linear(24, 40), torch.randn(3, 24)
    with pytest.raises(UnsupportedRequestError, match="cannot pack torch.bfloat16.*backend='aten'"):
        FusedLinear(src, torch.bfloat16, "onednn")
    fused = FusedLinear(src, torch.bfloat16, "aten")
    with pytest.raises(UnsupportedRequestError, match="cannot pack"):
        set_backend(fused, "onednn")
    assert rel_err(src(x), fused(x).float()) <= RTOL[torch.bfloat16]


def test_weight_property_reads_original():
    src, fused, _ = _build("conv2d_grouped", "onednn", torch.float32)
    assert torch.equal(fused.weight, src.weight.detach()) and torch.equal(fused.bias, src.bias)
