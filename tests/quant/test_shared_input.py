"""Static int8 layers reading the same float input with the same qparams (Q, K, V) quantize it
once per call: the same outputs as each quantizing it, fewer quantize passes, and never a stale
uint8 tensor when the input changed in place or under inference mode."""
import copy
import json

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost import PackageError
from cpuboost.nn.int8 import _Int8
from cpuboost.nn.int8_shared import share_input


class _ThreeHeads(nn.Module):
    """Three linears on one input (an attention's projections), then one more."""

    def __init__(self, bump: bool = False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8)
        self.out = nn.Linear(8, 4)
        self.bump = bump

    def forward(self, x):
        a = self.q(x)
        if self.bump:  # changes the input between two readers, keeping its range (and qparams)
            x.copy_(x.flip(0))
        b, c = self.k(x), self.v(x)
        return self.out(a * b + c)


def _quantized(bump=False):
    torch.manual_seed(0)
    model = _ThreeHeads(bump).eval()
    data = [(torch.randn(6, 16),) for _ in range(4)]
    return model, cpuboost.quantize(model, [(d[0].clone(),) for d in data])


def _unshared(q):
    plain = copy.deepcopy(q)
    for m in plain.modules():
        if isinstance(m, _Int8):
            m.shared_input = None
    return plain


def _count_quantizes(q, monkeypatch):
    calls = []
    original = _Int8._quantize

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(_Int8, "_quantize", counting)
    return calls


def test_siblings_quantize_their_input_once_with_the_same_result(monkeypatch):
    _, q = _quantized()
    assert cpuboost.report_of(q).applied("int8_shared_inputs") == [
        "q, k, v quantize their common input once"]
    assert q.q.shared_input is q.k.shared_input is q.v.shared_input is not None
    assert q.out.shared_input is None
    x = torch.randn(5, 16)
    with torch.no_grad():
        ref = _unshared(q)(x)
        calls = _count_quantizes(q, monkeypatch)
        out = q(x)
    assert torch.equal(out, ref)
    # q quantizes for k and v too (3 calls without sharing); out, where oneDNN runs it, too
    assert [c for c in calls if c is not q.out] == [q.q]
    assert q.q.shared_input._last is None  # let go once k and v read it


def test_an_input_changed_in_place_or_under_inference_mode_is_quantized_again(monkeypatch):
    _, q = _quantized(bump=True)
    # the recording sees the change (a new version of x): q is not grouped with k and v
    assert q.k.shared_input is q.v.shared_input is not None and q.q.shared_input is None
    share_input([q.q, q.k, q.v], 0)  # grouped anyway (same qparams): the run-time check holds
    x = torch.randn(5, 16)
    with torch.no_grad():
        ref = _unshared(q)(x.clone())
        calls = _count_quantizes(q, monkeypatch)
        assert torch.equal(q(x.clone()), ref)  # k sees the rows flipped, not q's uint8 of x
        # q, then k again (the version moved), v shares k's (out: as in the test above)
        assert [c for c in calls if c is not q.out] == [q.q, q.k]
    calls.clear()
    with torch.inference_mode():
        assert torch.equal(q(x.clone()), ref)
    # inference tensors have no version counter: no sharing
    assert [c for c in calls if c is not q.out] == [q.q, q.k, q.v]


def test_sharing_survives_save_load_and_a_tampered_group_is_refused(tmp_path):
    _, q = _quantized()
    cpuboost.save_quantized(q, tmp_path / "m")
    loaded = cpuboost.load_quantized(lambda: _ThreeHeads().eval(), tmp_path / "m")
    assert loaded.q.shared_input is loaded.k.shared_input is loaded.v.shared_input is not None
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    manifest = tmp_path / "m" / "quantization.json"
    spec = json.loads(manifest.read_text())
    spec["int8"]["out"]["input_group"] = spec["int8"]["q"]["input_group"]  # other qparams
    manifest.write_text(json.dumps(spec))
    with pytest.raises(PackageError, match="input group 0 do not quantize their input the same"):
        cpuboost.load_quantized(lambda: _ThreeHeads().eval(), tmp_path / "m")


def test_pickled_and_copied_models_share_among_their_own_layers():
    import io
    _, q = _quantized()
    x = torch.randn(4, 16)
    with torch.no_grad():
        q(x)  # leaves a last input in the shared state
        buf = io.BytesIO()
        torch.save(q, buf)
        buf.seek(0)
        for other in (copy.deepcopy(q), torch.load(buf, weights_only=False)):
            assert other.q.shared_input is other.k.shared_input is not q.q.shared_input
            assert other.q.shared_input._last is None
            assert torch.equal(other(x), q(x))
