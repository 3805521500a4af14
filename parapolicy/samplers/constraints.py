"""Known leading positions of the sample: a prefix imposed at every denoising step (inpainting).

Real-time chunking needs the new action chunk to agree with the actions the robot has already
committed to while it was planned. ``PrefixConstraint`` imposes them the RePaint way: before every model
evaluation at timestep ``t``, the first ``L`` positions of the point are replaced (or, with weights
below 1, blended) by the known values noised to ``t``'s level,

    x[:, :, :L] <- w * (sqrt(abar_t) * prefix + sqrt(1 - abar_t) * eta) + (1 - w) * x[:, :, :L],

and the final sample gets the same blend at abar = 1. ``eta`` is drawn once per call (not per
evaluation), so the constraint is a fixed function of the point and its timestep: the denoising map of
step i stays ``x -> F_i(x)``, and a parallel sampler (Picard, SRDS, ParaTAA) solves the same fixed-point
problem as the sequential one. A fresh draw per evaluation would not: each Picard round would see other
noise.

Shapes: the sample is ``[B, H, *rest]``; ``prefix`` ``[B, L, *rest]`` with ``L <= H``; ``weights``
``[B, L]`` in [0, 1] (1: the position is known exactly); ``eta`` like ``prefix``. The sampler's
``denoise(x [K, B, H, *rest], t [K])`` convention is kept (see ``parapolicy.samplers.base``).
"""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PrefixConstraint:
    """Impose ``prefix`` on the first positions of every point a denoiser sees, then on the sample.

    alphas_cumprod: ``[T]`` the training schedule's alpha_bar, indexed by timestep (the model's noise
    level at timestep t is alpha_bar[t] whatever the sampler's own stepping).
    """

    def __init__(self, prefix: torch.Tensor, weights: torch.Tensor, eta: torch.Tensor, alphas_cumprod: torch.Tensor):
        if prefix.ndim < 2:
            raise ValueError(f"prefix must be [B, L, ...], got shape {list(prefix.shape)}")
        if tuple(eta.shape) != tuple(prefix.shape):
            raise ValueError(f"prefix noise must have the prefix's shape {list(prefix.shape)}, got {list(eta.shape)}")
        if tuple(weights.shape) != tuple(prefix.shape[:2]):
            raise ValueError(f"prefix_weights must have shape [B, L] = {list(prefix.shape[:2])}, got {list(weights.shape)}")
        if not torch.isfinite(prefix).all() or not torch.isfinite(weights).all():
            raise ValueError("prefix and prefix_weights must be finite")
        if (weights < 0).any() or (weights > 1).any():
            raise ValueError("prefix_weights must lie in [0, 1]")
        self.length = prefix.shape[1]
        self.prefix, self.eta = prefix, eta
        self.weights = weights.reshape(*weights.shape, *([1] * (prefix.ndim - 2)))  # [B, L, 1, ...]
        self.alphas_cumprod = alphas_cumprod
        self._cache: dict = {}

    def _on(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(prefix, eta, weights, sqrt(abar) [T], sqrt(1 - abar) [T]) on ``like``'s device and dtype, made once:
        a parallel sampler calls the denoiser every round, so nothing is copied or re-derived per call."""
        key = (like.device, like.dtype)
        if key not in self._cache:
            abar = self.alphas_cumprod.to(device=like.device, dtype=torch.float64)
            self._cache[key] = (self.prefix.to(like), self.eta.to(like), self.weights.to(like),
                                abar.sqrt().to(like.dtype), (1 - abar).sqrt().to(like.dtype))
        return self._cache[key]

    def noised(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``[K, B, L, ...]``: the prefix at the noise level of each timestep ``t`` ``[K]``, in ``like``'s dtype."""
        prefix, eta, _, sqrt_abar, sqrt_one_minus = self._on(like)
        t = t.to(like.device).long()
        shape = (-1, *([1] * (like.ndim - 1)))
        return sqrt_abar[t].view(shape) * prefix + sqrt_one_minus[t].view(shape) * eta

    def apply(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x`` ``[K, B, H, ...]`` at timesteps ``t`` ``[K]`` -> a copy with the prefix imposed."""
        if x.shape[2] < self.length:
            raise ValueError(f"prefix of length {self.length} is longer than the horizon {x.shape[2]}")
        w = self._on(x)[2]
        out = x.clone()
        out[:, :, : self.length] = w * self.noised(t, x) + (1 - w) * x[:, :, : self.length]
        return out

    def wrap(self, denoise: Denoiser) -> Denoiser:
        """A denoiser that sees every point with the prefix imposed at that point's timestep."""

        def constrained(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            squeeze = x.ndim == self.prefix.ndim  # a plain [B, H, ...] call with one timestep
            x_k = x.unsqueeze(0) if squeeze else x
            t_k = torch.as_tensor(t, device=x.device).reshape(-1).expand(x_k.shape[0])
            out = denoise(self.apply(x_k, t_k), t_k)
            return out.squeeze(0) if squeeze else out

        return constrained

    def finish(self, sample: torch.Tensor) -> torch.Tensor:
        """The clean sample ``[B, H, ...]`` with the prefix blended in at alpha_bar = 1."""
        prefix, _, w, _, _ = self._on(sample)
        out = sample.clone()
        out[:, : self.length] = w * prefix + (1 - w) * sample[:, : self.length]
        return out
