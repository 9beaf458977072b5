from cpuboost.compile.backend import cpuboost_backend, inductor_scope, scope

__all__ = ["cpuboost_backend", "inductor_scope", "scope"]
