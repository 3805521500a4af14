"""Rotation conversions for absolute-action policies: 6D representation <-> matrix <-> axis-angle.

Conventions are Diffusion Policy's (its ``RotationTransformer`` calls pytorch3d):

- a rotation matrix ``R [..., 3, 3]`` maps body to world coordinates (``v_world = R @ v_body``);
- the 6D representation (Zhou et al., 2019) is the first two *rows* of ``R``, ``[R[0, :], R[1, :]]``;
  back to a matrix by Gram-Schmidt on those rows, so any 6 numbers with independent halves give a
  rotation (a network's output need not be orthonormal);
- axis-angle is ``angle * unit_axis`` (robosuite's and scipy's ``rotvec``); this module returns angles in
  [0, pi], as pytorch3d does since it standardised ``matrix_to_quaternion`` (Dec 2023): the same vectors.
  DP pins pytorch3d 0.7.0, which returns the other axis-angle of the same rotation (``-axis``,
  ``2 pi - angle``) for about 38% of random rotations; robosuite turns either into the same matrix, so the
  command is the same (measured against both versions' ``rotation_conversions``: <= 5e-15 rad apart).

Pure torch, any batch shape ``[...]``, any floating dtype (use float64 where accuracy matters: the
action adapter does).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = [
    "axis_angle_to_matrix",
    "axis_angle_to_rotation_6d",
    "matrix_to_axis_angle",
    "matrix_to_quaternion",
    "matrix_to_rotation_6d",
    "rotation_6d_to_axis_angle",
    "rotation_6d_to_matrix",
]

# Below this (an angle in rad, or sin(angle / 2)) series replace sin(t) / t, (1 - cos t) / t^2 and
# t / sin(t / 2): truncated after the t^2 term, their relative error there is ~1e-17, while the closed
# forms lose digits to cancellation (or divide 0 by 0).
_SMALL_ANGLE = 1e-4


def _check_last(x: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if tuple(x.shape[x.ndim - len(shape):]) != shape or x.ndim < len(shape):
        raise ValueError(f"{name} must have shape [..., {', '.join(map(str, shape))}], got {list(x.shape)}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    return x


def rotation_6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """``[..., 6]`` (two rows, not necessarily orthonormal) -> rotation matrices ``[..., 3, 3]``."""
    d6 = _check_last(d6, (6,), "d6")
    row0 = F.normalize(d6[..., :3], dim=-1)
    row1 = d6[..., 3:] - (row0 * d6[..., 3:]).sum(-1, keepdim=True) * row0  # drop the part along row 0
    row1 = F.normalize(row1, dim=-1)
    row2 = torch.linalg.cross(row0, row1, dim=-1)  # right-handed: det = +1
    return torch.stack((row0, row1, row2), dim=-2)


def matrix_to_rotation_6d(matrix: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` -> ``[..., 6]``: the first two rows, row-major."""
    matrix = _check_last(matrix, (3, 3), "matrix")
    return matrix[..., :2, :].reshape(*matrix.shape[:-2], 6)


def _skew(v: torch.Tensor) -> torch.Tensor:
    """``[..., 3]`` -> the cross-product matrices ``[..., 3, 3]`` (``skew(v) @ u = v x u``)."""
    zero = torch.zeros_like(v[..., 0])
    x, y, z = v.unbind(-1)
    return torch.stack((zero, -z, y, z, zero, -x, -y, x, zero), dim=-1).reshape(*v.shape[:-1], 3, 3)


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """``[..., 3]`` (angle * unit axis) -> rotation matrices ``[..., 3, 3]`` (Rodrigues' formula)."""
    axis_angle = _check_last(axis_angle, (3,), "axis_angle")
    angle = axis_angle.norm(dim=-1)[..., None, None]
    small = angle < _SMALL_ANGLE
    safe = torch.where(small, torch.ones_like(angle), angle)
    # R = I + a K + b K^2 with K = skew(axis_angle): a = sin(t) / t, b = (1 - cos t) / t^2
    a = torch.where(small, 1.0 - angle**2 / 6.0, torch.sin(safe) / safe)
    b = torch.where(small, 0.5 - angle**2 / 24.0, (1.0 - torch.cos(safe)) / safe**2)
    k = _skew(axis_angle)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def matrix_to_quaternion(matrix: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` -> unit quaternions ``[..., 4]`` as (w, x, y, z) with w >= 0.

    Each of w, x, y, z can be read from the diagonal; the largest is the well-conditioned one (a small
    one divides by ~0), so every row is computed from its largest component.
    """
    matrix = _check_last(matrix, (3, 3), "matrix")
    m = matrix.reshape(*matrix.shape[:-2], 9)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.unbind(-1)
    # 4 q_i^2 for i = w, x, y, z
    four_sq = torch.stack((1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22), -1)
    root = four_sq.clamp_min(0).sqrt()  # 2 |q_i|
    # Row i: the quaternion scaled by 4 q_i, which only needs off-diagonal sums and differences besides 4 q_i^2.
    scaled = torch.stack((
        torch.stack((four_sq[..., 0], m21 - m12, m02 - m20, m10 - m01), -1),
        torch.stack((m21 - m12, four_sq[..., 1], m01 + m10, m02 + m20), -1),
        torch.stack((m02 - m20, m01 + m10, four_sq[..., 2], m12 + m21), -1),
        torch.stack((m10 - m01, m02 + m20, m12 + m21, four_sq[..., 3]), -1),
    ), -2)  # [..., 4, 4]
    best = four_sq.argmax(-1, keepdim=True)  # [..., 1]
    row = scaled.gather(-2, best[..., None].expand(*best.shape, 4)).squeeze(-2)
    quat = row / (2.0 * root.gather(-1, best))  # 4 q_best q_j / (2 * 2 |q_best|) = q_j * sign(q_best)
    quat = torch.where(quat[..., :1] < 0, -quat, quat)  # q and -q are one rotation: pick w >= 0
    return F.normalize(quat, dim=-1)


def matrix_to_axis_angle(matrix: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` -> axis-angle ``[..., 3]`` with the angle in [0, pi]."""
    quat = matrix_to_quaternion(matrix)
    w, xyz = quat[..., :1], quat[..., 1:]
    sin_half = xyz.norm(dim=-1, keepdim=True)
    angle = 2.0 * torch.atan2(sin_half, w)  # in [0, pi] since w >= 0
    small = sin_half < _SMALL_ANGLE
    # angle / sin(angle / 2) = 2 atan(s / w) / s = (2 / w) (1 - s^2 / (3 w^2) + O(s^4)) for s = sin(angle / 2)
    w_safe = w.clamp_min(0.5)  # w ~ 1 wherever the series is used
    series = (2.0 / w_safe) * (1.0 - sin_half**2 / (3.0 * w_safe**2))
    factor = torch.where(small, series, angle / torch.where(small, torch.ones_like(sin_half), sin_half))
    return xyz * factor


def rotation_6d_to_axis_angle(d6: torch.Tensor) -> torch.Tensor:
    """``[..., 6]`` -> axis-angle ``[..., 3]``: Diffusion Policy's ``RotationTransformer('axis_angle',
    'rotation_6d').inverse``."""
    return matrix_to_axis_angle(rotation_6d_to_matrix(d6))


def axis_angle_to_rotation_6d(axis_angle: torch.Tensor) -> torch.Tensor:
    """axis-angle ``[..., 3]`` -> ``[..., 6]``: that transformer's ``forward`` (how DP builds its
    absolute-action datasets)."""
    return matrix_to_rotation_6d(axis_angle_to_matrix(axis_angle))
