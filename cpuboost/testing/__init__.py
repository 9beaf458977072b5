from cpuboost.testing.toy_models import TOY_MODELS, ToyCase, build_eval

__all__ = ["TOY_MODELS", "ToyCase", "build_eval"]
