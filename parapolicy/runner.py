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

from parapolicy.devices import synchronize as _sync
from parapolicy.policy.action_space import from_env_action, to_env_action
from parapolicy.policy.diffusion_policy import OBS_KEY_ALIASES


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


def row_of(obs, i: int):
    """Env ``i``'s observation from a vector env's batch: an array row, or a dict of rows (camera tasks)."""
    if isinstance(obs, dict):
        return {key: value[i] for key, value in obs.items()}
    return obs[i]


def policy_inputs(cfg, histories, lead: int = 0, bounds=None) -> tuple[torch.Tensor, dict]:
    """``(obs_history [B, n_obs_steps, obs_dim], images {key: [B, n_obs_steps, 3, H, W]})`` from one
    observation window per env (flat vectors, or dicts with camera frames and the policy's ``obs_keys``).

    ``lead`` > 0 (transition ``forecast``): the low-dim window extrapolated that many steps, within
    ``bounds`` (low, high) if given; camera frames are the latest ones (pixels are not extrapolated).
    """
    from parapolicy.realtime.transitions import forecast_history

    image_keys = list(getattr(cfg, "image_keys", None) or [])
    flat, images = [], {key: [] for key in image_keys}
    for window in histories:
        steps = list(window)
        if isinstance(steps[0], dict):
            keys = [k if k in steps[0] else OBS_KEY_ALIASES.get(k, k) for k in cfg.obs_keys]
            rows = [np.concatenate([np.asarray(o[k], np.float32).reshape(-1) for k in keys]) if keys
                    else np.zeros(0, np.float32) for o in steps]
            for key in image_keys:
                images[key].append(np.stack([o[key] for o in steps]))
        else:
            rows = steps
        flat.append(forecast_history(np.stack(rows).astype(np.float32), lead, *(bounds or (None, None))))
    return (torch.from_numpy(np.stack(flat)),
            {key: torch.from_numpy(np.stack(frames)) for key, frames in images.items()})


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


class PolicyRunner:
    """Runs episodes of one policy (its sampler set) on a vector env, recording every call.

    ``shadow``: an optional second policy (the baseline sampler on the same weights) run at every
    call on the same observation history and noise; its latency and the largest absolute difference
    between the two executed action chunks are recorded.

    Real time (``parapolicy.realtime``): ``timing="sync"`` (default) lets the simulator wait for every
    plan. ``"async"``: the robot keeps executing the chunk it has while the next one is planned from the
    observation at request time; the new chunk takes over ``d = ceil(latency / control period)`` steps
    later by ``transition``; if the old chunk runs out first, the robot holds (stall steps). ``"hold"``:
    the robot holds still for d steps, then runs the new chunk from its start. ``latency`` is a
    ``LatencyModel`` or its spec (``"measured"``, ms, ``"profile:<file>"``); a new plan is requested
    every ``execution_horizon`` steps (default ``n_action_steps``), or when the last one lands if later.
    The first plan of an episode blocks (the robot starts when it has actions). With ``timing="async"``
    and zero latency the episodes are exactly the sync ones.
    """

    def __init__(self, envs: gym.vector.VectorEnv, policy, shadow=None, timing: str = "sync", latency="measured",
                 transition="naive", execution_horizon: int | None = None, label: str | None = None):
        from parapolicy.realtime.latency import LatencyModel
        from parapolicy.realtime.transitions import Transition

        self.envs = envs
        self.policy = policy
        self.shadow = shadow
        self.n_envs = envs.num_envs
        if timing not in ("sync", "async", "hold"):
            raise ValueError(f"timing must be 'sync', 'async' or 'hold', got {timing!r}")
        self.timing = timing
        self.latency = latency if isinstance(latency, LatencyModel) else LatencyModel.parse(
            latency, label, getattr(policy, "sampler_name", None))
        cfg = policy.config
        self.transition = Transition.parse(transition, cfg)
        self.transition.check_policy(cfg)
        horizon = execution_horizon if execution_horizon is not None else cfg.n_action_steps
        if isinstance(horizon, bool) or not isinstance(horizon, int) or not 1 <= horizon <= cfg.horizon - cfg.action_start:
            raise ValueError(f"execution_horizon must be an integer in [1, {cfg.horizon - cfg.action_start}] "
                             f"(horizon - n_obs_steps + 1), got {execution_horizon!r}")
        if timing == "sync" and (self.latency.kind != "measured" or self.transition.name != "naive"):
            raise ValueError("latency and transition apply to timing=async or hold; timing=sync waits for every plan")
        if timing == "hold" and self.transition.name != "naive":
            raise ValueError("timing=hold runs every chunk from its start: it takes no transition")
        self.execution_horizon = horizon
        periods = envs.get_attr("control_period_s") if hasattr(envs, "get_attr") else None
        self.control_period_s = float(periods[0]) if periods else None
        if timing != "sync" and not self.control_period_s:
            raise ValueError("timing=async/hold needs the env's control_period_s")

    def _timed_plan(self, policy, history, x_T, noise, warm_from=None, warm_shift=None, **prefix):
        device = policy.device
        _sync(device)
        start = time.perf_counter()
        plan = policy.predict_action(history, x_T=x_T, noise=noise, warm_from=warm_from, warm_shift=warm_shift, **prefix)
        _sync(device)
        return plan, (time.perf_counter() - start) * 1e3

    def run_batch(self, seeds: list[int], on_episode: Callable[[int, dict], None] | None = None,
                  on_step: Callable[[list[int], list[dict]], None] | None = None) -> list[dict]:
        """Run one episode per env with ``seeds`` (``len(seeds) <= n_envs``). Returns per-episode
        records: success, length, reward, error, wall_s and per-call measurements (and, with real-time
        timing, ``stall_steps``, ``hold_steps``, ``max_switch_jump``, ``task_time_s``; per call
        ``delay_steps`` and ``switch_jump``).

        ``on_step(rows, records)``: called after the reset and after every env step with the env rows
        that took it and the records so far (e.g. to render a frame); never inside a timed policy call.
        """
        from parapolicy.realtime.latency import delay_steps
        from parapolicy.realtime.transitions import pick_candidate, prefix_for

        n = len(seeds)
        normalizer = getattr(getattr(self.policy, "normalizer", None), "obs", None)  # forecasts stay in its range
        obs_bounds = None if normalizer is None else (normalizer.min.cpu().numpy(), normalizer.max.cpu().numpy())
        if not 1 <= n <= self.n_envs:
            raise ValueError(f"need 1..{self.n_envs} seeds, got {n}")
        cfg = self.policy.config
        H, A, start = cfg.horizon, cfg.action_dim, cfg.action_start
        transition, realtime = self.transition, self.timing != "sync"
        padded = list(seeds) + [seeds[-1]] * (self.n_envs - n)  # idle envs replay a seed, results unused
        obs, reset_info = self.envs.reset(seed=padded)
        # absolute-pose policies (action_space absolute_rot6d): the env takes poses, holds are the current pose
        space = getattr(cfg, "action_space", "delta")
        holds = _hold_commands(reset_info, None, space)  # [n_envs, 7] env commands keeping each arm still, or None
        history = [deque([row_of(obs, i)] * cfg.n_obs_steps, maxlen=cfg.n_obs_steps) for i in range(n)]
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        latency_rng = self.latency.generator(int(seeds[0]))  # a batch shares its calls' latency
        records = [{"seed": int(s), "success": False, "length": 0, "reward": 0.0, "error": None, "calls": []}
                   for s in seeds]
        if realtime:
            for rec in records:
                rec.update(stall_steps=0, hold_steps=0, max_switch_jump=0.0)
        previous: list[torch.Tensor | None] = [None] * n  # last clean sample per env, for warm starts
        chunks: list[np.ndarray | None] = [None] * n  # the chunk each env executes, raw [H, A]
        executed = [[] for _ in range(n)]  # actions sent to each env so far
        last_gripper = np.full(n, -1.0, dtype=np.float32)  # robosuite's gripper starts open
        state = {"chunk_r": 0, "old_r": None, "old": [None] * n, "hold_until": 0, "pending": None,
                 "next_request": 0, "last_request": None, "recent_ms": deque(maxlen=5)}
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
            if self.control_period_s:  # robot time: every step, holds and stalls included
                records[i]["task_time_s"] = records[i]["length"] * self.control_period_s
            if on_episode is not None:
                on_episode(i, records[i])

        def hold_action(i: int) -> np.ndarray:
            """The controller's stay-in-place command: zero arm delta (absolute poses: the arm's current pose),
            the gripper kept as last commanded."""
            action = np.zeros(A, dtype=np.float32) if holds is None else from_env_action(holds[i], space)
            action[-1] = last_gripper[i]
            return action

        def action_at(i: int, t: int) -> tuple[np.ndarray, str]:
            """(action, kind) for env i at step t: kind is "chunk", "hold" or "stall"."""
            if t < state["hold_until"]:
                return hold_action(i), "hold"
            j = t - state["chunk_r"] + start
            if j >= H:
                return hold_action(i), "stall"
            action = chunks[i][j]
            old = state["old"][i]
            if transition.blend > 0 and old is not None:
                k = t - state["old_r"] + start
                if k < H:
                    action = transition.blend * old[k] + (1 - transition.blend) * action
            return action, "chunk"

        def known_actions(i: int, t: int, d: int) -> np.ndarray:
            """``[K, A]``: what env i did or will do at the new chunk's positions 0..K-1 (request at t):
            executed actions before t, then the current chunk (or holds) during the d planning steps,
            then the current chunk while it lasts."""
            known = []
            for j in range(H):
                when = t - start + j
                if when < t:
                    known.append(executed[i][when] if when >= 0 else executed[i][0] if executed[i] else hold_action(i))
                elif when < t + d:
                    known.append(action_at(i, when)[0])
                else:
                    k = when - state["chunk_r"] + start
                    if k >= H:
                        break
                    known.append(chunks[i][k])
            return np.asarray(known, dtype=np.float32)

        def request(t: int) -> bool:
            """Plan for the active envs from their history at step t; False if the call failed."""
            idx = np.flatnonzero(active)
            first = chunks[idx[0]] is None
            m = transition.candidates if not first else 1  # bidirectional decoding: m chunks per env, one call
            x_T, noise = draw_candidates(self.policy, [generators[i] for i in idx], m)
            planned_ms = None if first else self.latency.planned_ms(latency_rng)
            if first:
                d_plan = 0
            elif planned_ms is not None:
                d_plan = delay_steps(planned_ms, self.control_period_s)
            else:  # measured: the prefix assumes the slowest of the last calls (known only afterwards)
                d_plan = delay_steps(max(state["recent_ms"]), self.control_period_s) if state["recent_ms"] else 0
            needs_known = realtime and not first and (transition.prefix != "none" or m > 1)
            known = {i: known_actions(i, t, d_plan) for i in idx} if needs_known else {}
            lead = d_plan if transition.forecast and self.timing == "async" else 0  # planned for t + lead
            obs_history, images = policy_inputs(cfg, [history[i] for i in idx], lead, obs_bounds)
            if m > 1:
                obs_history = obs_history.repeat_interleave(m, dim=0)
                images = {k: v.repeat_interleave(m, dim=0) for k, v in images.items()}
            prefix_args = {"images": images} if images else {}  # everything predict_action takes beyond x_T, noise
            if transition.prefix != "none" and not first and self.timing == "async":
                pieces = [prefix_for(transition, known[i], start + d_plan, H, self.execution_horizon) for i in idx]
                if pieces[0][0] is not None:
                    length = min(len(p[0]) for p in pieces)
                    prefix = torch.from_numpy(np.stack([p[0][:length] for p in pieces]))
                    weights = torch.from_numpy(np.stack([p[1][:length] for p in pieces]))
                    eta = draw_prefix_noise([generators[i] for i in idx], m, length, A)
                    prefix_args.update(prefix=prefix.repeat_interleave(m, dim=0),
                                       prefix_weights=weights.repeat_interleave(m, dim=0), prefix_noise=eta,
                                       prefix_mode=transition.prefix_mode)
            warm_from, warm_shift = None, None
            if self.policy.warm_start and all(previous[i] is not None for i in idx):
                warm_shift = t - state["last_request"]
                if warm_shift < H:
                    warm_from = torch.cat([previous[i] for i in idx]).repeat_interleave(m, dim=0)
                else:
                    warm_shift = None
            try:
                plan, latency_ms = self._timed_plan(self.policy, obs_history, x_T, noise, warm_from, warm_shift,
                                                    **prefix_args)
                call = {"latency_ms": latency_ms, "batch": int(len(idx)), "rounds": int(plan["rounds"]),
                        "model_evals": int(plan["model_evals"]), "converged": bool(plan["converged"])}
                if images:  # an image policy's encoder share of the call (runs once, before sampling)
                    call["encode_ms"] = float(plan["encode_ms"])
                action_pred = plan["action_pred"].float().cpu().numpy().reshape(len(idx), m, H, A)
                samples = plan["sample"].reshape(len(idx), m, *plan["sample"].shape[1:])
                if self.shadow is not None:
                    shadow_plan, shadow_ms = self._timed_plan(self.shadow, obs_history, x_T, noise, **prefix_args)
                    deviation = (plan["action"] - shadow_plan["action"]).abs().amax(dim=(1, 2))
                    deviation = deviation.reshape(len(idx), m).amax(dim=1).cpu().numpy()
            except Exception as err:  # a failing policy call fails its episodes, not the run
                for i in idx:
                    finish(i, f"policy: {type(err).__name__}: {err}")
                return False
            if planned_ms is None:
                state["recent_ms"].append(latency_ms)
            d = 0 if first or not realtime else delay_steps(latency_ms if planned_ms is None else planned_ms,
                                                             self.control_period_s)
            new = {}
            for row, i in enumerate(idx):
                pick = pick_candidate(action_pred[row], known[i], start + d_plan) if m > 1 else 0
                new[i] = action_pred[row, pick]
                previous[i] = samples[row, pick : pick + 1]
                entry = dict(call, warm=warm_from is not None)
                if realtime:
                    entry.update(delay_steps=int(d), blocking=bool(first))
                    if planned_ms is not None:
                        entry["planned_latency_ms"] = float(planned_ms)
                    if m > 1:
                        entry["candidate"] = int(pick)
                if self.shadow is not None:
                    entry.update(shadow_latency_ms=shadow_ms, shadow_deviation=float(deviation[row]))
                records[i]["calls"].append(entry)
            state["last_request"] = t
            if self.timing == "hold" and not first:  # stand still for d steps, then run the chunk from its start
                state["hold_until"] = t + d
                state["pending"] = {"chunks": new, "r": t + d, "land": t}
                state["next_request"] = t + d + self.execution_horizon
            else:
                state["pending"] = {"chunks": new, "r": t + lead, "land": t + max(d, lead)}
                state["next_request"] = t + max(self.execution_horizon, d)
            return True

        def land(t: int) -> None:
            """The pending chunk takes over at step t; record the action jump at the switch (the first action
            the new chunk executes against the last action executed before it: a hold, in timing=hold)."""
            pending = state["pending"]
            state["pending"] = None
            state["old"] = list(chunks) if transition.blend > 0 else [None] * n
            state["old_r"] = state["chunk_r"]
            state["chunk_r"] = pending["r"]
            for i, chunk in pending["chunks"].items():
                chunks[i] = chunk
                first_position = max(t, pending["r"]) - pending["r"] + start
                if realtime and executed[i] and first_position < H and active[i]:
                    before = hold_action(i) if pending["r"] > t else executed[i][-1]
                    jump = float(np.abs(chunk[first_position] - before).max())
                    records[i]["calls"][-1]["switch_jump"] = jump
                    records[i]["max_switch_jump"] = max(records[i]["max_switch_jump"], jump)

        t = 0
        while active.any():
            if state["pending"] is not None and t >= state["pending"]["land"]:
                land(t)
            if state["pending"] is None and t >= state["next_request"]:
                if not request(t):
                    break
                if t >= state["pending"]["land"]:
                    land(t)
            idx = np.flatnonzero(active)
            step_actions = np.zeros((self.n_envs, A), dtype=np.float32)
            for i in idx:
                action, kind = action_at(i, t)
                step_actions[i] = action
                executed[i].append(np.asarray(action, dtype=np.float32))
                last_gripper[i] = action[-1]
                if kind == "stall" and realtime:
                    records[i]["stall_steps"] += 1
                elif kind == "hold" and realtime:
                    records[i]["hold_steps"] += 1
            stepped = [int(i) for i in idx]
            if holds is not None:  # poses to robosuite's absolute commands; idle envs hold where they are
                env_actions = to_env_action(step_actions, space)
                env_actions[~active] = holds[~active]
                obs, reward, terminated, truncated, info = self.envs.step(env_actions)
                holds = _hold_commands(info, holds, space)
            else:
                obs, reward, terminated, truncated, info = self.envs.step(step_actions)
            t += 1
            for i in idx:
                rec = records[i]
                rec["length"] += 1
                rec["reward"] += float(reward[i])
                history[i].append(row_of(obs, i))
                rec["success"] = rec["success"] or bool(info["is_success"][i])
                error = info["error"][i] if "_error" in info and info["_error"][i] else None
                if terminated[i] or truncated[i] or error:
                    finish(i, error or None)
            call_hook(stepped)
        return records[:n]


def _hold_commands(info: dict, previous: np.ndarray | None, space: str) -> np.ndarray | None:
    """The envs' ``info["hold_action"]`` rows (absolute control: each arm's current pose as a command),
    ``[n_envs, 7]``, keeping ``previous`` rows the step did not report (an env that failed); None for delta
    policies. Refuses a policy and env that disagree on what an action is."""
    reported = info.get("hold_action")
    if (space == "delta") != (reported is None) and previous is None:
        if space == "delta":
            raise ValueError("the env takes absolute poses (control='absolute', a *_abs task) but the policy "
                             "plans OSC_POSE deltas (action_space='delta'): use the task without _abs")
        raise ValueError(f"the policy plans absolute poses (action_space={space!r}) but the env takes OSC_POSE "
                         f"deltas: use its *_abs task (control='absolute'), e.g. env=square_abs")
    if reported is None:
        return previous
    reported = np.asarray(reported, dtype=np.float32)
    if previous is None:
        return reported.copy()
    rows = np.asarray(info.get("_hold_action", np.ones(len(reported), bool)), dtype=bool)
    previous[rows] = reported[rows]
    return previous


def with_sampler(policy, name: str, num_inference_steps: int | None = None, **options):
    """A copy of ``policy`` sharing its weights, with another sampler (for baselines and shadows)."""
    other = copy.copy(policy)  # shallow: same nn.Modules, own sampler attributes
    options.setdefault("warm_start", False)  # never inherit the original's warm start
    other.set_sampler(name, num_inference_steps, **options)
    return other
