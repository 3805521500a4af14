"""Robosuite tasks as gymnasium environments, and scripted experts on privileged state.

Imported as ``parapolicy.envs`` (pyproject maps ``envs/`` there). Knows nothing of diffusion.
"""

from parapolicy.envs.robosuite_env import GYM_IDS, TASKS, RobosuiteEnv, TaskSpec, flatten_obs, get_task, make_env, register_envs

register_envs()

__all__ = ["GYM_IDS", "TASKS", "RobosuiteEnv", "TaskSpec", "flatten_obs", "get_task", "make_env", "register_envs"]
