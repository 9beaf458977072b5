"""torch.jit.trace + torch.jit.freeze of cpuboost models (IPEX's usual deployment flow): every
toy model, fp32 / bf16 / int8, traces and the traced graph computes what the optimized model
does; layers with oneDNN-packed weights say they were traced as aten ops; a trace taken before
the first call records the optimized forward; graph mode refuses clearly; a saved trace loads in
a fresh process after cpuboost.load_ops()."""
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import cpuboost
from cpuboost.errors import UnsupportedRequestError
from cpuboost.nn import tracing
from cpuboost.testing import AS_AVX512, TOY_MODELS, build_eval
from tests.conftest import BF16_RTOL, rel_err

CASES = [name for name, case in TOY_MODELS.items() if case.method == "forward"]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _traced(model, args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.freeze(torch.jit.trace(model, args, check_trace=False))


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("name", CASES)
def test_traced_and_frozen_model_computes_what_the_optimized_model_does(name, kind):
    case = TOY_MODELS[name]
    model, x = build_eval(case), case.inputs(2)
    with torch.no_grad():
        if kind == "int8":
            opt = cpuboost.quantize(model, [case.inputs(2) for _ in range(3)])
        else:
            dtype = torch.bfloat16 if kind == "bf16" else None
            opt = cpuboost.optimize(model, dtype=dtype, sample_input=x)
        expected = _first(opt(*x))
        traced = _traced(opt, x)
        # the oneDNN layers traced as their aten ops sum in another order: fp32 rounding only
        assert rel_err(expected, _first(traced(*x))) < 1e-5
        other = case.inputs(2)  # not the traced input: the graph computes, it did not record
        assert rel_err(_first(opt(*other)), _first(traced(*other))) < 1e-5


def test_onednn_layers_say_they_were_traced_as_aten_ops():
    case = TOY_MODELS["conv_bn"]
    model, x = build_eval(case), case.inputs(1)
    with torch.no_grad():
        opt = cpuboost.optimize(model, sample_input=x)
        onednn = {type(m).__name__ for m in opt.modules()
                  if isinstance(getattr(m, "_w", None), torch.Tensor) and m._w.is_mkldnn}
        assert onednn  # (its ConvTranspose is on oneDNN on every x86 CPU)
        tracing._warned.clear()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _traced(opt, x)
    said = [str(w.message) for w in seen if "cpuboost's" in str(w.message)]
    assert len(said) == len(onednn)  # once per kind of layer, none where nothing is oneDNN's
    for kind in onednn:
        assert any(kind in s and "graph_mode=True" in s for s in said)


def test_trace_before_the_first_call_records_the_optimized_forward():
    case = TOY_MODELS["conv_bn"]
    model, x = build_eval(case), case.inputs(2)
    with torch.no_grad():
        expected = model(*x)
        opt = cpuboost.optimize(model)  # passes wait for the first call: the trace's
        traced = _traced(opt, x)
        report = cpuboost.report_of(opt)
        assert report.pending is None and report.pass_named("fold_bn").applied
        assert not report.warnings  # checked against the original, outside the trace
        graph = str(traced.inlined_graph)
        assert "batch_norm" not in graph  # folded: the graph is the optimized model's
        assert rel_err(expected, traced(*x)) < 1e-5
        assert rel_err(expected, opt(*x)) < 1e-5  # the model itself still runs eagerly


@pytest.mark.parametrize("how", ["optimize", "quantize"])
def test_graph_mode_model_refuses_to_be_traced(how):
    case = TOY_MODELS["mlp_bn"]
    model, x = build_eval(case), case.inputs(2)
    with torch.no_grad():
        if how == "optimize":
            opt = cpuboost.optimize(model, graph_mode=True)
        else:
            opt = cpuboost.quantize(model, [case.inputs(2)], graph_mode=True)
        with pytest.raises(UnsupportedRequestError, match="graph_mode=True"):
            torch.jit.trace(opt, x, check_trace=False)


def test_hf_bert_traces_with_keyword_inputs():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 300, (1, 12))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        for opt in (cpuboost.optimize(model, sample_input=inputs),
                    cpuboost.quantize(model, [inputs])):
            expected = opt(**inputs).last_hidden_state
            traced = torch.jit.freeze(torch.jit.trace(opt, example_kwarg_inputs=inputs,
                                                      strict=False, check_trace=False))
            assert rel_err(expected, traced(**inputs)["last_hidden_state"]) < 1e-5


@pytest.mark.parametrize("where", ["here", "avx512"])
def test_saved_trace_loads_in_a_fresh_process_after_load_ops(tmp_path, where):
    """Traced where the AVX2 kernels run, loaded in a fresh process here and on a CPU with
    AVX-512 (simulated), whose models use oneDNN: the trace's cpuboost ops still load and run."""
    case = TOY_MODELS["mlp_bn"]
    model, x = build_eval(case), case.inputs(4)
    with torch.no_grad():
        traced = _traced(cpuboost.quantize(model, [case.inputs(4) for _ in range(3)]), x)
        expected = traced(*x)
    torch.jit.save(traced, tmp_path / "model.pt")
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    code = (AS_AVX512 if where == "avx512" else "") + textwrap.dedent(f"""
        import torch, cpuboost
        print("registered at import:", [n for n in torch._C._dispatch_get_all_op_names()
                                        if n.startswith("cpuboost::")])
        cpuboost.load_ops()
        model = torch.jit.load({str(tmp_path / "model.pt")!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        print("max diff", float((model(*io["x"]) - io["expected"]).abs().max()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "registered at import: []" in out.stdout  # importing cpuboost loads no kernel
    assert "max diff 0.0" in out.stdout


@pytest.mark.parametrize("name", ["conv_bn", "mlp_bn", "transformer_encoder"])
def test_trace_under_cpu_autocast(name):
    """IPEX's bf16 flow: optimize(dtype=bf16), then trace under torch.cpu.amp.autocast. A
    TransformerEncoderLayer (which cpuboost runs through its submodules) reached
    MultiheadAttention's fast path with weights autocast had cached before the trace began."""
    case = TOY_MODELS[name]
    model, x = build_eval(case), case.inputs(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        opt = cpuboost.optimize(model, dtype=torch.bfloat16, sample_input=x)
        expected = _first(opt(*x))  # (fills autocast's weight cache before the trace)
        out = _first(_traced(opt, x)(*x))
    assert out.dtype == expected.dtype
    assert rel_err(expected.float(), out.float()) < BF16_RTOL


def test_load_ops_says_where_the_kernels_a_trace_may_call_cannot_run(monkeypatch):
    from cpuboost import kernels
    monkeypatch.setattr(kernels, "avx2_library", lambda: False)
    monkeypatch.setattr(kernels, "_library_why", ["the CPU has no AVX2+FMA"])
    with pytest.warns(RuntimeWarning, match="the CPU has no AVX2.FMA.*trace the model here"):
        cpuboost.load_ops()
