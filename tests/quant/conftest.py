"""Shared by the autotune and SmoothQuant tests: a model whose default int8 recipe misses."""
import pytest
import torch
from torch import nn

from tests.quant.test_accuracy import _digits, _top1, _train


class OutlierMLP(nn.Module):
    """After training, channel 0 of fc2's input is scaled by 1000 and fc2's weight column by
    1/1000: the float function is unchanged, but a per-tensor int8 scale for fc2's input now
    spends its 256 levels on that channel."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 96), nn.Linear(96, 64), nn.Linear(64, 10)
        self.register_buffer("gain", torch.ones(96))

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1))) * self.gain
        return self.fc3(torch.relu(self.fc2(h)))

    def add_outlier(self):
        with torch.no_grad():
            self.gain[0] = 1000.0
            self.fc2.weight[:, 0] /= 1000.0
        return self


@pytest.fixture(scope="module")
def outlier_case():
    (xtr, ytr), (xte, yte) = _digits()
    torch.manual_seed(0)
    model = _train(OutlierMLP(), xtr, ytr).add_outlier()
    calib = [xtr[i:i + 64] for i in range(0, 512, 64)]
    return model, calib, lambda m: _top1(m, xte, yte)
