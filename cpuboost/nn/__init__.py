from cpuboost.nn.folded import FoldedBatchNorm
from cpuboost.nn.fused import FusedConv, FusedConvTranspose, FusedLinear, set_backend
from cpuboost.nn.postops import POST_OPS, PostOp

__all__ = ["FoldedBatchNorm", "FusedConv", "FusedConvTranspose", "FusedLinear", "POST_OPS", "set_backend",
           "PostOp"]
