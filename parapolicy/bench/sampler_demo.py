"""Parallel vs sequential sampling on an untrained policy-sized denoiser.

    python -m parapolicy.bench.sampler_demo [--device cuda] [--batch 4] [--seed 0] [--threads 1]

For DDPM-100, DDIM-15 and DPMSolver-15 (the policy's scheduler config; tolerance 0.1, window 16)
prints the Picard rounds, model evaluations per sample and the largest deviation from the
sequential sample for the same x_T and noise. The denoiser is a randomly initialised
``parapolicy.policy.unet.ConditionalUnet1D`` (a small stand-in if that cannot be built), plus the
exact denoiser of Gaussian data as a smooth reference. Wall times are for this device and batch;
on a CPU a batched call costs about K single ones, so expect no speedup there.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from diffusers import DDPMScheduler
from torch import nn

from parapolicy.samplers import make_sampler

HORIZON, ACTION_DIM, COND_DIM = 16, 7, 32
POLICY_SCHEDULER = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True, prediction_type="epsilon")
RUNS = [  # (sequential, steps, options)
    ("ddpm", 100, {}),
    ("ddim", 15, {}),
    ("dpmsolver", 15, {}),
    # diffusers' DPM-Solver ignores clip_sample; thresholding bounded at 1 is the same clip to [-1, 1]
    ("dpmsolver", 15, {"scheduler_kwargs": {"thresholding": True, "sample_max_value": 1.0}}),
]


class SmallTimeConv(nn.Module):
    """Stand-in for ConditionalUnet1D: (x [N, H, A], t [N], cond [N, C]) -> [N, H, A], FiLM-conditioned convs."""

    def __init__(self, action_dim: int, cond_dim: int, hidden: int = 64, embed: int = 32):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(embed // 2) / (embed // 2 - 1)))
        self.cond = nn.Sequential(nn.Linear(embed + cond_dim, hidden), nn.Mish(), nn.Linear(hidden, 4 * hidden))
        self.conv_in = nn.Conv1d(action_dim, hidden, 5, padding=2)
        self.conv_mid = nn.Conv1d(hidden, hidden, 5, padding=2)
        self.conv_out = nn.Conv1d(hidden, action_dim, 1)

    def forward(self, x, t, cond):
        angles = t.to(x.dtype)[:, None] * self.freqs
        film = self.cond(torch.cat([angles.sin(), angles.cos(), cond], -1))[..., None]
        s1, b1, s2, b2 = film.chunk(4, dim=1)
        h = nn.functional.mish(self.conv_in(x.transpose(1, 2)) * (1 + s1) + b1)
        h = nn.functional.mish(self.conv_mid(h) * (1 + s2) + b2)
        return self.conv_out(h).transpose(1, 2)


def build_net(device) -> tuple[nn.Module, str]:
    try:
        from parapolicy.policy.unet import ConditionalUnet1D

        net = ConditionalUnet1D(ACTION_DIM, COND_DIM, diffusion_step_embed_dim=64, down_dims=(64, 128, 256))
        label = "ConditionalUnet1D(down_dims=(64, 128, 256))"
    except Exception as error:  # the real U-Net is optional here
        net = SmallTimeConv(ACTION_DIM, COND_DIM)
        label = f"SmallTimeConv (ConditionalUnet1D unavailable: {type(error).__name__}: {error})"
    return net.to(device).eval(), label


def net_denoiser(net, cond):
    """x [K, B, H, A], t [K] -> eps [K, B, H, A]: the K timesteps are folded into the batch."""

    @torch.no_grad()
    def denoise(x, t):
        k, b = x.shape[:2]
        flat = x.reshape(k * b, *x.shape[2:])
        return net(flat, t.repeat_interleave(b), cond.repeat(k, 1)).reshape(x.shape)

    return denoise


def gaussian_denoiser(alphas_cumprod, mean=0.3, std=0.4):
    """Exact epsilon for x0 ~ N(mean, std^2 I): a smooth denoiser for reference."""

    def denoise(x, t):
        a = alphas_cumprod.to(x)[t].view(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * mean) / (a * std**2 + 1 - a)

    return denoise


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    config = DDPMScheduler(**POLICY_SCHEDULER).config
    net, label = build_net(device)
    cond = torch.randn(args.batch, COND_DIM, device=device)
    denoisers = {"net": net_denoiser(net, cond), "gaussian": gaussian_denoiser(DDPMScheduler(**POLICY_SCHEDULER).alphas_cumprod)}
    print(f"net: {label}; x_T [{args.batch}, {HORIZON}, {ACTION_DIM}] float32 on {device}; "
          f"tolerance {args.tolerance}, window {args.window}")
    print(f"{'denoiser':9} {'sampler':28} {'rounds':>6} {'evals':>6} {'max|par-seq|':>13} {'max|seq|':>9} {'seq ms':>8} {'par ms':>8}")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for kind, denoise in denoisers.items():
        for name, steps, options in RUNS:
            sequential = make_sampler(name, config, steps, **options)
            parallel = make_sampler("para" + name, config, steps, window=args.window, tolerance=args.tolerance, **options)
            x_T = torch.randn(args.batch, HORIZON, ACTION_DIM, device=device, generator=generator)
            noise = torch.randn(steps, *x_T.shape, device=device, generator=generator)
            expected, seq_ms = timed(lambda: sequential.sample(denoise, x_T, noise=noise))
            out, par_ms = timed(lambda: parallel.sample(denoise, x_T, noise=noise))
            deviation = (out.sample - expected.sample).abs().max().item()
            title = f"para{name}-{steps}" + (" (clip)" if options else "")
            print(f"{kind:9} {title:28} {out.rounds:6d} {out.model_evals:6d} {deviation:13.2e} "
                  f"{expected.sample.abs().max().item():9.3g} {seq_ms:8.1f} {par_ms:8.1f}"
                  + ("" if out.converged else "  (not converged)"))


if __name__ == "__main__":
    main()
