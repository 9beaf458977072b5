"""Run work on chosen cores: CPUPool, pin, Task, MultiStreamModule (IPEX's runtime names), on
the GNU OpenMP torch ships; keep_freed_memory sets glibc's malloc as `cpuboost run` does."""
from cpuboost._memory import keep_freed_memory
from cpuboost.runtime.multi_stream import MultiStreamModule
from cpuboost.runtime.pool import CPUPool, pin
from cpuboost.runtime.split import MultiStreamModuleHint, embedding_bag_split
from cpuboost.runtime.task import Future, Task

__all__ = ["CPUPool", "Future", "MultiStreamModule", "MultiStreamModuleHint", "Task",
           "embedding_bag_split", "keep_freed_memory", "pin"]
