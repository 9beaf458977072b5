"""Small models that exercise every pass; tests run every pass on every one of them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNNet(nn.Module):
    """Conv+BN+ReLU blocks, a residual add, a ConvTranspose, Conv1d/Conv3d heads."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.conv_a = nn.Conv2d(16, 16, 3, padding="same", groups=2)
        self.bn_a = nn.BatchNorm2d(16)
        self.act_a = nn.SiLU()
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.bn_up = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.act_a(self.bn_a(self.conv_a(y)))  # residual
        y = self.bn_up(self.up(y))
        y = F.adaptive_avg_pool2d(self.head(y), 1).flatten(1)
        return self.fc(self.drop(y))


class Conv1d3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.b1 = nn.BatchNorm1d(8)
        self.c3 = nn.Conv3d(4, 6, 3, padding=1)
        self.b3 = nn.BatchNorm3d(6)
        self.act = nn.GELU()

    def forward(self, x1, x3):
        return self.act(self.b1(self.c1(x1))).mean(-1), torch.tanh(self.b3(self.c3(x3))).mean((2, 3, 4))


class MLPBN(nn.Module):
    """Linear + BatchNorm1d + activation, as in tabular and recommendation models."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(13, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Hardswish(),
                                 nn.Linear(32, 8), nn.Sigmoid())

    def forward(self, x):
        return self.net(x)


class ControlFlowNet(nn.Module):
    """Data-dependent Python control flow: no symbolic trace can capture this forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.alt = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        if x.mean() > -100:  # always true, but only known by running it
            y = F.relu(self.bn(self.conv(x)))
        else:
            y = self.alt(x)
        for _ in range(int(x.shape[0] > 0) + 1):
            y = y * 0.5
        return self.fc(y.mean((2, 3)))


class CustomMethodNet(nn.Module):
    """Inference goes through a custom method (IPEX skipped conv+bn folding here)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.scale = 2.0

    def forward(self, x):
        return self.bn(self.conv(x))

    def inference(self, x):
        return self.forward(x).sum((2, 3)) * self.scale


class HookedNet(nn.Module):
    """Forward hooks must keep firing; a hooked module must not lose what its hook observes."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SharedBranchNet(nn.Module):
    """A conv output used by a BN *and* elsewhere: folding would change the other use."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class BasicBlock(nn.Module):
    """torchvision-style residual block: one ReLU module used at three call sites."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class TinyRecommender(nn.Module):
    """EmbeddingBag (sum, bags of 3, per-sample weights) + Embedding + MLP, DLRM-style."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(50, 8, mode="sum")
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(13, 8), nn.ReLU())
        self.top = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, dense, ids, weights, cat):
        pooled = self.bag(ids, per_sample_weights=weights)  # ids: (B, 3) -> (B, 8)
        x = torch.cat([self.mlp(dense), pooled, self.emb(cat)], dim=1)
        return torch.sigmoid(self.top(x))


def transformer_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)


class MHANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 2)

    def forward(self, x):
        h = self.proj(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(a)


@dataclass(frozen=True)
class ToyCase:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple]  # batch -> positional args
    method: str = "forward"


def _img(b, c=3, s=12):
    return (torch.randn(b, c, s, s),)


TOY_MODELS = {
    c.name: c for c in [
        ToyCase("conv_bn", ConvBNNet, _img),
        ToyCase("conv1d_3d", Conv1d3dNet, lambda b: (torch.randn(b, 4, 20), torch.randn(b, 4, 5, 6, 6))),
        ToyCase("mlp_bn", MLPBN, lambda b: (torch.randn(max(b, 2), 13),)),
        ToyCase("control_flow", ControlFlowNet, _img),
        ToyCase("custom_method", CustomMethodNet, _img, method="inference"),
        ToyCase("hooked", HookedNet, lambda b: (torch.randn(b, 16),)),
        ToyCase("shared_branch", SharedBranchNet, _img),
        ToyCase("residual", ResidualNet, _img),
        ToyCase("recommender", TinyRecommender,
                lambda b: (torch.randn(b, 13), torch.randint(0, 50, (b, 3)), torch.rand(b, 3),
                           torch.randint(0, 20, (b,)))),
        ToyCase("transformer_encoder", transformer_encoder, lambda b: (torch.randn(b, 7, 32),)),
        ToyCase("mha", MHANet, lambda b: (torch.randn(b, 5, 16),)),
    ]
}


def build_eval(case: ToyCase, seed: int = 0) -> nn.Module:
    """A toy model with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = case.build()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()
