"""torch.compile(backend="cpuboost"): found without import, scoped settings, chained passes."""
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass

from cpuboost.compile import backend as backend_mod
from cpuboost.testing import TOY_MODELS, build_eval
from tests.conftest import TiedLM, rel_err


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()


def test_found_through_entry_point_without_import():
    code = ("import torch, sys\n"
            "assert 'cpuboost' not in sys.modules\n"
            "m = torch.nn.Linear(8, 4).eval(); x = torch.randn(3, 8)\n"
            "with torch.no_grad(): out = torch.compile(m, backend='cpuboost')(x)\n"
            "assert torch.allclose(out, m(x), rtol=1e-4, atol=1e-5)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


class _Spy(CustomGraphPass):
    """Stands for another library's custom pass."""
    calls = 0

    def __call__(self, graph):
        _Spy.calls += 1

    def uuid(self):
        return "test-spy"


def test_compiles_where_cpuboosts_kernels_are_not_loaded():
    """On a CPU without the AVX2 kernels (AVX-512, Arm) their library is never loaded; the
    backend must not name its ops there (it raised inside every compile with a Linear)."""
    code = ("import torch, cpuboost.kernels as k\n"
            "k.gemm_ops = lambda: False  # as on an AVX-512 or Arm CPU\n"
            "from cpuboost.compile import scope\n"
            "m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),\n"
            "                        torch.nn.Linear(16, 4)).eval()\n"
            "x = torch.randn(3, 8)\n"
            "with torch.no_grad(), scope():\n"
            "    out = torch.compile(m, backend='cpuboost')(x)\n"
            "    assert torch.allclose(out, m(x), rtol=1e-4, atol=1e-5)\n"
            "assert not hasattr(torch.ops.cpuboost, 'pack_linear_weight')\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_settings_restored_and_other_passes_kept(monkeypatch):
    import torch._inductor.config as cfg
    made = []

    class Recording(backend_mod.OneDnnLinear):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(backend_mod, "OneDnnLinear", Recording)
    torch._dynamo.reset()
    model, x = _mlp(), torch.randn(16, 64)
    spy = _Spy()
    with cfg.patch(post_grad_custom_pre_pass=spy, fx_graph_cache=False):  # make passes run
        before = (cfg.freezing, cfg.post_grad_custom_pre_pass)
        compiled = torch.compile(model, backend="cpuboost")
        with torch.no_grad(), backend_mod.scope():
            out = compiled(x)
        assert (cfg.freezing, cfg.post_grad_custom_pre_pass) == before
        with torch.no_grad():
            assert torch.equal(compiled(x), out)  # later calls: no scope, no recompilation
    assert _Spy.calls >= 1  # the other library's pass still ran
    decisions = [d for p in made for d in p.decisions]
    assert sorted(shape for shape, _ in decisions) == [(16, 64, 128), (16, 128, 32)]
    assert sum(p.replaced for p in made) == sum(k == "onednn" for _, k in decisions)
    assert rel_err(model(x), out) <= 1e-4


@pytest.mark.parametrize("name", ["conv_bn", "residual", "mlp_bn"])
def test_toy_models_match_eager(name):
    case = TOY_MODELS[name]
    model = build_eval(case)
    x = case.inputs(2)
    torch._dynamo.reset()
    with torch.no_grad(), backend_mod.scope():  # the fast path: freezing + our graph pass
        out = torch.compile(model, backend="cpuboost")(*x)
    with torch.no_grad():
        assert rel_err(model(*x), out) <= 1e-4


def _kernel_wins(monkeypatch, winner):
    from cpuboost.compile import graph_passes
    from cpuboost.kernels import gemm_ops
    if winner == "avx2" and not gemm_ops():
        pytest.skip("cpuboost's AVX2 kernel does not run on this CPU")
    monkeypatch.setattr(graph_passes, "mkl_or_onednn", lambda *a: (winner, 1.0, 1.0))
    if winner != "avx2":
        monkeypatch.setattr(graph_passes, "_own_kernel", lambda dtype: False)  # as on AVX-512


def _folds(monkeypatch) -> list:
    """The targets of the nodes freezing folds into constants, as it folds them."""
    from torch._inductor import constant_folding
    folded = []
    original = constant_folding.replace_node_with_constant

    def spy(gm, node, constant=None, name=None):
        folded.append(str(node.target))
        return original(gm, node, constant, name)

    monkeypatch.setattr(constant_folding, "replace_node_with_constant", spy)
    return folded


@pytest.mark.parametrize("winner", ["onednn", "mkl", "avx2"])
def test_fp32_linear_packed_once_for_the_faster_kernel(monkeypatch, winner):
    """Where oneDNN measures faster, Inductor's packing pattern emits the oneDNN linear directly:
    no MKL pack is ever folded (it used to be made, then dropped: a transient copy of every
    weight). Where MKL is faster, the MKL path stays. Where cpuboost's AVX2 kernel runs (an
    AVX2 CPU without AVX-512), only its pack is folded."""
    _kernel_wins(monkeypatch, winner)
    folded = _folds(monkeypatch)
    import torch._inductor.config as cfg
    torch._dynamo.reset()
    model, x = _mlp(), torch.randn(16, 64)
    with cfg.patch(fx_graph_cache=False), torch.no_grad(), backend_mod.scope():
        out = torch.compile(model, backend="cpuboost")(x)
    mkl = [t for t in folded if "mkl_reorder" in t]
    onednn = [t for t in folded if "mkldnn._reorder_linear_weight" in t]
    own = [t for t in folded if "cpuboost.pack_linear_weight" in t]
    assert (len(mkl), len(onednn), len(own)) == {"onednn": (0, 2, 0), "mkl": (2, 0, 0),
                                                 "avx2": (0, 0, 2)}[winner]
    assert rel_err(model(x), out) <= 1e-4


@pytest.mark.parametrize("winner", ["onednn", "mkl", "avx2"])
def test_head_tied_to_embedding_is_not_packed(monkeypatch, winner):
    """A weight the graph also reads plain (the embedding lookup) gets no packed copy: the head
    runs oneDNN on the shared weight, whichever kernel would have taken an untied linear."""
    _kernel_wins(monkeypatch, winner)
    folded = _folds(monkeypatch)
    made = []

    class Recording(backend_mod.OneDnnLinear):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(backend_mod, "OneDnnLinear", Recording)
    import torch._inductor.config as cfg
    torch._dynamo.reset()
    model, ids = TiedLM().eval(), torch.randint(0, 500, (2, 9))
    with cfg.patch(fx_graph_cache=False), torch.no_grad(), backend_mod.scope():
        out = torch.compile(model, backend="cpuboost")(ids)
    packs = [t for t in folded if "reorder" in t or "pack_linear_weight" in t]
    assert len(packs) == 1  # the body's weight only
    assert sum(p.shared for p in made) == 1
    with torch.no_grad():
        assert rel_err(model(ids), out) <= 1e-4


def test_a_dropped_compiled_model_frees_its_constants_with_dynamo_reset():
    """Inductor kept each graph's wrapper module, whose globals hold the frozen constants, in
    sys.modules and PyCodeCache for good: a dropped model's packed weights were never freed.
    The backend takes the modules it loaded off both registries; the graph holds its own."""
    import gc
    import weakref
    import cpuboost
    from torch._inductor.codecache import PyCodeCache
    from cpuboost.compile.shared_constants import folded_constants
    torch._dynamo.reset()
    model = _mlp()
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = model(x)
        fast = cpuboost.optimize(model, graph_mode=True)
        assert rel_err(ref, fast(x)) <= 1e-5
        assert rel_err(ref, fast(x)) <= 1e-5  # the graph runs without the registries
    constants = [weakref.ref(c) for w, c, _ in folded_constants()
                 if any(w is p for p in model.parameters())]
    assert constants
    owned = {id(m.__dict__) for m in list(sys.modules.values()) + PyCodeCache.modules
             if hasattr(m, "__dict__")}
    assert not any(id(r) in owned for c in constants for r in gc.get_referrers(c()))
    del fast
    torch._dynamo.reset()
    gc.collect()
    assert all(c() is None for c in constants)


@pytest.mark.parametrize("changed", ["gemm_u8s8_avx2.cpp", "act_avx2.h"])
def test_inductor_cache_key_covers_every_kernel_source(tmp_path, monkeypatch, changed):
    """A graph Inductor cached against an older cpuboost op (one argument fewer) crashed the
    process when loaded; the custom pass's cache key hashed the attention sources only."""
    import shutil
    from cpuboost.compile import attention_pass
    from cpuboost.kernels import _SOURCE
    for f in list(_SOURCE.parent.glob("*.cpp")) + list(_SOURCE.parent.glob("*.h")):
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.setattr(attention_pass, "_SOURCE", tmp_path / _SOURCE.name)
    attention_pass._source_key.cache_clear()
    before = attention_pass._source_key()
    with open(tmp_path / changed, "a") as f:
        f.write("\n// changed\n")
    attention_pass._source_key.cache_clear()
    try:
        assert attention_pass._source_key() != before
    finally:
        attention_pass._source_key.cache_clear()  # the real sources' key again


def test_embedding_bag_runs_the_forward_only_kernel():
    """The compiled graph called aten._embedding_bag, which also builds what backward needs
    (DLRM-like model: ~1 ms per batch against 0.63 ms eager, which calls the forward-only
    kernel under no_grad). In inference graphs it is now the forward-only kernel; where a
    later op reads the backward outputs, the node stays."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from cpuboost.compile.graph_passes import forward_only_embedding_bags
    import cpuboost

    class Bags(nn.Module):
        def __init__(self):
            super().__init__()
            self.mean = nn.EmbeddingBag(50, 8, mode="mean")
            self.weighted = nn.EmbeddingBag(50, 8, mode="sum")
            self.fc = nn.Linear(16, 4)

        def forward(self, ids, offsets, weights):
            return self.fc(torch.cat([self.mean(ids, offsets),
                                      self.weighted(ids, offsets, per_sample_weights=weights)], 1))

    torch.manual_seed(0)
    model = Bags().eval()
    ids, offsets, weights = torch.randint(0, 50, (20,)), torch.tensor([0, 3, 3, 11]), torch.rand(20)
    import torch._inductor.config as cfg
    with cfg.patch(fx_graph_cache=False), torch.no_grad():  # a cached graph skips the pass
        fast = cpuboost.optimize(model, graph_mode=True, sample_input=(ids, offsets, weights))
        assert rel_err(model(ids, offsets, weights), fast(ids, offsets, weights)) <= 1e-6
    assert "2 EmbeddingBag(s) on the forward-only kernel" in \
        cpuboost.report_of(fast).pass_named("graph_mode").applied[0]

    def bag_with_bookkeeping(w, i, o):  # its offset2bag read afterwards: left alone
        out = torch.ops.aten._embedding_bag.default(w, i, o)
        return out[0], out[1] + 1
    graph = make_fx(bag_with_bookkeeping)(torch.randn(50, 8), ids, offsets).graph
    assert forward_only_embedding_bags(graph) == 0
    graph = make_fx(lambda w, i, o: torch.ops.aten._embedding_bag.default(w, i, o)[0])(
        torch.randn(50, 8), ids, offsets).graph
    assert forward_only_embedding_bags(graph) == 1
