import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.nn import FusedConv, FusedLinear
from cpuboost.testing import TOY_MODELS, build_eval
from tests.conftest import FP32_RTOL, onednn_packs, rel_err


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


def test_transformer_encoder_layer_runs_packed_in_bf16(emulated_bf16):
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
    assert backends <= {"onednn", "aten", "avx2"}  # avx2: cpuboost's kernel, never measured
    notes = cpuboost.report_of(opt).pass_named("prepack").notes
    assert all("measured faster" in n for n in notes)
    assert rel_err(model(x), opt(x)) <= FP32_RTOL


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_transformers_conv1d_is_packed(dtype, emulated_bf16):
    """GPT-2's projections are transformers' Conv1D (x @ W + b, W stored (in, out)). Unpacked,
    a bf16 model re-cast every weight on every call (GPT-2 generate ran at 0.31x eager)."""
    transformers = pytest.importorskip("transformers")
    from cpuboost.nn.fused import FusedConv1DLinear
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(5, 300, (2, 7))
    opt = cpuboost.optimize(model, dtype=dtype, sample_input={"input_ids": ids})
    assert isinstance(opt.transformer.h[0].mlp.c_fc, FusedConv1DLinear)
    if onednn_packs(dtype or torch.float32):  # aten's kernel (bf16 on AVX2) fuses nothing
        assert "gelu" in opt.transformer.h[0].mlp.c_fc.post_op.name  # NewGELU fused in
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        ref = model(ids).logits
    with torch.no_grad():
        out = opt(ids).logits
    assert out.dtype == ref.dtype
    assert rel_err(ref.float(), out.float()) <= (5e-2 if dtype else 1e-4)
    sd = opt.state_dict()
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D's (in, out)
    assert torch.allclose(sd["transformer.h.0.attn.c_attn.weight"],
                          model.state_dict()["transformer.h.0.attn.c_attn.weight"],
                          atol=1e-2 if dtype else 1e-6)
    opt.load_state_dict(model.state_dict())
