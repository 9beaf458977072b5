"""Dropout is the identity in eval; replacing it saves a module call per use."""
from torch import nn

from cpuboost.passes._context import PassContext, has_user_hooks, replace_module


class DropoutIdentity(nn.Identity):
    """Keeps ``p``/``inplace`` so code that reads ``self.dropout.p`` still works."""

    def __init__(self, p: float = 0.0, inplace: bool = False):
        super().__init__()
        self.p, self.inplace = p, inplace

    def extra_repr(self) -> str:
        return f"p={self.p} (removed for inference)"


def remove_dropout(model: nn.Module, ctx: PassContext) -> nn.Module:
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.modules.dropout._DropoutNd):
            continue
        if has_user_hooks(m):
            ctx.record.skip(name, "has forward hooks, which would stop firing")
            continue
        replace_module(model, m, DropoutIdentity(m.p, m.inplace))
        ctx.record.apply(name)
    return model
