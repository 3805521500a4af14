"""ConditionalUnet1D: Diffusion Policy's temporal U-Net over action sequences.

The network predicts the noise in a noisy action sequence ``x_t`` given the diffusion timestep and
the (flattened) observation history. Conditioning is FiLM: every residual block turns the
conditioning vector into a per-channel scale and bias. Each row of a batch may carry its own
timestep, which is what lets a parallel sampler evaluate K denoising steps in one forward pass.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def row_timesteps(timestep: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    """A network's timestep argument (``[B]``, one per row; ``[]``; or an int) as ``[B]`` on ``device``."""
    if not torch.is_tensor(timestep):
        timestep = torch.tensor([timestep], device=device)
    if timestep.ndim == 0:
        timestep = timestep[None]
    return timestep.to(device).expand(batch)


class SinusoidalPosEmb(nn.Module):
    """Timestep ``[B]`` -> sinusoidal embedding ``[B, dim]`` (transformer-style frequencies)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"diffusion_step_embed_dim must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
        # A buffer so that .to(device) moves it; not persistent so it stays out of the checkpoint.
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish, length preserving. ``[B, C_in, T] -> [B, C_out, T]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ConditionalResidualBlock1D(nn.Module):
    """Two Conv1dBlocks with FiLM (scale, bias) from ``cond`` applied after the first one.

    x ``[B, C_in, T]``, cond ``[B, cond_dim]`` -> ``[B, C_out, T]``.
    """

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.out_channels = out_channels
        self.blocks = nn.ModuleList(
            [
                Conv1dBlock(in_channels, out_channels, kernel_size, n_groups),
                Conv1dBlock(out_channels, out_channels, kernel_size, n_groups),
            ]
        )
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out_channels))
        # 1x1 conv so the skip connection matches channels when they change.
        self.residual_conv = (
            nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.blocks[0](x)
        scale, bias = self.cond_encoder(cond).unsqueeze(-1).chunk(2, dim=1)
        out = scale * out + bias
        out = self.blocks[1](out)
        return out + self.residual_conv(x)


class Downsample1d(nn.Module):
    """Halve the sequence length with a strided conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1d(nn.Module):
    """Double the sequence length with a transposed conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConditionalUnet1D(nn.Module):
    """Noise-prediction U-Net: ``(x [B, horizon, action_dim], t [B] or scalar, global_cond [B, G])``
    -> ``[B, horizon, action_dim]``.

    ``horizon`` must be divisible by ``2 ** (len(down_dims) - 1)`` (one Downsample1d per level but
    the last).
    """

    def __init__(
        self,
        input_dim: int,
        global_cond_dim: int,
        diffusion_step_embed_dim: int = 128,
        down_dims: Sequence[int] = (64, 128, 256),
        kernel_size: int = 5,
        n_groups: int = 8,
    ):
        super().__init__()
        down_dims = list(down_dims)
        step_dim = diffusion_step_embed_dim
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(step_dim),
            nn.Linear(step_dim, step_dim * 4),
            nn.Mish(),
            nn.Linear(step_dim * 4, step_dim),
        )
        cond_dim = step_dim + global_cond_dim

        def block(c_in: int, c_out: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(c_in, c_out, cond_dim, kernel_size, n_groups)

        all_dims = [input_dim] + down_dims
        in_out = list(zip(all_dims[:-1], all_dims[1:]))

        self.down_modules = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(in_out):
            is_last = i == len(in_out) - 1
            self.down_modules.append(
                nn.ModuleList([block(c_in, c_out), block(c_out, c_out), nn.Identity() if is_last else Downsample1d(c_out)])
            )

        mid_dim = down_dims[-1]
        self.mid_modules = nn.ModuleList([block(mid_dim, mid_dim), block(mid_dim, mid_dim)])

        self.up_modules = nn.ModuleList()
        # As in DP: the finest skip (level 0) is unused; every up level upsamples, restoring horizon.
        for c_in, c_out in reversed(in_out[1:]):
            # Input channels doubled: the skip connection from the down path is concatenated.
            self.up_modules.append(nn.ModuleList([block(c_out * 2, c_in), block(c_in, c_in), Upsample1d(c_in)]))

        self.final_conv = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            nn.Conv1d(down_dims[0], input_dim, 1),
        )

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, global_cond: torch.Tensor) -> torch.Tensor:
        """sample ``[B, horizon, action_dim]``; timestep ``[B]`` (one per row), ``[]`` or int;
        global_cond ``[B, global_cond_dim]``. Returns ``[B, horizon, action_dim]``."""
        batch = sample.shape[0]
        timestep = row_timesteps(timestep, batch, sample.device)

        x = sample.transpose(1, 2)  # [B, A, H]: channels are the action dimensions
        cond = torch.cat([self.diffusion_step_encoder(timestep), global_cond], dim=-1)

        skips = []
        for res1, res2, down in self.down_modules:
            x = res2(res1(x, cond), cond)
            skips.append(x)
            x = down(x)
        for mid in self.mid_modules:
            x = mid(x, cond)
        for res1, res2, up in self.up_modules:
            x = torch.cat([x, skips.pop()], dim=1)
            x = res2(res1(x, cond), cond)
            x = up(x)
        return self.final_conv(x).transpose(1, 2)
