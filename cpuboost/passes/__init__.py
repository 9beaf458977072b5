from cpuboost.passes._context import PassContext, replace_module, weight_bytes
from cpuboost.passes.autocast_scope import autocast_scope
from cpuboost.passes.embedding_tables import embedding_tables
from cpuboost.passes.fold_bn import fold_bn
from cpuboost.passes.fuse_add import fuse_add
from cpuboost.passes.fuse_pointwise import fuse_pointwise
from cpuboost.passes.prepack import prepack
from cpuboost.passes.remove_dropout import remove_dropout
from cpuboost.passes.transformer_layers import transformer_layers

__all__ = ["PassContext", "autocast_scope", "embedding_tables", "fold_bn", "fuse_add", "fuse_pointwise", "prepack",
           "remove_dropout", "replace_module", "transformer_layers", "weight_bytes"]
