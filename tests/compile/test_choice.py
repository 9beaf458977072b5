"""optimize(graph_mode=True, sample_input=...) on a forward with graph breaks keeps the compiled
forward only where it beats the model's own code (timings injected: the choice,
not the machine, is under test)."""
import weakref

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.compile import choice
from cpuboost.compile.graph_mode import CompiledForward
from tests.conftest import rel_err


class _Broken(nn.Module):
    """Two Linears with a graph break between them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)


class _Whole(_Broken):
    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _timed(monkeypatch, compiled_ms, eager_ms) -> list:
    seen = []

    def timings(*calls):
        seen.append(len(calls))
        for call in calls:  # they must run
            call()
        return [compiled_ms, eager_ms]
    monkeypatch.setattr(choice, "best_ms", timings)
    return seen


def _model(cls=_Broken):
    torch.manual_seed(0)
    return cls().eval()


@pytest.mark.parametrize("inplace", [False, True])
def test_a_slower_compiled_forward_gives_way_to_the_eager_passes(monkeypatch, inplace):
    seen = _timed(monkeypatch, 20.0, 10.0)
    model, x = _model(), torch.randn(8, 32)
    with torch.no_grad():
        ref = model(x)
    kept = []
    real_drop = choice.drop_compiled

    def watching_drop(m):
        kept.append(weakref.ref(m.__dict__["forward"]))
        real_drop(m)
    monkeypatch.setattr(choice, "drop_compiled", watching_drop)
    fast = cpuboost.optimize(model, graph_mode=True, sample_input=x, inplace=inplace)
    assert seen == [2]
    assert (fast is model) == inplace
    assert not isinstance(fast.__dict__.get("forward"), CompiledForward)
    assert kept and kept[0]() is None  # the compiled forward (and its graphs) were freed
    report = cpuboost.report_of(fast)
    graph = report.pass_named("graph_mode")
    assert graph.dropped and "20.0 ms" in graph.dropped and "graph break" in graph.dropped
    assert report.applied("prepack")  # the eager passes ran
    assert any("graph_mode=True was not used" in w for w in report.warnings)
    assert report.numerics.passed
    with torch.no_grad():
        assert rel_err(ref, fast(x)) <= 1e-4


@pytest.mark.parametrize("compiled_ms,kept", [(9.0, True), (9.5, False)])
def test_a_compiled_forward_is_kept_only_if_faster_by_the_margin(monkeypatch, compiled_ms, kept):
    _timed(monkeypatch, compiled_ms, 10.0)
    model, x = _model(), torch.randn(8, 32)
    fast = cpuboost.optimize(model, graph_mode=True, sample_input=x)
    assert isinstance(fast.__dict__.get("forward"), CompiledForward) == kept
    graph = cpuboost.report_of(fast).pass_named("graph_mode")
    assert bool(graph.dropped) != kept
    if kept:
        assert any(f"{compiled_ms:.1f} ms" in n and n.endswith("kept") for n in graph.notes)


def test_a_forward_without_graph_breaks_is_not_timed(monkeypatch):
    seen = _timed(monkeypatch, 99.0, 1.0)
    model, x = _model(_Whole), torch.randn(8, 32)
    fast = cpuboost.optimize(model, graph_mode=True, sample_input=x)
    assert seen == []
    assert isinstance(fast.__dict__.get("forward"), CompiledForward)


def test_best_ms_times_every_call_in_turns():
    order = []
    out = choice.best_ms(lambda: order.append("a"), lambda: order.append("b"))
    assert order == ["a", "b"] * (1 + choice.ROUNDS)
    assert len(out) == 2 and all(t >= 0 for t in out)
