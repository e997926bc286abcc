"""Process groups and collectives: the only package of dist_lora that calls torch.distributed."""

from dist_lora.parallel.groups import ParallelGroups
from dist_lora.parallel.initialize import current_groups, initialize, reseed, shutdown
from dist_lora.parallel.launch_env import LaunchEnv, LaunchError, detect

__all__ = ["LaunchEnv", "LaunchError", "ParallelGroups", "current_groups", "detect", "initialize", "reseed",
           "shutdown"]
