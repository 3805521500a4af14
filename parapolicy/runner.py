"""Closed-loop runner: a Diffusion Policy drives ``n_envs`` Robosuite environments, measured per call.

Episodes run in synchronous batches of ``n_envs`` (one per environment, all reset together with their
own seeds; autoreset is off so the runner decides every seed). Each policy call plans
``n_action_steps`` actions for every still-running environment in one batched sampler call.

Same randomness for every sampler: each episode owns a ``torch.Generator`` seeded with the episode
seed, and every call draws the start noise ``x_T`` and the per-step noise from it. So a baseline and a
parallel sampler see identical noise on the same episode, whatever the batching.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from functools import partial
from typing import Callable

import gymnasium as gym
import numpy as np
import torch


def make_vector_env(task: str, n_envs: int, max_episode_steps: int | None = None, **env_kwargs) -> gym.vector.VectorEnv:
    """``n_envs`` tasks with autoreset off: in-process for one env (no IPC on the latency path),
    in worker processes otherwise. ``env_kwargs`` go to every ``RobosuiteEnv`` (e.g. render_mode)."""
    from parapolicy.envs.robosuite_env import RobosuiteEnv

    fns = [partial(RobosuiteEnv, task=task, max_episode_steps=max_episode_steps, **env_kwargs) for _ in range(n_envs)]
    mode = gym.vector.AutoresetMode.DISABLED
    if n_envs == 1:
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)
    # Rendering workers start fresh ("spawn"): a forked child would inherit the OpenGL (EGL) state of
    # the env gymnasium builds here to read the spaces, and GL state is not fork-safe.
    context = "spawn" if env_kwargs.get("render_mode") else None
    return gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode, context=context)


def draw_noise(policy, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-episode ``x_T [b, H, A]`` and per-step noise ``[N, b, H, A]`` (None if deterministic), one row
    per generator: ``x_T`` then the step noise from each. The policy server draws with this too, so a
    robot served with seed s sees the noise of the in-process eval's episode with seed s."""
    cfg, sampler = policy.config, policy.sampler
    x_T, noise = [], []
    for gen in generators:
        x_T.append(torch.randn((1, cfg.horizon, cfg.action_dim), generator=gen))
        if sampler.is_stochastic:
            noise.append(torch.randn((sampler.num_inference_steps, 1, cfg.horizon, cfg.action_dim), generator=gen))
    return torch.cat(x_T), (torch.cat(noise, dim=1) if noise else None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PolicyRunner:
    """Runs episodes of one policy (its sampler set) on a vector env, recording every call.

    ``shadow``: an optional second policy (the baseline sampler on the same weights) run at every
    call on the same observation history and noise; its latency and the largest absolute difference
    between the two executed action chunks are recorded.
    """

    def __init__(self, envs: gym.vector.VectorEnv, policy, shadow=None):
        self.envs = envs
        self.policy = policy
        self.shadow = shadow
        self.n_envs = envs.num_envs

    def _timed_plan(self, policy, history, x_T, noise, warm_from=None):
        device = policy.device
        _sync(device)
        start = time.perf_counter()
        plan = policy.predict_action(history, x_T=x_T, noise=noise, warm_from=warm_from)
        _sync(device)
        return plan, (time.perf_counter() - start) * 1e3

    def run_batch(self, seeds: list[int], on_episode: Callable[[int, dict], None] | None = None,
                  on_step: Callable[[list[int], list[dict]], None] | None = None) -> list[dict]:
        """Run one episode per env with ``seeds`` (``len(seeds) <= n_envs``). Returns per-episode
        records: success, length, reward, error, wall_s and per-call measurements.

        ``on_step(rows, records)``: called after the reset and after every env step with the env rows
        that took it and the records so far (e.g. to render a frame); never inside a timed policy call.
        """
        n = len(seeds)
        if not 1 <= n <= self.n_envs:
            raise ValueError(f"need 1..{self.n_envs} seeds, got {n}")
        cfg = self.policy.config
        padded = list(seeds) + [seeds[-1]] * (self.n_envs - n)  # idle envs replay a seed, results unused
        obs, _ = self.envs.reset(seed=padded)
        history = [deque([obs[i]] * cfg.n_obs_steps, maxlen=cfg.n_obs_steps) for i in range(n)]
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        records = [{"seed": int(s), "success": False, "length": 0, "reward": 0.0, "error": None, "calls": []}
                   for s in seeds]
        previous: list[torch.Tensor | None] = [None] * n  # last clean sample per env, for warm starts
        active = np.zeros(self.n_envs, dtype=bool)
        active[:n] = True
        started = time.perf_counter()
        hook_s = 0.0  # time spent in on_step (rendering), kept out of wall_s and so out of control_hz

        def call_hook(rows: list[int]) -> None:
            nonlocal hook_s
            if on_step is not None:
                begin = time.perf_counter()
                on_step(rows, records)
                hook_s += time.perf_counter() - begin

        call_hook(list(range(n)))

        def finish(i: int, error: str | None = None) -> None:
            active[i] = False
            records[i]["error"] = error
            records[i]["wall_s"] = time.perf_counter() - started - hook_s
            if on_episode is not None:
                on_episode(i, records[i])

        while active.any():
            idx = np.flatnonzero(active)
            obs_history = torch.from_numpy(np.stack([np.stack(history[i]) for i in idx]))
            x_T, noise = draw_noise(self.policy, [generators[i] for i in idx])
            warm_from = None
            if self.policy.warm_start and all(previous[i] is not None for i in idx):
                warm_from = torch.cat([previous[i] for i in idx])
            try:
                plan, latency_ms = self._timed_plan(self.policy, obs_history, x_T, noise, warm_from)
                call = {"latency_ms": latency_ms, "batch": int(len(idx)), "rounds": int(plan["rounds"]),
                        "model_evals": int(plan["model_evals"]), "converged": bool(plan["converged"])}
                actions = plan["action"].float().cpu().numpy()
                if self.shadow is not None:
                    shadow_plan, shadow_ms = self._timed_plan(self.shadow, obs_history, x_T, noise)
                    deviation = (plan["action"] - shadow_plan["action"]).abs().amax(dim=(1, 2)).cpu().numpy()
            except Exception as err:  # a failing policy call fails its episodes, not the run
                for i in idx:
                    finish(i, f"policy: {type(err).__name__}: {err}")
                break
            for row, i in enumerate(idx):
                previous[i] = plan["sample"][row : row + 1]
                entry = dict(call, warm=warm_from is not None)
                if self.shadow is not None:
                    entry.update(shadow_latency_ms=shadow_ms, shadow_deviation=float(deviation[row]))
                records[i]["calls"].append(entry)

            for k in range(cfg.n_action_steps):
                step_actions = np.zeros((self.n_envs, cfg.action_dim), dtype=np.float32)
                step_actions[idx] = actions[:, k]
                stepped = [int(i) for i in idx if active[i]]
                obs, reward, terminated, truncated, info = self.envs.step(step_actions)
                for i in idx:
                    if not active[i]:
                        continue
                    rec = records[i]
                    rec["length"] += 1
                    rec["reward"] += float(reward[i])
                    history[i].append(obs[i])
                    rec["success"] = rec["success"] or bool(info["is_success"][i])
                    error = info["error"][i] if "_error" in info and info["_error"][i] else None
                    if terminated[i] or truncated[i] or error:
                        finish(i, error or None)
                call_hook(stepped)
                if not active.any():
                    break
        return records[:n]


def with_sampler(policy, name: str, num_inference_steps: int | None = None, **options):
    """A copy of ``policy`` sharing its weights, with another sampler (for baselines and shadows)."""
    other = copy.copy(policy)  # shallow: same nn.Modules, own sampler attributes
    options.setdefault("warm_start", False)  # never inherit the original's warm start
    other.set_sampler(name, num_inference_steps, **options)
    return other
