"""A user's own ``torch.compile`` (stock Inductor, not ``graph_mode=True``) of what quantize and
optimize return. Int8 layers on oneDNN's packed weights failed there with "Cannot access data
pointer of Tensor that doesn't have storage": torch.compile's fake tensors report
``is_mkldnn`` False, so the layer took its reference path and handed the opaque weight to
Inductor's generated code."""
import pytest
import torch

import cpuboost
from cpuboost.nn import int8_gemm
from cpuboost.testing.toy_models import TOY_MODELS, build_eval
from tests.conftest import rel_err


@pytest.mark.parametrize("onednn_linears", [False, True])
@pytest.mark.parametrize("name", ["conv_bn", "mlp_bn"])
def test_torch_compile_of_an_int8_model(name, onednn_linears, monkeypatch):
    if onednn_linears:  # as on CPUs where cpuboost's int8 GEMM does not run (AVX-512, VNNI)
        monkeypatch.setattr(int8_gemm.U8S8Gemm, "_fits_u8s8", lambda self, qw: False)
    case = TOY_MODELS[name]
    model, x = build_eval(case), case.inputs(2)
    torch._dynamo.reset()
    with torch.no_grad():
        q = cpuboost.quantize(model, [case.inputs(2) for _ in range(3)])
        assert any(getattr(m, "_opaque", False) for m in q.modules()) == (
            onednn_linears or name == "conv_bn")  # the case this is about is present
        expected = q(*x)
        compiled = torch.compile(q)
        assert rel_err(expected, compiled(*x)) < 1e-5
        other = case.inputs(2)
        assert rel_err(q(*other), compiled(*other)) < 1e-5
    torch._dynamo.reset()
