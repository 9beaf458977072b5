"""optimize(..., graph_mode=True, inplace=True): weights the graphs hold packed are released."""
import copy
import pickle

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.compile import graph_mode as graph_mode_module
from cpuboost.compile.shared_constants import folded_constants
from cpuboost.kernels import gemm_ops, gemm_unavailable
from tests.conftest import TiedLM, rel_err

pytestmark = pytest.mark.skipif(not gemm_ops(),
                                reason=f"cpuboost's AVX2 kernel: {gemm_unavailable()}")


class Block(nn.Module):
    def __init__(self, dim=64, breaks=False):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.breaks = breaks

    def forward(self, x):  # (B, T, dim)
        h = self.down(torch.nn.functional.gelu(self.up(x)))
        if self.breaks:
            torch._dynamo.graph_break()
        return self.norm(x + h)


class Stack(nn.Module):
    def __init__(self, breaks=False):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(Block(breaks=breaks), Block(breaks=breaks))
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        return self.out(self.blocks(x))


def _inputs(*lengths):
    torch.manual_seed(1)
    return [torch.randn(1, n, 64) for n in lengths]


def _released(model):
    return [name for name, p in model.named_parameters() if p.untyped_storage().nbytes() == 0]


def _note(model):
    notes = cpuboost.report_of(model).pass_named("graph_mode").notes
    return next((n for n in notes if n.startswith("inplace=True:")), None)


def _packed_pointers():
    return {c.data_ptr() for _, c, op in folded_constants() if "pack_linear_weight" in op}


def test_weights_held_packed_are_released_and_come_back_for_a_recompilation():
    torch._dynamo.reset()
    model = Stack().eval()
    xs = _inputs(8, 12, 20)
    with torch.no_grad():
        refs = [model(x) for x in xs]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        opt = cpuboost.optimize(model, graph_mode=True, inplace=True, sample_input=xs[0])
        assert opt is model
        linears = sorted(f"{n}.weight" for n, m in model.named_modules()
                         if isinstance(m, nn.Linear))
        assert sorted(_released(model)) == linears  # biases and LayerNorm are read as they are
        packed = _packed_pointers()
        assert "5 Linear weight(s)" in _note(model)
        for x, ref in zip(xs, refs):  # 12 recompiles (weights restored, then released again)
            assert rel_err(ref, model(x)) <= 1e-5
    assert model.forward.graphs == 2
    assert sorted(_released(model)) == linears
    assert _packed_pointers() == packed  # the new graph took the same packed copies
    saved = model.state_dict()  # the values, unpacked from the graph's copies
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in state)


def test_a_model_from_torch_load_is_released_too():
    """torch.load gives each weight a storage read from the file, which cannot be resized (the
    first version raised here, after compiling): such a weight gets a storage of its own."""
    import io
    torch._dynamo.reset()
    buffer = io.BytesIO()
    torch.save(Stack().eval(), buffer)
    model = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert not model.out.weight.untyped_storage().resizable()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    xs = _inputs(8, 12)
    with torch.no_grad():
        refs = [model(x) for x in xs]
        cpuboost.optimize(model, graph_mode=True, inplace=True)
        for x, ref in zip(xs, refs):  # the second length recompiles: restored, released again
            assert rel_err(ref, model(x)) <= 1e-5
    assert len(_released(model)) == 5
    saved = model.state_dict()
    assert all(torch.equal(saved[k], state[k]) for k in state)


class Conv1DStack(nn.Module):
    """GPT-2's layout: transformers' Conv1D holds its weight [in, out] and computes addmm."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        torch.manual_seed(0)
        self.up, self.down = Conv1D(256, 64), Conv1D(64, 256)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_a_weight_held_transposed_is_released_and_restored():
    torch._dynamo.reset()
    model = Conv1DStack().eval()
    xs = _inputs(8, 12)
    with torch.no_grad():
        refs = [model(x) for x in xs]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        cpuboost.optimize(model, graph_mode=True, inplace=True, sample_input=xs[0])
        assert sorted(_released(model)) == ["down.weight", "up.weight"]
        for x, ref in zip(xs, refs):
            assert rel_err(ref, model(x)) <= 1e-5
    assert sorted(_released(model)) == ["down.weight", "up.weight"]
    saved = model.state_dict()
    assert all(torch.equal(saved[k], state[k]) for k in state)


def _released_stack():
    torch._dynamo.reset()
    model = Stack().eval()
    (x,) = _inputs(8)
    with torch.no_grad():
        ref, ref_out = model(x), model.out(model.blocks(x))
        cpuboost.optimize(model, graph_mode=True, inplace=True, sample_input=x)
    return model, x, ref, ref_out


@pytest.mark.parametrize("read", ["add", "linear", "data", "to"])
def test_a_read_outside_the_graphs_brings_the_weights_back(read):
    """Between calls a released weight answers its metadata; the first read of its values (a
    submodule called on its own, say) restores every weight for good, with a
    warning, and proceeds on the values, never on freed memory."""
    model, x, ref, ref_out = _released_stack()
    w = model.out.weight
    assert w.shape == (10, 64) and w.dtype == torch.float32 and w.numel() == 640
    assert isinstance(w, nn.Parameter) and len(_released(model)) == 5
    reads = {"add": lambda: w + 1, "linear": lambda: model.out(model.blocks(x)),
             "data": lambda: w.data.clone(), "to": lambda: model.to(torch.float64).out.weight}
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="outside the compiled graphs"):
        got = reads[read]()
    assert not _released(model) and type(w) is nn.Parameter
    assert "weights kept:" in _note(model)
    expected = {"add": w + 1, "linear": ref_out}.get(read, w)
    assert torch.allclose(got.double(), expected.double(), rtol=1e-5, atol=1e-6)
    if read != "to":
        with torch.no_grad():
            assert rel_err(ref, model(x)) <= 1e-5  # still the compiled graph


@pytest.mark.parametrize("copy_by", ["deepcopy", "pickle", "state_dict", "detach"])
def test_copies_of_released_weights_hold_their_values_and_the_model_stays_released(copy_by):
    model, x, ref, _ = _released_stack()
    expected = model.state_dict()["blocks.0.up.weight"]
    copies = {"deepcopy": lambda: copy.deepcopy(model.blocks).state_dict()["0.up.weight"],
              "pickle": lambda: pickle.loads(pickle.dumps(model.blocks[0].up)).weight,
              "state_dict": lambda: model.blocks[0].state_dict()["up.weight"],  # a submodule's
              "detach": lambda: model.blocks[0].up.weight.detach()}
    got = copies[copy_by]()
    assert type(got) in (torch.Tensor, nn.Parameter) and torch.equal(got, expected)
    assert len(_released(model)) == 5
    with torch.no_grad():
        assert rel_err(ref, model(x)) <= 1e-5


def test_the_packed_copies_outlive_a_dynamo_reset():
    """torch._dynamo.reset() drops the compiled graphs; the released weights' only copies stay
    with the model, the next call compiles again from them and reuses them."""
    model, x, ref, _ = _released_stack()
    packed = _packed_pointers()
    torch._dynamo.reset()
    with torch.no_grad():
        assert rel_err(ref, model(x)) <= 1e-5
    assert len(_released(model)) == 5 and _packed_pointers() == packed


def test_without_inplace_the_callers_weights_stay():
    torch._dynamo.reset()
    model = Stack().eval()
    (x,) = _inputs(8)
    with torch.no_grad():
        opt = cpuboost.optimize(model, graph_mode=True, sample_input=x)
        opt(x)
    assert not _released(model) and _note(opt) is None


def test_a_weight_an_embedding_reads_stays():
    """A head tied to the token embedding: the embedding lookup reads the weight as it is."""
    torch._dynamo.reset()
    model = TiedLM().eval()
    ids = torch.randint(0, 500, (1, 9))
    with torch.no_grad():
        ref = model(ids)
        cpuboost.optimize(model, graph_mode=True, inplace=True, sample_input=ids)
        assert rel_err(ref, model(ids)) <= 1e-5
    assert _released(model) == ["body.weight"]


def test_graph_breaks_keep_the_weights(monkeypatch):
    from cpuboost.compile import choice
    monkeypatch.setattr(choice, "MARGIN", 0.0)  # keep the compiled forward, however it times
    torch._dynamo.reset()
    model = Stack(breaks=True).eval()
    (x,) = _inputs(8)
    with torch.no_grad():
        ref = model(x)
        cpuboost.optimize(model, graph_mode=True, inplace=True, sample_input=x)
        assert rel_err(ref, model(x)) <= 1e-5
    assert not _released(model)
    assert "weights kept: the forward has graph breaks" in _note(model)


def test_a_compiler_failure_restores_the_weights_for_eager(monkeypatch):
    torch._dynamo.reset()
    model = Stack().eval()
    xs = _inputs(8, 12)
    with torch.no_grad():
        refs = [model(x) for x in xs]
        cpuboost.optimize(model, graph_mode=True, inplace=True, sample_input=xs[0])
    assert _released(model)

    def failing(gm, example_inputs):
        raise RuntimeError("a compiler bug")
    monkeypatch.setattr(graph_mode_module, "cpuboost_backend", failing)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="the compiler failed"):
        out = model(xs[1])  # recompiles for the new length, fails, runs eager
    assert rel_err(refs[1], out) <= 1e-5
    assert not _released(model)
    assert rel_err(refs[0], model(xs[0])) <= 1e-5
    assert "weights kept: the compiler failed" in _note(model)
