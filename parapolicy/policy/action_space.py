"""What a policy's action vector means, and the robosuite command it becomes.

``DiffusionPolicyConfig.action_space`` names it:

- ``delta`` (parapolicy's own policies, DP's ``abs_action=False``): robosuite's OSC_POSE delta command,
  7 per arm, sent to the env as it is;
- ``absolute_rot6d`` (DP's ``abs_action=True``, its published image policies): the target end-effector
  pose in the world frame, 10 per arm: position (3, m), rotation in the 6D representation (6, the first
  two rows of the rotation matrix, see ``parapolicy.policy.rotation``) and the gripper (1). Before the
  env it becomes robosuite's OSC_POSE *absolute* command, 7 per arm: position, axis-angle, gripper
  (DP's ``undo_transform_action``). The env must run the OSC controller with absolute input in the
  world frame (``parapolicy.envs``: the ``*_abs`` tasks, ``control="absolute"``).

Two arms (DP's transport task, 20 -> 14) convert arm by arm. Converting in float64 keeps the
axis-angle exact to ~1e-15 rad; the result has the input's type (numpy or torch) and dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# per-arm width of the policy's action, and of the env command it becomes
ARM_DIMS = {"delta": 7, "absolute_rot6d": 10}
ENV_ARM_DIM = 7
ACTION_SPACES = tuple(ARM_DIMS)


def check_action_space(space: str, action_dim: int) -> None:
    """ValueError unless ``space`` is known and ``action_dim`` is a whole number of its arms."""
    if space not in ARM_DIMS:
        raise ValueError(f"action_space must be one of {', '.join(ACTION_SPACES)}, got {space!r}")
    per_arm = ARM_DIMS[space]
    if space != "delta" and (action_dim < per_arm or action_dim % per_arm):
        raise ValueError(f"action_space={space!r} needs {per_arm} values per arm (position 3, 6D rotation 6, "
                         f"gripper 1), got action_dim={action_dim}")


def env_action_dim(space: str, action_dim: int) -> int:
    """Width of the env command a policy with ``action_dim`` outputs in ``space`` becomes."""
    check_action_space(space, action_dim)
    return action_dim if space == "delta" else action_dim // ARM_DIMS[space] * ENV_ARM_DIM


def to_env_action(action: Any, space: str) -> Any:
    """Policy actions ``[..., action_dim]`` -> env commands ``[..., env_action_dim]`` (numpy or torch)."""
    if space == "delta":
        return action
    check_action_space(space, int(action.shape[-1]))
    from parapolicy.policy.rotation import rotation_6d_to_axis_angle

    x, restore = _as_float64(action)
    arms = x.reshape(*x.shape[:-1], -1, ARM_DIMS[space])  # [..., arms, 10]
    axis_angle = rotation_6d_to_axis_angle(arms[..., 3:9])
    command = _cat([arms[..., :3], axis_angle, arms[..., 9:]])  # [..., arms, 7]
    return restore(command.reshape(*x.shape[:-1], -1))


def from_env_action(command: Any, space: str) -> Any:
    """Env commands ``[..., 7 * arms]`` -> policy actions in ``space`` (e.g. to express a robosuite
    absolute command, such as holding the current pose, in the policy's own terms)."""
    if space == "delta":
        return command
    if command.shape[-1] % ENV_ARM_DIM:
        raise ValueError(f"an env command has {ENV_ARM_DIM} values per arm, got {command.shape[-1]}")
    from parapolicy.policy.rotation import axis_angle_to_rotation_6d

    x, restore = _as_float64(command)
    arms = x.reshape(*x.shape[:-1], -1, ENV_ARM_DIM)
    action = _cat([arms[..., :3], axis_angle_to_rotation_6d(arms[..., 3:6]), arms[..., 6:]])
    return restore(action.reshape(*x.shape[:-1], -1))


def _as_float64(x: Any):
    """``x`` as a float64 torch tensor, and the function that turns a result back into ``x``'s kind."""
    import torch

    if isinstance(x, torch.Tensor):
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return x.to(torch.float64), lambda y: y.to(dtype)
    array = np.asarray(x)
    dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.float32
    return torch.from_numpy(array.astype(np.float64)), lambda y: y.numpy().astype(dtype)


def _cat(parts):
    import torch

    return torch.cat(parts, dim=-1)
