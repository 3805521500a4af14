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

from parapolicy.observation import window_arrays
from parapolicy.policy.action_space import from_env_action, to_env_action
from parapolicy.realtime.planner import BatchPlanner
from parapolicy.realtime.schedule import ChunkSchedule
from parapolicy.realtime.transitions import forecast_history


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
    image_keys = list(getattr(cfg, "image_keys", None) or [])
    flat, images = window_arrays([list(w) for w in histories], cfg.obs_keys, cfg.obs_dim, image_keys)
    flat = np.stack([forecast_history(rows, lead, *(bounds or (None, None))) for rows in flat])
    return torch.from_numpy(flat), {key: torch.from_numpy(frames) for key, frames in images.items()}


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
                 transition="naive", execution_horizon: int | None = None, label: str | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        from parapolicy.realtime.latency import LatencyModel
        from parapolicy.realtime.transitions import Transition

        self.envs = envs
        self.policy = policy
        self.shadow = shadow
        self.planner = BatchPlanner(policy, clock)  # clock: a call's measured latency (tests script it)
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

    def run_batch(self, seeds: list[int], on_episode: Callable[[int, dict], None] | None = None,
                  on_step: Callable[[list[int], list[dict]], None] | None = None) -> list[dict]:
        """Run one episode per env with ``seeds`` (``len(seeds) <= n_envs``). Returns per-episode
        records: success, length, reward, error, wall_s and per-call measurements (and, with real-time
        timing, ``stall_steps``, ``hold_steps``, ``max_switch_jump``, ``task_time_s``; per call
        ``delay_steps`` and ``switch_jump``).

        ``on_step(rows, records)``: called after the reset and after every env step with the env rows
        that took it and the records so far (e.g. to render a frame); never inside a timed policy call.

        Each env has its own ``ChunkSchedule``; they request together (one batched call for the envs
        still running, sharing its latency), so they stay in step.
        """
        from parapolicy.realtime.latency import delay_steps

        n = len(seeds)
        normalizer = getattr(getattr(self.policy, "normalizer", None), "obs", None)  # forecasts stay in its range
        obs_bounds = None if normalizer is None else (normalizer.min.cpu().numpy(), normalizer.max.cpu().numpy())
        if not 1 <= n <= self.n_envs:
            raise ValueError(f"need 1..{self.n_envs} seeds, got {n}")
        cfg = self.policy.config
        A = cfg.action_dim
        realtime = self.timing != "sync"
        schedules = [ChunkSchedule(cfg.horizon, cfg.action_start, self.execution_horizon, self.transition, self.timing)
                     for _ in range(n)]
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
        last_gripper = np.full(n, -1.0, dtype=np.float32)  # robosuite's gripper starts open
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

        def request(t: int) -> bool:
            """Plan for the active envs from their history at step t; False if the call failed."""
            idx = np.flatnonzero(active)
            lead_schedule = schedules[idx[0]]  # the envs' schedules move together
            first = lead_schedule.first
            m = lead_schedule.candidates()  # bidirectional decoding: m chunks per env, one call
            planned_ms = None if first else self.latency.planned_ms(latency_rng)
            if first:
                d_plan = 0
            elif planned_ms is not None:
                d_plan = delay_steps(planned_ms, self.control_period_s)
            else:  # measured: the prefix assumes the slowest of the last calls (known only afterwards)
                d_plan = lead_schedule.delay_estimate(self.control_period_s)
            known = {i: schedules[i].known(t, d_plan, hold_action(i)) for i in idx} if lead_schedule.needs_known() else {}
            lead = lead_schedule.lead(d_plan)  # planned for t + lead
            obs_history, images = policy_inputs(cfg, [history[i] for i in idx], lead, obs_bounds)
            prefix = weights = None
            pieces = [schedules[i].prefix(known[i], d_plan) for i in idx] if known else []
            if pieces and pieces[0][0] is not None:
                length = min(len(piece[0]) for piece in pieces)
                prefix = np.stack([piece[0][:length] for piece in pieces])
                weights = np.stack([piece[1][:length] for piece in pieces])
            warm_from, warm_shift = None, None
            if self.policy.warm_start and all(previous[i] is not None for i in idx):
                warm_shift = t - lead_schedule.last_request
                if warm_shift < cfg.horizon:
                    warm_from = torch.cat([previous[i] for i in idx])
                else:
                    warm_shift = None
            try:
                plan = self.planner.plan(obs_history, [generators[i] for i in idx], m, images=images, prefix=prefix,
                                         prefix_weights=weights, prefix_mode=self.transition.prefix_mode,
                                         warm_from=warm_from, warm_shift=warm_shift, shadow=self.shadow)
                result, latency_ms = plan.result, plan.latency_ms
                call = {"latency_ms": latency_ms, "batch": int(len(idx)), "rounds": int(result["rounds"]),
                        "model_evals": int(result["model_evals"]), "converged": bool(result["converged"])}
                if images:  # an image policy's encoder share of the call (runs once, before sampling)
                    call["encode_ms"] = float(result["encode_ms"])
                if self.shadow is not None:
                    deviation = (result["action"] - plan.shadow["action"]).abs().amax(dim=(1, 2))
                    deviation = deviation.reshape(len(idx), m).amax(dim=1).cpu().numpy()
            except Exception as err:  # a failing policy call fails its episodes, not the run
                for i in idx:
                    finish(i, f"policy: {type(err).__name__}: {err}")
                return False
            d = 0 if first or not realtime else delay_steps(latency_ms if planned_ms is None else planned_ms,
                                                             self.control_period_s)
            for row, i in enumerate(idx):
                schedule = schedules[i]
                pick = schedule.pick(plan.chunks[row], known.get(i), d_plan)
                previous[i] = plan.samples[row, pick : pick + 1]
                entry = dict(call, warm=warm_from is not None)
                if realtime:
                    entry.update(delay_steps=int(d), blocking=bool(first))
                    if planned_ms is not None:
                        entry["planned_latency_ms"] = float(planned_ms)
                    if m > 1:
                        entry["candidate"] = int(pick)
                if self.shadow is not None:
                    entry.update(shadow_latency_ms=plan.shadow_ms, shadow_deviation=float(deviation[row]))
                records[i]["calls"].append(entry)
                if planned_ms is None and not first:
                    schedule.note_latency(latency_ms)
                # timing=hold: stand still for d steps, then run the chunk from its start
                schedule.requested(t, lead=lead, hold_steps=d if self.timing == "hold" and not first else 0)
                schedule.arrived(plan.chunks[row, pick], t if self.timing == "hold" else t + d)
            return True

        def land(t: int) -> None:
            """The pending chunks take over at step t; record the action jump at the switch (the first action
            the new chunk executes against the last action executed before it: a hold, in timing=hold)."""
            for i in np.flatnonzero(active[:n]):
                _, jump = schedules[i].land(t, hold_action(i))
                if realtime and jump is not None:
                    records[i]["calls"][-1]["switch_jump"] = jump
                    records[i]["max_switch_jump"] = max(records[i]["max_switch_jump"], jump)

        def lead_schedule() -> ChunkSchedule:
            return schedules[int(np.flatnonzero(active)[0])]

        t = 0
        while active.any():
            if lead_schedule().landing_due(t):
                land(t)
            if lead_schedule().due(t):
                if not request(t):
                    break
                if lead_schedule().landing_due(t):
                    land(t)
            idx = np.flatnonzero(active)
            step_actions = np.zeros((self.n_envs, A), dtype=np.float32)
            for i in idx:
                action, kind = schedules[i].action_at(t, hold_action(i))
                step_actions[i] = action
                schedules[i].record(action)
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
