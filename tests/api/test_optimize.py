"""optimize() on every toy model: numerics, interface, hooks, state_dict, threads, copies."""
import copy

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.nn import FusedConv, FusedLinear
from cpuboost.testing import TOY_MODELS
from tests.conftest import BF16_RTOL, FP32_RTOL, rel_err, run, toy

DTYPES = [None, torch.bfloat16]


def _outputs(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("name", list(TOY_MODELS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("with_sample", [True, False], ids=["sample", "first_call"])
def test_matches_original(name, dtype, batch, with_sample):
    case, model = toy(name)
    inputs = case.inputs(batch)
    ref = run(model, case, inputs)
    opt = cpuboost.optimize(model, dtype=dtype, sample_input=inputs if with_sample else None)
    rtol = BF16_RTOL if dtype else FP32_RTOL
    for _ in range(2):  # the first call may be the recording one
        out = run(opt, case, inputs)
        for r, o in zip(_outputs(ref), _outputs(out)):
            assert rel_err(r, o) <= rtol
    report = cpuboost.report_of(opt)
    assert report.pending is None
    assert report.applied("prepack"), str(report)
    if with_sample:
        assert report.numerics.passed and report.numerics.max_rel <= rtol


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_other_batch_size_after_packing(dtype):
    case, model = toy("conv_bn")
    opt = cpuboost.optimize(model, dtype=dtype, sample_input=case.inputs(2))
    x = case.inputs(5)
    assert rel_err(run(model, case, x), run(opt, case, x)) <= (BF16_RTOL if dtype else FP32_RTOL)


def test_original_untouched_unless_inplace():
    case, model = toy("conv_bn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    opt = cpuboost.optimize(model, sample_input=case.inputs(2))
    assert opt is not model
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    same = cpuboost.optimize(model, inplace=True, sample_input=case.inputs(2))
    assert same is model and isinstance(model.stem[0], FusedConv)


def test_custom_method_and_attributes_survive():
    case, model = toy("custom_method")
    x = case.inputs(2)
    opt = cpuboost.optimize(model, sample_input=x)
    assert opt.scale == 2.0 and isinstance(opt, type(model))
    assert rel_err(model.inference(*x), opt.inference(*x)) <= FP32_RTOL
    assert cpuboost.report_of(opt).applied("fold_bn") == ["conv <- bn"]


def test_custom_method_folds_without_sample_input():
    """IPEX skipped conv+bn folding when inference went through a custom method."""
    case, model = toy("custom_method")
    x = case.inputs(2)
    opt = cpuboost.optimize(model)
    assert cpuboost.report_of(opt).pending
    first = opt.inference(*x)  # calls self.forward: triggers the deferred passes
    assert cpuboost.report_of(opt).applied("fold_bn") == ["conv <- bn"]
    assert isinstance(opt.conv, FusedConv) and opt.conv.fold_scale is not None
    ref = model.inference(*x)
    assert rel_err(ref, first) <= FP32_RTOL and rel_err(ref, opt.inference(*x)) <= FP32_RTOL


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_forward_hooks_still_fire(dtype):
    case, model = toy("hooked")
    seen = []
    model.fc1.register_forward_hook(lambda m, i, o: seen.append(("fc1", o.detach().clone())))
    model.register_forward_hook(lambda m, i, o: seen.append(("root", None)))
    x = case.inputs(4)
    ref_pre_act = model.fc1(*x)
    opt = cpuboost.optimize(model, dtype=dtype, sample_input=x)
    seen.clear()
    run(opt, case, x)
    assert [s[0] for s in seen] == ["fc1", "root"]
    # the hook must still see fc1's own (pre-activation) output: relu was not fused into fc1
    assert rel_err(ref_pre_act, seen[0][1].float()) <= (BF16_RTOL if dtype else FP32_RTOL)
    assert not cpuboost.report_of(opt).applied("fuse_pointwise")


def test_shared_conv_output_is_not_folded():
    case, model = toy("shared_branch")
    opt = cpuboost.optimize(model, sample_input=case.inputs(2))
    report = cpuboost.report_of(opt)
    assert not report.applied("fold_bn")
    assert any("also used elsewhere" in why for _, why in report.pass_named("fold_bn").skipped)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_results_unchanged_after_thread_count_change(dtype):
    case, model = toy("conv_bn")
    torch.set_num_threads(2)
    x = case.inputs(3)
    opt = cpuboost.optimize(model, dtype=dtype, sample_input=x)
    at_two = run(opt, case, x)
    torch.set_num_threads(1)
    at_one = run(opt, case, x)
    assert rel_err(at_two.float(), at_one.float()) <= FP32_RTOL
    assert rel_err(run(model, case, x), at_one) <= (BF16_RTOL if dtype else FP32_RTOL)


@pytest.mark.parametrize("name", ["conv_bn", "mlp_bn", "conv1d_3d", "transformer_encoder"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_state_dict_round_trip(name, dtype):
    case, model = toy(name)
    x = case.inputs(2)
    opt = cpuboost.optimize(model, dtype=dtype, sample_input=x)
    sd, osd = model.state_dict(), opt.state_dict()
    assert list(osd) == list(sd)
    for k in sd:
        assert osd[k].shape == sd[k].shape and osd[k].dtype == sd[k].dtype, k
        tol = 1e-2 if dtype else 1e-5  # bf16 mode holds weights rounded to bf16
        assert torch.allclose(osd[k].float(), sd[k].float(), rtol=tol, atol=tol), k
    # a checkpoint of another original loads into the optimized model ...
    _, other = toy(name, seed=1)
    opt.load_state_dict(other.state_dict())
    rtol = BF16_RTOL if dtype else 1e-4
    assert rel_err(_outputs(run(other, case, x))[0], _outputs(run(opt, case, x))[0]) <= rtol
    # ... and the optimized model's state_dict loads back into a plain one
    fresh = toy(name, seed=2)[1]
    fresh.load_state_dict(opt.state_dict())
    assert rel_err(_outputs(run(other, case, x))[0], _outputs(run(fresh, case, x))[0]) <= rtol


def test_deepcopy_and_pickle_of_optimized_model(tmp_path):
    case, model = toy("conv_bn")
    x = case.inputs(2)
    opt = cpuboost.optimize(model, dtype=torch.bfloat16, sample_input=x)
    ref = run(opt, case, x)
    assert torch.equal(run(copy.deepcopy(opt), case, x), ref)
    torch.save(opt, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(run(loaded, case, x), ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_output_dtypes_follow_autocast(dtype, emulated_bf16):
    """bf16 mode returns what torch.autocast would; fp32 mode under user autocast too."""
    case, model = toy("transformer_encoder")
    x = case.inputs(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(*x).dtype
    opt = cpuboost.optimize(model, dtype=dtype, sample_input=x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert opt(*x).dtype == expected
    if dtype is not None:
        with torch.no_grad():
            assert opt(*x).dtype == expected  # without the user's autocast


@pytest.mark.parametrize("own", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["conv_bn", "mlp_bn", "transformer_encoder"])
def test_model_held_in_low_precision_keeps_it_with_dtype_none(name, own):
    """A model loaded in bf16/fp16, optimized with dtype=None: every pass checked against its
    own (low-precision) outputs was dropped at float32's tolerance, and a fused layer returned
    float32 where the original returned its own dtype."""
    case, model = toy(name)
    model = model.to(own)
    x = tuple(t.to(own) for t in case.inputs(2))
    with torch.no_grad():
        expected = _outputs(model(*x))
        for opt in (cpuboost.optimize(model, sample_input=x), cpuboost.optimize(model)):
            out = _outputs(run(opt, case, x))
            out = _outputs(run(opt, case, x))  # (the first call of the second ran the original)
            report = cpuboost.report_of(opt)
            assert [o.dtype for o in out] == [e.dtype for e in expected]
            assert all(rel_err(e, o) < BF16_RTOL for e, o in zip(expected, out))
            assert report.pass_named("prepack").applied and not report.pass_named("prepack").dropped
            if own == torch.bfloat16:  # kept in bf16 as dtype=torch.bfloat16 keeps it
                assert "bfloat16" in report.dtype
            else:  # computed in float32 here, checked at the tolerance of its own rounding
                assert any("parameters are float16" in w for w in report.warnings)


def test_packed_weight_replaces_original():
    case, model = toy("mlp_bn")
    opt = cpuboost.optimize(model, sample_input=case.inputs(4))
    report = cpuboost.report_of(opt)
    fused = [m for m in opt.modules() if isinstance(m, FusedLinear)]
    assert fused and all(not list(m.parameters(recurse=False)) for m in fused)
    # folding removes BN compute but keeps BN stats (4 vectors) for state_dict; packing adds
    # nothing but, for cpuboost's AVX2 kernel, zero output features up to a multiple of 16
    padding = sum((-m.out_features % 16) * m.in_features * 4 for m in fused if m.backend == "avx2")
    assert report.weight_bytes_after <= report.weight_bytes_before * 1.05 + padding


def test_level_o0_changes_nothing():
    case, model = toy("conv_bn")
    opt = cpuboost.optimize(model, level="O0", sample_input=case.inputs(2))
    assert [type(m) for m in opt.modules()] == [type(m) for m in model.modules()]


def test_explicit_pass_off_is_respected():
    case, model = toy("conv_bn")
    opt = cpuboost.optimize(model, weights_prepack=False, conv_bn_folding=True,
                            replace_dropout_with_identity=False, sample_input=case.inputs(2))
    report = cpuboost.report_of(opt)
    assert report.applied("fold_bn") and report.pass_named("prepack") is None
    assert isinstance(opt.drop, nn.Dropout)
    assert all(m.backend == "aten" for m in opt.modules() if isinstance(m, FusedConv))


# ipex.optimize's parameters, in its order (IPEX 2.x API documentation)
IPEX_OPTIMIZE = ["model", "dtype", "optimizer", "level", "inplace", "conv_bn_folding",
                 "linear_bn_folding", "weights_prepack", "replace_dropout_with_identity",
                 "optimize_lstm", "split_master_weight_for_bf16", "fuse_update_step",
                 "auto_kernel_selection", "sample_input", "graph_mode", "concat_linear"]


def test_every_ipex_argument_is_accepted_in_ipex_s_order():
    """Switching is a changed import: IPEX's keywords all exist, positional calls line up with
    IPEX's order, and the options cpuboost has no pass for are reported with what happens
    instead (they raised TypeError: unexpected keyword)."""
    import inspect
    assert list(inspect.signature(cpuboost.optimize).parameters)[:len(IPEX_OPTIMIZE)] == \
        IPEX_OPTIMIZE
    case, model = toy("mlp_bn")
    x = case.inputs(2)
    opt = cpuboost.optimize(model, None, None, "O1", False, None, None, None, None, True,
                            True, True, True, x, None, True)
    report = cpuboost.report_of(opt)
    skipped = dict(report.pass_named("ipex_arguments").skipped)
    assert set(skipped) == {"optimize_lstm", "split_master_weight_for_bf16",
                            "fuse_update_step", "concat_linear"}
    assert "mkldnn_rnn_layer" in skipped["optimize_lstm"]
    assert report.numerics.passed
    with torch.no_grad():
        assert rel_err(run(model, case, x), run(opt, case, x)) <= FP32_RTOL


def test_auto_kernel_selection_is_measure_kernels(monkeypatch):
    """IPEX's auto_kernel_selection=True is cpuboost's measure_kernels (oneDNN timed against
    aten per Linear shape where oneDNN would run); it raised TypeError."""
    import cpuboost.api as api
    seen = []
    with_ = api.OptimizeConfig.with_
    monkeypatch.setattr(api.OptimizeConfig, "with_",
                        lambda self, **changes: seen.append(changes) or with_(self, **changes))
    case, model = toy("mlp_bn")
    opt = cpuboost.optimize(model, auto_kernel_selection=True, sample_input=case.inputs(4))
    assert {"measure_kernels": True} in seen and cpuboost.report_of(opt).numerics.passed
