"""llm.optimize's numerics check (cpuboost/llm/check.py): the optimized model's logits against
the original's on a probe, the fallback when cpuboost's attention is what is wrong, and the
error when nothing fixes it."""
import re

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.errors import NumericsError
from cpuboost.llm import attention
from cpuboost.nn.woq import WoqLinear
from tests.llm.conftest import prompts, tiny_model
from tests.llm.test_optimize import generate


def _sqnr(report) -> float:
    return float(re.search(r"SQNR (\S+) dB", report.accuracy).group(1))


@pytest.mark.parametrize("quantization,floor", [(None, 80.0), ("woq_int8", 25.0)],
                         ids=["fp32", "woq_int8"])
def test_result_is_checked_against_the_original(arch, quantization, floor):
    """Every architecture family: the check passes, its figures are in the report (well above
    the floor it enforces), and it compared the decode step as well as the prompt."""
    model = tiny_model(arch)
    fast = cpuboost.llm.optimize(model, dtype=torch.float32, quantization=quantization)
    report = cpuboost.report_of(fast)
    assert _sqnr(report) > floor
    assert "34 positions" in report.accuracy  # 2 x 16 prompt positions, minus none, + 2 steps
    assert report.pass_named("check").applied == [report.accuracy]
    assert f"accuracy: logits vs the original model" in str(report)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # grouped query heads / one per key head
def test_wrong_decode_attention_is_undone(monkeypatch, arch):
    """A decode path that computes something else (simulated: cpuboost's decode attention
    returning a constant as large as the probe's hidden states; with random weights attention
    adds little to them, so zeros would hardly show) is caught by the probe's decode step;
    the attention rewrites are undone, reported as dropped, and generate() then matches
    stock."""
    model = tiny_model(arch)
    monkeypatch.setattr(attention, "decode_attention",
                        lambda q, k, v, mask, scaling: torch.full_like(q, 3.0).transpose(1, 2))
    fast = cpuboost.llm.optimize(model, dtype=torch.float32)
    report = cpuboost.report_of(fast)
    assert fast.config._attn_implementation == model.config._attn_implementation
    assert "the check failed with it" in report.pass_named("decode_attention").dropped
    assert any("undone" in n for n in report.pass_named("check").notes)
    assert _sqnr(report) > 80
    ids, mask = prompts()
    assert torch.equal(generate(fast, ids, mask, do_sample=False),
                       generate(model, ids, mask, do_sample=False))


def test_a_loss_the_plain_computation_shares_is_the_precision_s_and_is_reported(monkeypatch):
    """Below the floor against the original, but the same int8 model computed plainly
    (dequantized weights, the original attention) agrees: cpuboost computes what was asked
    (deep random-weight models amplify weight noise), so the result is kept, with a warning
    that names the precision. Simulated with an unreachable floor."""
    from cpuboost.llm import check
    monkeypatch.setattr(check, "floor_db", lambda cfg, dtype=None: 500.0)
    fast = cpuboost.llm.optimize(tiny_model("qwen2"), dtype=torch.float32,
                                 quantization="woq_int8")
    report = cpuboost.report_of(fast)
    assert "computed plainly" in report.accuracy and "agrees: SQNR" in report.accuracy
    assert any(w.startswith("woq_int8 changes this model's logits") for w in report.warnings)
    assert not report.pass_named("decode_attention").dropped  # nothing was cpuboost's fault


@pytest.mark.parametrize("inplace", [False, True])
def test_wrong_layers_raise_and_say_what_happened_to_the_model(monkeypatch, inplace):
    """Quantized layers that compute something else (simulated: sign flipped) cannot be undone:
    NumericsError with the figures; without inplace the user's model is untouched."""
    model = tiny_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward = WoqLinear.forward
    monkeypatch.setattr(WoqLinear, "forward", lambda self, x: -forward(self, x))
    with pytest.raises(NumericsError, match=r"SQNR -?\d.*dB \(at least 15 dB required\).*"
                       r"computed plainly.*does not agree either.*" +
                       ("reload it" if inplace else "your model is unchanged")):
        cpuboost.llm.optimize(model, dtype=torch.float32, quantization="woq_int8",
                              inplace=inplace)
    if not inplace:
        assert not any(isinstance(m, WoqLinear) for m in model.modules())
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_model_that_fails_on_the_probe_after_rewriting_raises(monkeypatch):
    model = tiny_model("llama")

    def broken(self, x):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(WoqLinear, "forward", broken)
    with pytest.raises(NumericsError, match="failed on the probe the original ran "
                                            r"\(RuntimeError: kernel exploded\)"):
        cpuboost.llm.optimize(model, dtype=torch.float32, quantization="woq_int8")


def test_a_model_held_in_bf16_is_checked_at_the_low_precision_floor():
    """Its own logits (the reference) carry bf16 rounding: optimize(dtype=float32) is checked
    at 15 dB, not the 40 dB of a float32 model (which it could miss without being wrong)."""
    model = tiny_model("llama").to(torch.bfloat16)
    report = cpuboost.report_of(cpuboost.llm.optimize(model, dtype=torch.float32))
    assert "(at least 15 dB required)" in report.accuracy and _sqnr(report) > 25
    fp32 = cpuboost.report_of(cpuboost.llm.optimize(tiny_model("llama"), dtype=torch.float32))
    assert "(at least 40 dB required)" in fp32.accuracy


class _NoEmbeddingLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 32)

    def forward(self, x):
        return self.proj(x)


def test_unchecked_results_say_why():
    fast = cpuboost.llm.optimize(tiny_model("opt"), dtype=torch.float32, check=False)
    assert cpuboost.report_of(fast).accuracy == "not checked (check=False)"
    plain = cpuboost.report_of(cpuboost.llm.optimize(_NoEmbeddingLM().eval(),
                                                     dtype=torch.float32))
    assert "no token embedding" in plain.accuracy
    assert "numerics: not checked (no sample_input)" not in str(plain)


def test_a_failing_plain_computation_is_named_as_such(monkeypatch):
    """Below the floor, the plain computation decides; where it cannot run, the error says it
    was that computation, not the optimized model, that failed."""
    from cpuboost.llm import check

    def broken(self, x):
        raise RuntimeError("no reference here")
    monkeypatch.setattr(check, "floor_db", lambda cfg, dtype=None: 500.0)
    monkeypatch.setattr(WoqLinear, "reference_forward", broken)
    with pytest.raises(NumericsError, match=r"does not agree either: the plain computation "
                                            r"failed \(RuntimeError: no reference here\)"):
        cpuboost.llm.optimize(tiny_model("llama"), dtype=torch.float32, quantization="woq_int8")
