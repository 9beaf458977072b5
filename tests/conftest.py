import pytest
import torch

from cpuboost.testing import TOY_MODELS, build_eval

BF16_RTOL = 5e-2  # relative to each output's largest magnitude (see cpuboost.verify)
FP32_RTOL = 1e-4


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


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
