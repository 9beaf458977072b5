"""Importing cpuboost must change nothing in torch: no patches, no global flags, no logging."""
import subprocess
import sys

PROBE = r"""
import logging, torch, json
def snapshot():
    return {
        "tensor_methods": sorted((k, id(v)) for k, v in vars(torch.Tensor).items()),
        "functional": sorted((k, id(v)) for k, v in vars(torch.nn.functional).items()),
        "threads": torch.get_num_threads(),
        "interop": torch.get_num_interop_threads(),
        "grad": torch.is_grad_enabled(),
        "default_dtype": str(torch.get_default_dtype()),
        "mkldnn": torch.backends.mkldnn.enabled,
        "fp32_prec": torch.backends.mkldnn.matmul.fp32_precision
            if hasattr(torch.backends.mkldnn, "matmul") else None,
        "matmul_prec": torch.get_float32_matmul_precision(),
        "root_handlers": len(logging.getLogger().handlers),
        "root_level": logging.getLogger().level,
        "module_hooks": len(torch.nn.modules.module._global_forward_hooks),
        "dynamo_backends": None,
    }
before = snapshot()
import cpuboost
after = snapshot()
print(json.dumps([k for k in before if before[k] != after[k]]))
"""


def test_import_changes_nothing_in_torch():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
