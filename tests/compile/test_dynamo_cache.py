"""A dropped graph-mode model frees its graphs without ``torch._dynamo.reset()``; the other
models' graphs stay."""
import gc
import weakref

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.compile.dynamo_cache import BackendRef
from cpuboost.compile.shared_constants import folded_constants
from tests.conftest import rel_err


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _block(seed: int) -> _Block:
    torch.manual_seed(seed)
    return _Block().eval()


def _compiled(model: nn.Module, x: torch.Tensor, inplace: bool = False) -> nn.Module:
    with torch.no_grad():
        fast = cpuboost.optimize(model, graph_mode=True, inplace=inplace)
        fast(x)
    return fast


def _constants_of(model: nn.Module) -> list:
    """Weak references to the constants the graphs folded from ``model``'s weights."""
    return [weakref.ref(c) for w, c, _ in folded_constants()
            if any(w is p for p in model.parameters())]


def _collect():
    # the finalizer drops the graphs while the first collection runs; the graphs are in
    # reference cycles (a wrapper module and its functions), freed by the next one
    gc.collect()
    gc.collect()


@pytest.mark.parametrize("inplace", [False, True])
def test_a_dropped_model_frees_its_graphs_without_dynamo_reset(inplace):
    """Before: the backend Dynamo keeps for good was a bound method of the compiled forward
    (so the model lived on), and graph mode's dropped guards never told Dynamo the model was
    gone: every packed weight stayed until torch._dynamo.reset()."""
    x = torch.randn(4, 64)
    model = _block(0)
    fast = _compiled(model, x, inplace)
    constants, forward = _constants_of(model), weakref.ref(fast.__dict__["forward"])
    assert constants
    del fast, model
    _collect()
    assert forward() is None
    assert all(c() is None for c in constants)
    from torch._dynamo import eval_frame
    assert not any(isinstance(getattr(w, "compiler_fn", None), BackendRef)
                   and w.compiler_fn._owner() is None for w in eval_frame.cached_backends.values())


def test_dropping_one_model_keeps_the_others_graphs():
    """Two instances of one class compile graphs on the same code objects, each in a region of
    its own: dropping one invalidates its entries only; the other runs on without compiling."""
    x = torch.randn(4, 64)
    first, second = _block(0), _block(1)
    with torch.no_grad():
        ref = second(x)
    fast_first, fast_second = _compiled(first, x), _compiled(second, x)
    kept = fast_second.__dict__["forward"]
    graphs, constants = kept.graphs, _constants_of(second)
    del fast_first, first
    _collect()
    with torch.no_grad():
        out = fast_second(x)
    assert rel_err(ref, out) <= 1e-5
    assert kept.graphs == graphs  # served by its own graph, not compiled again
    assert all(c() is not None for c in constants)
