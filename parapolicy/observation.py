"""Observations as a policy reads them: key aliases, flattening, camera frames, the pose a hold keeps.

One copy, numpy only (no torch, no robosuite), used by the policy (``DiffusionPolicy.act``), the server's
protocol, the client and the chunk executor (``parapolicy.realtime``). An observation is robosuite's obs
dict (or robomimic's, or the env's) or a flat float vector ``[obs_dim]`` in the order of the policy's
``obs_keys``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

# A policy's obs key -> the name robosuite's own observation dict gives it (robomimic / Diffusion Policy
# call the object vector "object", robosuite "object-state").
OBS_KEY_ALIASES = {"object": "object-state"}
# what an absolute-pose hold reads: the controller frame's observed pose (the grip site)
POSE_KEYS = ("robot0_eef_pos", "robot0_eef_quat_site")


def dict_keys(obs: Mapping[str, Any], obs_keys: Sequence[str]) -> list[str]:
    """The keys of ``obs`` that hold the policy's ``obs_keys`` (aliases resolved; missing ones kept as is)."""
    return [k if k in obs else OBS_KEY_ALIASES.get(k, k) for k in obs_keys]


def flatten_observation(obs: Any, obs_keys: Sequence[str], obs_dim: int, *, sequences: bool = True) -> np.ndarray:
    """One observation -> float32 ``[obs_dim]``, checked for keys, shape and NaN/inf (ValueError naming the
    problem). ``obs``: a dict holding ``obs_keys`` (or their aliases), or a flat array / torch tensor (and,
    with ``sequences``, a list or tuple of numbers, as a msgpack client may send)."""
    if isinstance(obs, Mapping):
        keys = dict_keys(obs, obs_keys)
        missing = [k for k, key in zip(obs_keys, keys) if key not in obs]
        if missing:
            raise ValueError(f"observation dict lacks keys {missing} (policy needs {list(obs_keys)})")
        flat = np.concatenate([np.asarray(obs[k], dtype=np.float32).reshape(-1) for k in keys]) if keys \
            else np.zeros(0, np.float32)
        if flat.shape != (obs_dim,):
            raise ValueError(f"observation keys {list(obs_keys)} give {flat.shape[0]} values, policy expects "
                             f"obs_dim={obs_dim}")
    else:
        if hasattr(obs, "detach"):  # a torch tensor
            obs = obs.detach().cpu().numpy()
        if not isinstance(obs, np.ndarray) and not (sequences and isinstance(obs, (list, tuple))):
            raise ValueError(f"observation must be a dict or an array, got {type(obs).__name__}")
        flat = np.asarray(obs, dtype=np.float32)
        if flat.shape != (obs_dim,):
            raise ValueError(f"flat observation must have shape ({obs_dim},) (keys {list(obs_keys)}), "
                             f"got {flat.shape}")
    if not np.isfinite(flat).all():
        raise ValueError("observation contains NaN or inf")
    return flat


def camera_frames(obs: Any, image_keys: Sequence[str], image_shape: Sequence[int]) -> dict[str, np.ndarray]:
    """The cameras of an obs dict as uint8 ``{key: [3, H, W]}``: upright ``[H, W, 3]`` (the env's ``raw_obs``,
    robomimic's datasets) or channel-first ``[3, H, W]`` (the env's gym observation)."""
    if not isinstance(obs, Mapping):
        raise ValueError(f"this policy sees cameras {list(image_keys)}: pass the observation dict, not an array")
    frames = {}
    for key in image_keys:
        if key not in obs:
            raise ValueError(f"observation dict lacks camera {key!r} (policy needs {list(image_keys)}); "
                             "make the env with its image task, e.g. make_env('lift_image')")
        frame = np.asarray(obs[key])
        if frame.ndim == 3 and frame.shape[-1] == 3 and frame.shape[0] != 3:
            frame = frame.transpose(2, 0, 1)  # upright [H, W, 3] -> channel-first
        if list(frame.shape) != list(image_shape) or frame.dtype != np.uint8:
            raise ValueError(f"obs[{key!r}] must be uint8 [H, W, 3] or [3, H, W] with [3, H, W] = "
                             f"{list(image_shape)}, got {frame.dtype} {list(np.shape(obs[key]))}")
        frames[key] = np.ascontiguousarray(frame)
    return frames


def reduced_observation(obs: Any, obs_keys: Sequence[str], obs_dim: int, image_keys: Sequence[str],
                        image_shape: Sequence[int]) -> dict[str, np.ndarray]:
    """An image policy's observation, checked, reduced to what the policy reads: ``{obs_key: float32 [...],
    image_key: uint8 [3, H, W]}`` (what a client sends: robosuite's other keys stay home)."""
    flatten_observation(obs, obs_keys, obs_dim)  # keys, size, NaN/inf
    kept = {key: np.asarray(obs[name], dtype=np.float32) for key, name in zip(obs_keys, dict_keys(obs, obs_keys))}
    kept.update(camera_frames(obs, image_keys, image_shape))
    return kept


def split_flat(flat: np.ndarray, obs_keys: Sequence[str], sizes: Sequence[int]) -> dict[str, np.ndarray]:
    """A flat ``[obs_dim]`` row back into ``{key: [size]}`` (the inverse of flattening a dict)."""
    out, offset = {}, 0
    for key, size in zip(obs_keys, sizes):
        out[key], offset = flat[offset:offset + size], offset + size
    return out


def window_arrays(windows: Sequence[Sequence[Any]], obs_keys: Sequence[str], obs_dim: int,
                  image_keys: Sequence[str] = ()) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One observation window per robot (oldest first; flat vectors or obs dicts) -> float32
    ``[B, n_obs_steps, obs_dim]`` and, for ``image_keys``, ``{key: uint8 [B, n_obs_steps, 3, H, W]}``
    (the frames as the window holds them)."""
    flat = np.stack([np.stack([obs if not isinstance(obs, Mapping) else flatten_observation(obs, obs_keys, obs_dim)
                               for obs in window]).astype(np.float32) for window in windows])
    images = {key: np.stack([np.stack([obs[key] for obs in window]) for window in windows]) for key in image_keys}
    return flat, images


def pose_hold_command(obs: Mapping[str, Any], gripper: float) -> np.ndarray:
    """The absolute OSC_POSE command that keeps the arm where ``obs`` sees it, float32 ``[7]``: the grip
    site's position and orientation (axis-angle, angle in [0, pi]) and ``gripper``. The env's
    ``info["hold_action"]`` for ``control="absolute"`` is this, so the simulator's runner and a robot loop
    (``AsyncPolicy``) hold alike."""
    if not isinstance(obs, Mapping) or any(key not in obs for key in POSE_KEYS):
        raise ValueError(f"holding an absolute-pose arm still needs its observed pose: an obs dict with "
                         f"{list(POSE_KEYS)}")
    quat = np.asarray(obs[POSE_KEYS[1]], dtype=np.float64).reshape(4)  # (x, y, z, w)
    norm = float(np.linalg.norm(quat))
    quat = quat / norm if norm > 0 else np.array([0.0, 0.0, 0.0, 1.0])
    quat *= np.sign(quat[3]) or 1.0
    w = min(max(float(quat[3]), -1.0), 1.0)
    half_sin = math.sqrt(1.0 - w * w)
    axis_angle = np.zeros(3) if math.isclose(half_sin, 0.0) else quat[:3] * 2.0 * math.acos(w) / half_sin
    position = np.asarray(obs[POSE_KEYS[0]], dtype=np.float64).reshape(3)
    return np.concatenate([position, axis_angle, [gripper]]).astype(np.float32)
