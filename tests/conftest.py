import contextlib
import importlib

import pytest
import torch
from torch import nn

from cpuboost.testing import TOY_MODELS, build_eval

BF16_RTOL = 5e-2  # relative to each output's largest magnitude (see cpuboost.verify)
FP32_RTOL = 1e-4


@contextlib.contextmanager
def one_thread():
    """For training a small model inside a test. Its many small ops on two OpenMP threads,
    beside the other test worker's two on the same two cores, spent most of their time
    waiting: the digits CNN's training took 8 s alone and 68 s in the parallel run."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _fusion_pays(request, monkeypatch):
    """fuse_pointwise times oneDNN's fused post-ops on the running CPU (on AVX2 GELU/SiLU/tanh
    fused were slower than apart); tests check the fusion itself, so it is allowed everywhere,
    except in tests marked measured_fusion: timings under the parallel test run are noise."""
    if request.node.get_closest_marker("measured_fusion") is None:
        module = importlib.import_module("cpuboost.passes.fuse_pointwise")  # the module, not
        monkeypatch.setattr(module, "fusing_pays", lambda op, dtype: True)  # the pass function
    yield


@pytest.fixture
def emulated_bf16(monkeypatch):
    """dtype=torch.bfloat16 as bf16 arithmetic (autocast) even on a CPU without bf16
    instructions, where cpuboost would hold bf16 weights for float32 arithmetic instead: for the
    tests of bf16 arithmetic's semantics (output dtypes, bf16 tables, oneDNN's bf16 kernels)."""
    for name in ("cpuboost.api", "cpuboost.llm.optimize", "cpuboost.deploy"):
        monkeypatch.setattr(importlib.import_module(name), "bf16_weights_only",
                            lambda dtype, hw: False)
    yield


def toy(name, seed=0):
    case = TOY_MODELS[name]
    return case, build_eval(case, seed)


def run(model, case, inputs):
    with torch.no_grad():
        fn = model if case.method == "forward" else getattr(model, case.method)
        return fn(*inputs)


def rel_err(ref, out):
    ref, out = ref.double(), out.double()
    return ((ref - out).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def same_at_every_thread_count(fn, counts=(1, 2, 3)) -> bool:
    """Whether ``fn()`` returns bitwise the same tensor at each torch thread count (IPEX gave
    different results when the thread count changed); the caller's count is restored."""
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in counts:
            torch.set_num_threads(t)
            outs.append(fn())
    finally:
        torch.set_num_threads(threads)
    return all(torch.equal(outs[0], o) for o in outs[1:])


def onednn_packs(dtype) -> bool:
    """Whether torch's oneDNN can pack ``dtype`` weights on this CPU (bf16 cannot on AVX2-only
    CPUs: tests of the bf16 oneDNN kernels skip there; the fallbacks are tested instead)."""
    from cpuboost.hw.features import detect, onednn_runs
    return onednn_runs(dtype, detect())


def skip_unless_onednn_packs(dtype) -> None:
    if not onednn_packs(dtype):
        pytest.skip(f"this CPU's oneDNN cannot pack {dtype} weights")


class TiedLM(nn.Module):
    """A language model whose head is tied to its token embedding (as GPT-2's or XLM-R's)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(500, 64)
        self.body = nn.Linear(64, 64)
        self.head = nn.Linear(64, 500)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.embed(ids))))
