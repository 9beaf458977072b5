"""Run work on chosen cores: CPUPool, pin, Task, MultiStreamModule (IPEX's runtime names), on
the GNU OpenMP torch ships."""
from cpuboost.runtime.multi_stream import MultiStreamModule
from cpuboost.runtime.pool import CPUPool, pin
from cpuboost.runtime.split import MultiStreamModuleHint, embedding_bag_split
from cpuboost.runtime.task import Future, Task

__all__ = ["CPUPool", "Future", "MultiStreamModule", "MultiStreamModuleHint", "Task",
           "embedding_bag_split", "pin"]
