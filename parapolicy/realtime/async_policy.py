"""``AsyncPolicy``: a control loop that never waits for the policy.

    import parapolicy

    with parapolicy.AsyncPolicy(parapolicy.load_policy("square", sampler="ddim", num_inference_steps=10),
                                control_hz=20) as policy:
        policy.reset()
        for _ in range(400):                       # a 20 Hz loop: act() returns at once
            action = policy.act(env.raw_obs)
            obs, reward, terminated, truncated, info = env.step(action)

A background thread plans the next chunk while the robot executes the current one; which action runs
when is the ``ChunkSchedule`` the simulator's runner uses (``parapolicy.realtime.schedule``), and a plan
is the runner's batched call (``parapolicy.realtime.planner``, the same noise for the same seed). A plan
starts when ``execution_horizon`` actions have run since the last one started (and none is in flight);
its delay ``d`` is the number of actions the robot executed while it ran, so it is exact whatever the
clock. The new chunk takes over at its position ``start + d`` by the ``transition``
(``parapolicy.realtime.transitions``); if the current chunk runs out first, ``act()`` returns the hold
command and counts a stall: zero arm delta, or for absolute-pose policies the arm's current pose
(from the obs dict's ``robot0_eef_pos`` / ``robot0_eef_quat_site``, or ``act(obs, hold=<command>)``), the
gripper as last commanded. The first plan of an episode blocks. Errors raised by the planner surface at
the next ``act()``. ``close()`` (or leaving the ``with`` block) stops the thread.

``policy`` is a local ``DiffusionPolicy`` or a ``RemotePolicy`` (``parapolicy.serving.client``, protocol v2).
Image policies take robosuite's obs dict with the camera frames; a plan sees the frames of the last
``n_obs_steps`` steps (``forecast`` extrapolates the low-dim part only: pixels are never extrapolated).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from parapolicy.observation import camera_frames, dict_keys, flatten_observation, pose_hold_command, split_flat
from parapolicy.realtime.planner import BatchPlanner
from parapolicy.realtime.schedule import ChunkSchedule
from parapolicy.realtime.transitions import Transition, forecast_history

DEFAULT_TRANSITION = "auto"  # by policy: trained, else forecast (state) or naive (cameras); see transitions


class AsyncPolicy:
    """Non-blocking wrapper of a chunking policy for a fixed-rate control loop.

    Args:
      policy: a ``DiffusionPolicy`` (planned in-process, on the background thread) or a ``RemotePolicy``.
      control_hz: the loop's rate; the delay estimate for a plan's prefix is the slowest of the last
        ``LATENCY_WINDOW`` plans, in control steps (the actual delay is counted in actions).
      transition: how a new chunk takes over (default: ``DEFAULT_TRANSITION``, the best measured).
      execution_horizon: actions consumed between plan starts (default: the policy's n_action_steps).
      seed: seeds the noise of the first episode (``reset(seed=)`` for later ones).
      clock: seconds, to time plans (``time.perf_counter``; tests script it).

    ``last_info``: ``replanned`` (a new chunk took over at this call), ``delay_steps`` of that chunk,
    ``requested`` (a plan started at this call), ``stall`` (this call returned a hold for want of
    actions), ``plan_ms`` of the last plan, ``latency_s`` (the time ``act()`` took). ``stats``: plans,
    stalls, the delays.
    """

    def __init__(self, policy, control_hz: float = 20.0, transition: Any = DEFAULT_TRANSITION,
                 execution_horizon: int | None = None, seed: int | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        if not control_hz > 0 or not math.isfinite(control_hz):
            raise ValueError(f"control_hz must be a positive number, got {control_hz!r}")
        self.policy = policy
        self.control_hz = float(control_hz)
        self.control_period_s = 1.0 / self.control_hz
        self.clock = clock
        self._remote = not hasattr(policy, "predict_action")
        normalizer = getattr(getattr(policy, "normalizer", None), "obs", None)  # forecasts stay in its range
        self._obs_bounds = (None, None) if normalizer is None else (normalizer.min.cpu().numpy(),
                                                                   normalizer.max.cpu().numpy())
        meta = policy.metadata if self._remote else None
        cfg = None if self._remote else policy.config
        self.horizon = int(meta["horizon"]) if self._remote else cfg.horizon
        self.n_obs_steps = int(meta["n_obs_steps"]) if self._remote else cfg.n_obs_steps
        self.action_dim = int(meta["action_dim"]) if self._remote else cfg.action_dim
        self.action_space = meta.get("action_space", "delta") if self._remote else getattr(cfg, "action_space", "delta")
        self.image_keys = list((meta.get("image_keys") if self._remote else getattr(cfg, "image_keys", None)) or [])
        self.obs_keys = list(meta["obs_keys"]) if self._remote else list(cfg.obs_keys)
        self.obs_dim = int(meta["obs_dim"]) if self._remote else int(cfg.obs_dim)
        self.image_shape = (meta.get("image_shape") if self._remote else getattr(cfg, "image_shape", None))
        self.start = self.n_obs_steps - 1
        described = cfg if cfg is not None else SimpleNamespace(max_delay=int(meta.get("max_delay") or 0),
                                                                image_keys=self.image_keys)
        self.transition = Transition.parse(transition, described)
        self.transition.check_policy(described)
        n_action_steps = int(meta["n_action_steps"]) if self._remote else cfg.n_action_steps
        horizon = n_action_steps if execution_horizon is None else execution_horizon
        if isinstance(horizon, bool) or not isinstance(horizon, int) or not 1 <= horizon <= self.horizon - self.start:
            raise ValueError(f"execution_horizon must be an integer in [1, {self.horizon - self.start}], "
                             f"got {execution_horizon!r}")
        self.execution_horizon = horizon
        self.schedule = ChunkSchedule(self.horizon, self.start, horizon, self.transition, "async")
        self._planner = None if self._remote else BatchPlanner(policy, clock)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._job: dict | None = None  # a plan to run (set by act, taken by the thread)
        self._result: dict | None = None  # a finished plan (set by the thread, taken by act)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._planner_loop, name="AsyncPolicy-planner", daemon=True)
        self._thread.start()
        self.reset(seed)

    # ------------------------------------------------------------------ episode state
    def reset(self, seed: int | None = None) -> None:
        """Start a new episode (forget history and chunks); waits for a plan in flight to finish."""
        self.wait_for_plan()
        with self._wake:
            self._result = None
        import torch

        self._generator = torch.Generator().manual_seed(int(seed)) if seed is not None else torch.Generator()
        if seed is None:
            self._generator.seed()
        if self._remote:
            self.policy.reset(seed=seed)
        self._history: deque[np.ndarray] = deque(maxlen=self.n_obs_steps)
        self._frames: deque[dict[str, np.ndarray]] = deque(maxlen=self.n_obs_steps)  # image policies: uint8 [3, H, W]
        self.schedule.reset()
        self._previous_sample = None  # warm starts never cross episodes
        self._step = 0
        self._gripper = -1.0  # robosuite's gripper starts open
        self.last_info: dict[str, Any] = {}
        self.stats = {"plans": 0, "stalls": 0, "delay_steps": []}

    def wait_for_plan(self, timeout_s: float | None = None) -> bool:
        """Block until no plan is being computed (its chunk is then taken at the next ``act()``); False if
        ``timeout_s`` passed first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._wake:
            while self._job is not None and not self._closed:
                left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if left <= 0:
                    return False
                self._wake.wait(timeout=left)
        return True

    # ------------------------------------------------------------------ control loop
    def act(self, obs: Any, hold: np.ndarray | None = None) -> np.ndarray:
        """One control step: record ``obs``, return the next action without waiting (except for the first
        plan of an episode): ``[action_dim]``, or an absolute-pose policy's env command ``[7]``.

        ``hold``: the env command that keeps the arm still now (absolute-pose policies whose ``obs`` is not
        robosuite's obs dict; delta policies hold with a zero delta)."""
        begin = time.perf_counter()
        self._raise_planner_error()
        flat, frames = self._observe(obs)
        if not self._history:
            self._history.extend([flat] * self.n_obs_steps)
            self._frames.extend([frames] * self.n_obs_steps)
        else:
            self._history.append(flat)
            self._frames.append(frames)
        hold_action = self._hold_action(obs, hold)
        info: dict[str, Any] = {"replanned": False, "stall": False, "requested": False}
        schedule, t = self.schedule, self._step
        if schedule.first:  # the episode's first plan blocks: the robot has nothing to do yet
            job = self._job_for(t, 0, hold_action)
            schedule.requested(t)
            self._arrive(self._plan(job), t)
        else:
            with self._lock:
                result, self._result = self._result, None
            if result is not None:
                self._arrive(result, t)
        if schedule.landing_due(t):
            self._land(t, hold_action, info)
        if schedule.due(t):
            d = schedule.delay_estimate(self.control_period_s)
            job = self._job_for(t, d, hold_action)
            schedule.requested(t, lead=job["lead"])
            info["requested"] = True
            self._submit(job)
        action, kind = schedule.action_at(t, hold_action)
        action = np.asarray(action, dtype=np.float32)
        if kind == "stall":
            info["stall"] = True
            self.stats["stalls"] += 1
        schedule.record(action)
        self._gripper = float(action[-1])
        self._step += 1
        info["latency_s"] = time.perf_counter() - begin
        self.last_info = info
        if self.action_space != "delta":  # absolute_rot6d poses -> robosuite's absolute command
            from parapolicy.policy.action_space import to_env_action

            action = to_env_action(action, self.action_space)
        return action

    def _hold_action(self, obs: Any, hold: np.ndarray | None):
        """The stay-in-place action in the policy's terms, the gripper as last commanded: an array, or for
        absolute-pose policies a function computing it (from the pose in ``obs``) when a hold is needed."""
        gripper = self._gripper
        if self.action_space == "delta":
            action = np.zeros(self.action_dim, dtype=np.float32)
            action[-1] = gripper
            return action
        cached: list[np.ndarray] = []

        def pose() -> np.ndarray:
            if not cached:
                from parapolicy.policy.action_space import from_env_action

                try:
                    command = pose_hold_command(obs, gripper) if hold is None else np.asarray(hold, np.float32)
                except ValueError as err:
                    raise ValueError(f"{err}; or pass the env command that holds the arm: act(obs, hold=...)") from None
                action = np.asarray(from_env_action(command, self.action_space), dtype=np.float32)
                action[-1] = gripper
                cached.append(action)
            return cached[0]

        return pose

    def _arrive(self, result: dict, t: int) -> None:
        self.schedule.arrived(result["chunk"], t)
        self._previous_sample = result.get("sample")
        self._last_plan_ms = result["plan_ms"]

    def _land(self, t: int, hold_action: np.ndarray, info: dict) -> None:
        """The pending chunk takes over now: its delay is the actions executed since the step it was planned
        for (the request's step, or the forecast's), so it never runs actions meant for the past."""
        first = self.stats["plans"] == 0
        delay, _ = self.schedule.land(t, hold_action)
        if not first:  # the first plan blocks (no delay) and is often a cold start: not an estimate
            self.stats["delay_steps"].append(delay)
            self.schedule.note_latency(self._last_plan_ms)
        self.stats["plans"] += 1
        info.update(replanned=True, delay_steps=delay, plan_ms=self._last_plan_ms)

    def _job_for(self, t: int, d: int, hold_action: np.ndarray) -> dict:
        """What the planner needs: the history, and the actions the new chunk must agree with."""
        schedule = self.schedule
        known = schedule.known(t, d, hold_action) if schedule.needs_known() else None
        prefix, weights = schedule.prefix(known, d) if known is not None else (None, None)
        lead = schedule.lead(d)  # forecast: planned for the moment the chunk is expected to take over
        history = forecast_history(np.stack(self._history), lead, *self._obs_bounds)
        warm_shift = None if schedule.last_request is None else t - schedule.last_request
        # a server keeps the last n_obs_steps observations it was sent: sending the whole window makes its
        # history exactly this one (forecast or not)
        return {"history": history, "frames": list(self._frames), "known": known, "d": d, "lead": lead,
                "prefix": prefix, "weights": weights, "candidates": schedule.candidates(),
                "warm_from": self._previous_sample, "warm_shift": warm_shift}

    # ------------------------------------------------------------------ planning
    def _submit(self, job: dict) -> None:
        with self._wake:
            self._job = job
            self._wake.notify_all()

    def _planner_loop(self) -> None:
        while True:
            with self._wake:
                while self._job is None and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                job = self._job
            try:
                result = self._plan(job)
            except BaseException as err:  # noqa: BLE001 - handed to act()
                result = None
                with self._wake:
                    self._error = err
            with self._wake:
                if result is not None:
                    self._result = result
                self._job = None
                self._wake.notify_all()

    def _plan(self, job: dict) -> dict:
        """Plan one chunk ``[H, A]`` (raw units) from ``job``; runs on the planner thread (or inline first)."""
        m = job["candidates"]
        sample = None
        if self._remote:
            begin = self.clock()
            observations = self._remote_observations(job) if self.image_keys else job["history"]
            chunks = self.policy.plan_chunk(observations, prefix=job["prefix"], prefix_weights=job["weights"],
                                            candidates=m, delay_steps=job["d"])
            plan_ms = (self.clock() - begin) * 1e3
        else:
            import torch

            images = None
            if self.image_keys:  # {key: [1, n_obs_steps, 3, H, W]}
                images = {key: np.stack([f[key] for f in job["frames"]])[None] for key in self.image_keys}
            warm = getattr(self.policy, "warm_start", False) and job["warm_from"] is not None and job["warm_shift"] < self.horizon
            plan = self._planner.plan(
                torch.from_numpy(job["history"])[None], [self._generator], m, images=images,
                prefix=None if job["prefix"] is None else job["prefix"][None],
                prefix_weights=None if job["weights"] is None else job["weights"][None],
                prefix_mode=self.transition.prefix_mode,
                warm_from=job["warm_from"] if warm else None, warm_shift=job["warm_shift"] if warm else None)
            chunks, plan_ms = plan.chunks[0], plan.latency_ms
        pick = self.schedule.pick(chunks, job["known"], job["d"])
        if not self._remote and plan.samples is not None:
            sample = plan.samples[0, pick : pick + 1]
        return {"chunk": chunks[pick], "sample": sample, "plan_ms": plan_ms}

    def _raise_planner_error(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            self.schedule.pending = None  # the failed plan never lands
            raise RuntimeError(f"the planner failed: {type(error).__name__}: {error}") from error

    def _remote_observations(self, job: dict) -> list[dict[str, np.ndarray]]:
        """The window a server plans from, one obs dict per step: the (forecast) low-dim row split back
        into the policy's keys, and that step's frames."""
        return [{**frames, **split_flat(row, self.obs_keys, self._key_sizes)}
                for row, frames in zip(job["history"], job["frames"])]

    def _observe(self, obs: Any) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """``obs`` checked as the policy checks it: the flat low-dim vector ``[obs_dim]`` and, for image
        policies, the camera frames ``{key: uint8 [3, H, W]}`` (else None)."""
        flat = flatten_observation(obs, self.obs_keys, self.obs_dim, sequences=self._remote)
        if not self.image_keys:
            return flat, None
        if self._remote:
            self._key_sizes = [int(np.size(obs[key])) for key in dict_keys(obs, self.obs_keys)]
        return flat, camera_frames(obs, self.image_keys, self.image_shape)

    # ------------------------------------------------------------------ lifetime
    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the planner thread (a plan in flight finishes first, within ``timeout_s``)."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            raise RuntimeError(f"the planner thread did not stop within {timeout_s} s")

    def __enter__(self) -> "AsyncPolicy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
