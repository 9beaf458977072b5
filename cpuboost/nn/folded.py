"""What a BatchNorm becomes once folded into the conv/linear before it."""
from __future__ import annotations

import torch
from torch import nn


class FoldedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm whose effect now lives in its producer's weights: forward is the identity.

    It keeps the BatchNorm's parameters and buffers (a few vectors), so ``state_dict()`` has the
    original keys, and a checkpoint loaded into it re-folds the producer.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _check_input_dim(self, x):  # accepts whatever the producer emits
        pass

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        producer = self.__dict__.get("_producer")
        if producer is not None:
            producer.refold()

    def fold_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) such that bn(y) == y * scale + shift per channel, in fp32."""
        var = self.running_var.float()
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.detach().float()
        shift = -self.running_mean.float() * scale
        if self.bias is not None:
            shift = shift + self.bias.detach().float()
        return scale, shift

    def extra_repr(self) -> str:
        producer = self.__dict__.get("_producer")
        return f"{self.num_features}, folded into {type(producer).__name__}"


def fold_into(bn: nn.modules.batchnorm._BatchNorm, producer: nn.Module) -> FoldedBatchNorm:
    """Turn ``bn`` (a plain BatchNorm1d/2d/3d) into a FoldedBatchNorm in place, linked to
    ``producer``. The class change keeps its tensors, hooks and attributes."""
    bn.__class__ = FoldedBatchNorm
    # object.__setattr__: a back-reference, not a submodule (it must not enter state_dict);
    # deepcopy and pickle keep it pointing at the copied producer through their memo.
    object.__setattr__(bn, "_producer", producer)
    return bn
