"""Min-max normalisation of observations and actions to [-1, 1] (Diffusion Policy's "limits" mode).

The statistics are plain tensors so they travel in the safetensors checkpoint next to the weights.
"""

from __future__ import annotations

import torch
from torch import nn

# Dimensions whose range is (almost) zero in the data (e.g. a static object coordinate) would blow
# up under 2 / (max - min); like DP, map them to the centre of the range instead.
_MIN_RANGE = 1e-4


class MinMaxNormalizer(nn.Module):
    """Affine map ``x -> 2 (x - min) / (max - min) - 1`` per feature; ``x [..., dim]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("min", torch.full((dim,), -1.0))
        self.register_buffer("max", torch.full((dim,), 1.0))

    @classmethod
    def fit(cls, data: torch.Tensor) -> "MinMaxNormalizer":
        """Fit on ``data [N, dim]`` (or any ``[..., dim]``)."""
        data = torch.as_tensor(data, dtype=torch.float32).reshape(-1, data.shape[-1])
        norm = cls(data.shape[-1])
        norm.set_stats(data.min(dim=0).values, data.max(dim=0).values)
        return norm

    def set_stats(self, min_: torch.Tensor, max_: torch.Tensor) -> None:
        self.min.copy_(torch.as_tensor(min_, dtype=torch.float32))
        self.max.copy_(torch.as_tensor(max_, dtype=torch.float32))

    def _scale_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.max - self.min
        flat = span < _MIN_RANGE
        scale = torch.where(flat, torch.ones_like(span), 2.0 / span.clamp_min(_MIN_RANGE))
        # Flat dimensions map to 0: offset = -min * scale so that x == min -> 0.
        offset = torch.where(flat, -self.min, -1.0 - self.min * scale)
        return scale, offset

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        scale, offset = self._scale_offset()
        return x * scale + offset

    def unnormalize(self, y: torch.Tensor) -> torch.Tensor:
        scale, offset = self._scale_offset()
        return (y - offset) / scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x)


class PolicyNormalizer(nn.Module):
    """The pair of normalisers a policy needs: ``obs`` ``[..., obs_dim]`` and ``action`` ``[..., action_dim]``.

    State dict keys: ``obs.min``, ``obs.max``, ``action.min``, ``action.max``.
    """

    def __init__(self, obs_dim: int, action_dim: int):
        super().__init__()
        self.obs = MinMaxNormalizer(obs_dim)
        self.action = MinMaxNormalizer(action_dim)

    @classmethod
    def fit(cls, obs: torch.Tensor, actions: torch.Tensor) -> "PolicyNormalizer":
        norm = cls(obs.shape[-1], actions.shape[-1])
        norm.obs = MinMaxNormalizer.fit(obs)
        norm.action = MinMaxNormalizer.fit(actions)
        return norm
