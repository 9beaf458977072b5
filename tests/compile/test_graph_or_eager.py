"""optimize(graph_mode=True, sample_input=...) on a forward with graph breaks: compiled and
eager passes are timed on the sample, the faster is returned, the report says which."""
import pytest
import torch
from torch import nn

import cpuboost
from cpuboost import api
from tests.conftest import rel_err


class Broken(nn.Module):
    """Two blocks with a graph break between them (the code there runs eagerly)."""

    def __init__(self, breaks=True):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 8)
        self.breaks = breaks

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.breaks:
            torch._dynamo.graph_break()
        return self.b(h)


def _timed(monkeypatch, graph_ms, eager_ms):
    calls = []

    def fake(models, call, rounds=3):
        calls.append(models)
        return [graph_ms, eager_ms]
    monkeypatch.setattr(api, "time_calls", fake)
    return calls


@pytest.mark.parametrize("eager_faster", [True, False])
def test_the_faster_of_compiled_and_eager_passes_is_returned(monkeypatch, eager_faster):
    timed = _timed(monkeypatch, 5.0, 4.0 if eager_faster else 6.0)
    torch._dynamo.reset()
    model = Broken().eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        ref = model(x)
        fast = cpuboost.optimize(model, graph_mode=True, sample_input=x)
        out = fast(x)
    assert len(timed) == 1
    compiled = "forward" in fast.__dict__ and hasattr(fast.__dict__["forward"], "graphs")
    assert compiled != eager_faster
    assert rel_err(ref, out) <= 1e-5
    report = cpuboost.report_of(fast)
    if eager_faster:
        (skipped,) = report.pass_named("graph_mode").skipped
        assert "1 graph break(s) ran 5.0 ms" in skipped[1] and "eager passes kept" in skipped[1]
        assert report.pass_named("prepack").applied  # the eager plan ran
    else:
        assert any("the eager passes 6.0 ms" in n and n.endswith("compiled kept")
                   for n in report.pass_named("graph_mode").notes)


def test_no_timing_without_graph_breaks_or_with_inplace(monkeypatch):
    timed = _timed(monkeypatch, 5.0, 1.0)
    torch._dynamo.reset()
    x = torch.randn(4, 32)
    fast = cpuboost.optimize(Broken(breaks=False).eval(), graph_mode=True, sample_input=x)
    assert fast.__dict__["forward"].breaks == 0
    model = Broken().eval()
    same = cpuboost.optimize(model, graph_mode=True, sample_input=x, inplace=True)
    assert same is model and same.__dict__["forward"].breaks == 1
    assert any("not timed against the eager passes" in n
               for n in cpuboost.report_of(same).pass_named("graph_mode").notes)
    assert not timed
