import pytest
import torch

from cpuboost import OptimizeConfig
from cpuboost.errors import ConfigError

FLAGS = ["conv_bn_folding", "linear_bn_folding", "weights_prepack",
         "replace_dropout_with_identity"]


@pytest.mark.parametrize("level, expected", [("O1", True), ("O0", False)])
def test_level_defaults_like_ipex(level, expected):
    cfg = OptimizeConfig.from_ipex(level=level)
    assert all(getattr(cfg, f) is expected for f in FLAGS)
    assert cfg.explicit == frozenset()


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("value", [True, False])
def test_explicit_flag_overrides_level(flag, value):
    cfg = OptimizeConfig.from_ipex(level="O0" if value else "O1", **{flag: value})
    assert getattr(cfg, flag) is value and flag in cfg.explicit


def test_config_is_frozen_and_validated():
    cfg = OptimizeConfig(dtype=torch.bfloat16)
    with pytest.raises(Exception):
        cfg.dtype = None
    assert cfg.low_precision and cfg.compute_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="must be True or False"):
        OptimizeConfig(weights_prepack="yes")
    with pytest.raises(ConfigError, match="unknown option"):
        OptimizeConfig.from_ipex(auto_kernel_selection=True)
