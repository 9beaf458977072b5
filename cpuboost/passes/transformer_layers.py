"""Let nn.TransformerEncoderLayer run through its submodules, so packed Linears are used.

Its eval fast path (``torch._transformer_encoder_layer_fwd``) reads ``linear1.weight`` etc. as
tensors and bypasses the modules; IPEX crashed there under bf16 prepacking. The layer keeps its
class interface (a subclass), parameters and hooks; only the path through forward changes.
"""
from __future__ import annotations

import torch
from torch import nn

from cpuboost.passes._context import PassContext


class ModularTransformerEncoderLayer(nn.TransformerEncoderLayer):
    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        # Same arithmetic as nn.TransformerEncoderLayer's non-fast path.
        src_key_padding_mask = nn.functional._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask",
            other_type=nn.functional._none_or_dtype(src_mask), other_name="src_mask",
            target_type=src.dtype)
        src_mask = nn.functional._canonical_mask(
            mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
            target_type=src.dtype, check_other=False)
        if torch._C._get_tracing_state() is not None and torch.is_autocast_enabled("cpu"):
            # MultiheadAttention's fast path, which the stock layer's fused path avoided, would
            # hand torch.jit.trace bf16 weights autocast cached before it began: not traceable
            torch.clear_autocast_cache()
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        if torch.is_autocast_enabled("cpu"):
            # The stock layer takes its fused fast path under CPU autocast (its autocast check
            # looks at CUDA only) and returns the autocast dtype; return what it would.
            x = x.to(torch.get_autocast_dtype("cpu"))
        return x


def transformer_layers(model: nn.Module, ctx: PassContext) -> nn.Module:
    for name, m in model.named_modules():
        if type(m) is nn.TransformerEncoderLayer:
            m.__class__ = ModularTransformerEncoderLayer
            ctx.record.apply(f"{name}: runs through its submodules (no fused fast path)")
        elif type(m) is nn.TransformerEncoder and getattr(m, "use_nested_tensor", False):
            # nested tensors would reach the packed Linears, which take dense tensors only
            m.use_nested_tensor = False
            ctx.record.apply(f"{name}: nested-tensor fast path off")
    return model


__all__ = ["transformer_layers", "ModularTransformerEncoderLayer"]
