"""`cpuboost run`: plan instances from the CPU topology (pure, testable), then execute them."""
from cpuboost.launch.plan import Instance, LaunchOptions, Machine, Plan, plan

__all__ = ["Instance", "LaunchOptions", "Machine", "Plan", "plan"]
