"""One batched planning call for many robots: their noise, candidates, prefix and warm start.

Same randomness everywhere: every robot (an env of the runner, an ``AsyncPolicy``, a connection of the
server) owns a ``torch.Generator``, and each call draws from it, in this order: the start noise ``x_T`` and
the per-step noise of its chunk, those of its extra candidates, then the prefix's noise. So a robot gets
the chunk it would get alone, whatever it is batched with, and a robot served with seed s sees the noise
of the in-process eval's episode with seed s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from parapolicy.devices import synchronize


def draw_noise(policy, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-robot ``x_T [b, H, A]`` and per-step noise ``[N, b, H, A]`` (None if the sampler is
    deterministic), one row per generator: ``x_T`` then the step noise from each."""
    cfg, sampler = policy.config, policy.sampler
    x_T, noise = [], []
    for gen in generators:
        x_T.append(torch.randn((1, cfg.horizon, cfg.action_dim), generator=gen))
        if sampler.is_stochastic:
            noise.append(torch.randn((sampler.num_inference_steps, 1, cfg.horizon, cfg.action_dim), generator=gen))
    return torch.cat(x_T), (torch.cat(noise, dim=1) if noise else None)


def draw_candidates(policy, generators: list[torch.Generator], m: int = 1):
    """``draw_noise`` for ``m`` candidate chunks per generator (bidirectional decoding): ``x_T``
    ``[B * m, H, A]`` and noise ``[N, B * m, H, A]``, rows grouped per generator. Candidate 0 is that
    generator's usual draw, the other m - 1 are drawn after it, so m = 1 is exactly ``draw_noise``."""
    x_T, noise = draw_noise(policy, generators)
    if m == 1:
        return x_T, noise
    extra = [draw_noise(policy, [gen] * (m - 1)) for gen in generators]
    x_T = torch.cat([torch.cat([x_T[r : r + 1], e[0]]) for r, e in enumerate(extra)])
    if noise is not None:
        noise = torch.cat([torch.cat([noise[:, r : r + 1], e[1]], dim=1) for r, e in enumerate(extra)], dim=1)
    return x_T, noise


def draw_prefix_noise(generators: list[torch.Generator], m: int, length: int, action_dim: int) -> torch.Tensor:
    """``[B * m, length, action_dim]`` unit noise for a prefix constraint, drawn after the chunk noise."""
    return torch.cat([torch.randn((m, length, action_dim), generator=gen) for gen in generators])


@dataclass
class Plan:
    """One call's outcome: ``chunks [B, m, H, A]`` (raw units, numpy), ``samples [B, m, H, A]`` (the
    normalised clean chunks, what a warm start takes next), the policy's own ``result`` dict and the
    call's ``latency_ms`` (device synchronised); ``shadow`` / ``shadow_ms``: the shadow policy's result."""

    chunks: np.ndarray
    samples: torch.Tensor
    result: dict
    latency_ms: float
    shadow: dict | None = None
    shadow_ms: float | None = None


class BatchPlanner:
    """Plans chunks for a batch of robots in one ``predict_action`` call.

    ``clock``: seconds, for the call's latency (``time.perf_counter``; tests pass a scripted one).
    """

    def __init__(self, policy, clock: Callable[[], float] = time.perf_counter):
        self.policy = policy
        self.clock = clock

    def _timed(self, policy, history, kwargs: dict) -> tuple[dict, float]:
        device = getattr(policy, "device", None)
        if device is not None:
            synchronize(device)
        begin = self.clock()
        result = policy.predict_action(history, **kwargs)
        if device is not None:
            synchronize(device)
        return result, (self.clock() - begin) * 1e3

    def plan(self, obs_history: torch.Tensor | np.ndarray, generators: list[torch.Generator], candidates: int = 1, *,
             images: dict[str, Any] | None = None, prefix: np.ndarray | None = None,
             prefix_weights: np.ndarray | None = None, prefix_mode: str | None = None,
             warm_from: torch.Tensor | None = None,
             warm_shift: int | None = None, shadow=None) -> Plan:
        """Plan ``candidates`` chunks for each of B robots.

        obs_history ``[B, n_obs_steps, obs_dim]``; generators: one per robot; images: ``{key: [B, n_obs_steps,
        3, H, W]}``; prefix ``[B, L, A]`` and prefix_weights ``[B, L]`` (raw units; None: no prefix, or
        exact), imposed as ``prefix_mode`` says (``predict_action``'s; None: its default); warm_from ``[B, H, A]``: each robot's previous sample, shifted ``warm_shift`` steps.
        Every per-robot input is repeated for its candidates. ``shadow``: a second policy planned on the
        same inputs and noise, without warm start.
        """
        m = int(candidates)
        cfg = self.policy.config
        x_T, noise = draw_candidates(self.policy, generators, m)
        history = torch.as_tensor(obs_history).repeat_interleave(m, dim=0)
        kwargs: dict[str, Any] = {"x_T": x_T, "noise": noise}
        shared: dict[str, Any] = {}
        if images:
            shared["images"] = {key: torch.as_tensor(v).repeat_interleave(m, dim=0) for key, v in images.items()}
        if prefix is not None:
            shared["prefix"] = torch.as_tensor(prefix).repeat_interleave(m, dim=0)
            if prefix_weights is not None:
                shared["prefix_weights"] = torch.as_tensor(prefix_weights).repeat_interleave(m, dim=0)
            shared["prefix_noise"] = draw_prefix_noise(generators, m, int(prefix.shape[1]), cfg.action_dim)
            if prefix_mode is not None:
                shared["prefix_mode"] = prefix_mode
        warm = {"warm_from": None if warm_from is None else warm_from.repeat_interleave(m, dim=0),
                "warm_shift": warm_shift}
        result, latency_ms = self._timed(self.policy, history, {**kwargs, **warm, **shared})
        b = len(generators)
        chunks = result["action_pred"].float().cpu().numpy().reshape(b, m, cfg.horizon, cfg.action_dim)
        sample = result.get("sample")
        samples = None if sample is None else sample.reshape(b, m, *sample.shape[1:])
        plan = Plan(chunks, samples, result, latency_ms)
        if shadow is not None:
            plan.shadow, plan.shadow_ms = self._timed(shadow, history, {**kwargs, **shared})
        return plan
