import torch
from torch import nn

import cpuboost
from cpuboost.nn import FusedConv, FusedLinear
from cpuboost.testing import TOY_MODELS, build_eval
from tests.conftest import FP32_RTOL, rel_err


def _skips(opt):
    return dict(cpuboost.report_of(opt).pass_named("prepack").skipped)


def test_tied_weights_are_not_packed_twice():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(50, 8), nn.Linear(8, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    model, ids = LM().eval(), torch.randint(0, 50, (2, 5))
    opt = cpuboost.optimize(model, sample_input=ids)
    assert "tied" in _skips(opt)["head"] and opt.head.weight is opt.emb.weight


def test_unsupported_convs_are_reported_and_still_correct():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                          nn.Conv2d(4, 4, 2, padding="same"), nn.Conv2d(4, 2, 3, padding="same")).eval()
    x = torch.randn(1, 3, 7, 7)
    opt = cpuboost.optimize(model, sample_input=x)
    skips = _skips(opt)
    assert "padding_mode" in skips["0"] and "pads unevenly" in skips["1"]
    assert isinstance(opt[2], FusedConv)
    assert rel_err(model(x), opt(x)) <= FP32_RTOL


def test_parametrized_weight_is_skipped():
    model = nn.Sequential(nn.Linear(4, 4))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    opt = cpuboost.optimize(model.eval(), sample_input=torch.randn(2, 4))
    assert "parametrized" in _skips(opt)["0"]


def test_mha_projection_is_left_to_mha():
    case = TOY_MODELS["mha"]
    opt = cpuboost.optimize(build_eval(case), sample_input=case.inputs(2))
    assert "reads this projection" in _skips(opt)["attn.out_proj"]
    assert isinstance(opt.proj, FusedLinear)


def test_transformer_encoder_layer_runs_packed_in_bf16():
    """IPEX crashed on nn.TransformerEncoderLayer under bf16 prepacking."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    opt = cpuboost.optimize(layer, dtype=torch.bfloat16, sample_input=x)
    assert isinstance(opt.linear1, FusedLinear) and opt.linear1.compute_dtype == torch.bfloat16
    with torch.no_grad():
        assert rel_err(layer(x), opt(x).float()) <= 5e-2


def test_measured_kernel_choice_is_reported_and_correct():
    from cpuboost.passes.kernel_choice import linear_backend
    choice, t_dnn, t_aten = linear_backend((64, 32), 1, torch.float32, True)
    assert choice in ("onednn", "aten") and t_dnn > 0 and t_aten > 0
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)).eval()
    x = torch.randn(64, 32)
    cfg = cpuboost.OptimizeConfig(measure_kernels=True)
    opt = cpuboost.optimize(model, config=cfg, sample_input=x)
    backends = {m.backend for m in opt.modules() if isinstance(m, FusedLinear)}
    assert backends <= {"onednn", "aten"}
    notes = cpuboost.report_of(opt).pass_named("prepack").notes
    assert all("measured faster" in n for n in notes)
    assert rel_err(model(x), opt(x)) <= FP32_RTOL
