"""``AsyncPolicy``: a control loop that never waits for the policy.

    from parapolicy import load_policy
    from parapolicy.realtime import AsyncPolicy

    with AsyncPolicy(load_policy("square", sampler="ddim", num_inference_steps=10), control_hz=20) as policy:
        policy.reset()
        for _ in range(400):                       # a 20 Hz loop: act() returns at once
            action = policy.act(env.raw_obs)
            obs, reward, terminated, truncated, info = env.step(action)

A background thread plans the next chunk while the robot executes the current one. A plan starts when
``execution_horizon`` actions of the current chunk have been consumed since the last request (and none
is in flight); its delay ``d`` is the number of actions the robot consumed while it ran, so it is exact
whatever the clock. The new chunk takes over at its position ``start + d`` by the ``transition``
(``parapolicy.realtime.transitions``); if the current chunk runs out first, ``act()`` returns the hold
command (zero arm delta, gripper kept) and counts a stall. The first plan of an episode blocks.
Errors raised by the planner surface at the next ``act()``. ``close()`` (or leaving the ``with`` block)
stops the thread.

``policy`` is a local ``DiffusionPolicy`` or a ``RemotePolicy`` (``parapolicy.client``, protocol v2).
Image policies take robosuite's obs dict with the camera frames; a plan sees the frames of the last
``n_obs_steps`` steps (``forecast`` extrapolates the low-dim part only: pixels are never extrapolated).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from types import SimpleNamespace
from typing import Any

import numpy as np

from parapolicy.realtime.transitions import Transition, forecast_history, pick_candidate, prefix_for

DEFAULT_TRANSITION = "auto"  # by policy: trained, else forecast (state) or naive (cameras); see transitions


class AsyncPolicy:
    """Non-blocking wrapper of a chunking policy for a fixed-rate control loop.

    Args:
      policy: a ``DiffusionPolicy`` (planned in-process, on the background thread) or a ``RemotePolicy``.
      control_hz: the loop's rate; the delay estimate for a plan's prefix is
        ``ceil(max recent latency * control_hz)`` (the actual delay is counted in actions).
      transition: how a new chunk takes over (default: ``DEFAULT_TRANSITION``, the best measured).
      execution_horizon: actions consumed between plan starts (default: the policy's n_action_steps).
      seed: seeds the noise of the first episode (``reset(seed=)`` for later ones).

    ``last_info``: ``replanned`` (a new chunk took over at this call), ``delay_steps`` of that chunk,
    ``stall`` (this call returned a hold for want of actions), ``plan_ms`` of the last plan,
    ``latency_s`` (the time ``act()`` took). ``stats``: plans, stalls, the delays.
    """

    def __init__(self, policy, control_hz: float = 20.0, transition: Any = DEFAULT_TRANSITION,
                 execution_horizon: int | None = None, seed: int | None = None):
        if not control_hz > 0 or not math.isfinite(control_hz):
            raise ValueError(f"control_hz must be a positive number, got {control_hz!r}")
        self.policy = policy
        self.control_hz = float(control_hz)
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
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._job: dict | None = None  # a plan to run (set by act, taken by the thread)
        self._result: dict | None = None  # a finished plan (set by the thread, taken by act)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._planner, name="AsyncPolicy-planner", daemon=True)
        self._thread.start()
        self.reset(seed)

    # ------------------------------------------------------------------ episode state
    def reset(self, seed: int | None = None) -> None:
        """Start a new episode (forget history and chunks); waits for a plan in flight to finish."""
        with self._wake:
            while self._job is not None and not self._closed:
                self._wake.wait(timeout=0.1)
            self._result = None
        import torch

        self._generator = torch.Generator().manual_seed(int(seed)) if seed is not None else torch.Generator()
        if seed is None:
            self._generator.seed()
        if self._remote:
            self.policy.reset(seed=seed)
        self._history: deque[np.ndarray] = deque(maxlen=self.n_obs_steps)
        self._frames: deque[dict[str, np.ndarray]] = deque(maxlen=self.n_obs_steps)  # image policies: uint8 [3, H, W]
        self._executed: list[np.ndarray] = []
        self._chunk: np.ndarray | None = None  # [H, A], raw units
        self._chunk_step = 0  # the step its request was made at (its position `start` is that step)
        self._step = 0
        self._last_request: int | None = None
        self._in_flight = False
        self._recent_ms: deque[float] = deque(maxlen=5)
        self._gripper = -1.0
        self.last_info: dict[str, Any] = {}
        self.stats = {"plans": 0, "stalls": 0, "delay_steps": []}

    # ------------------------------------------------------------------ control loop
    def act(self, obs: Any) -> np.ndarray:
        """One control step: record ``obs``, return the next action ``[action_dim]`` without waiting
        (except for the first plan of an episode)."""
        begin = time.perf_counter()
        self._raise_planner_error()
        flat, frames = self._observe(obs)
        if not self._history:
            self._history.extend([flat] * self.n_obs_steps)
            self._frames.extend([frames] * self.n_obs_steps)
        else:
            self._history.append(flat)
            self._frames.append(frames)
        info: dict[str, Any] = {"replanned": False, "stall": False}
        if self._chunk is None:  # the episode's first plan blocks: the robot has nothing to do yet
            result = self._plan(self._job_for(self._step, 0))
            self._take(result, info)
        else:
            with self._lock:  # a forecast chunk that lands early waits for the step it was planned for
                result = self._result
                if result is not None and self._step < result["step"]:
                    result = None
                else:
                    self._result = None
            if result is not None:
                self._take(result, info)
        if not self._in_flight and self._step - self._last_request >= self.execution_horizon:
            self._submit(self._job_for(self._step, self._delay_estimate()))
        action, kind = self._action_at(self._step)
        if kind == "stall":
            info["stall"] = True
            self.stats["stalls"] += 1
        self._executed.append(action)
        self._gripper = float(action[-1])
        self._step += 1
        info["latency_s"] = time.perf_counter() - begin
        self.last_info = info
        if self.action_space != "delta":  # absolute_rot6d poses -> robosuite's absolute command
            from parapolicy.policy.action_space import to_env_action

            action = to_env_action(action, self.action_space)
        return action

    def _take(self, result: dict, info: dict) -> None:
        """A finished plan takes over now: its delay is the actions consumed since the step it was planned
        for (the request's step, or the forecast's), so it never runs actions meant for the past."""
        delay = max(0, self._step - result["step"])
        self._chunk, self._chunk_step = result["chunk"], result["step"]
        self._in_flight = False
        if self.stats["plans"] > 0:  # the first plan blocks (no delay) and is often a cold start: not an estimate
            self.stats["delay_steps"].append(delay)
            self._recent_ms.append(result["plan_ms"])
        self.stats["plans"] += 1
        info.update(replanned=True, delay_steps=delay, plan_ms=result["plan_ms"])

    def _action_at(self, step: int) -> tuple[np.ndarray, str]:
        j = step - self._chunk_step + self.start
        if j >= self.horizon:
            # deltas: zero; absolute poses: the last commanded pose again (the arm settles there and stays)
            hold = np.zeros(self.action_dim, dtype=np.float32) if self.action_space == "delta" else self._executed[-1].copy()
            hold[-1] = self._gripper
            return hold, "stall"
        return np.asarray(self._chunk[j], dtype=np.float32), "chunk"

    def _delay_estimate(self) -> int:
        if not self._recent_ms:
            return 0
        return int(math.ceil(max(self._recent_ms) / 1e3 * self.control_hz - 1e-9))

    def _job_for(self, step: int, delay: int) -> dict:
        """What the planner needs: the history, and the actions the new chunk must agree with."""
        known = None
        if self._chunk is not None and (self.transition.prefix != "none" or self.transition.candidates > 1):
            rows = []
            for j in range(self.horizon):
                when = step - self.start + j
                if when < step:
                    rows.append(self._executed[when] if 0 <= when < len(self._executed) else self._executed[0])
                else:
                    action, kind = self._action_at(when)
                    if kind == "stall" and when >= step + delay:
                        break
                    rows.append(action)
            known = np.asarray(rows, dtype=np.float32)
        self._last_request = step
        # forecast: plan for the moment the chunk is expected to take over (its position `start` is then)
        lead = delay if self.transition.forecast and self._chunk is not None else 0
        history = forecast_history(np.stack(self._history), lead, *self._obs_bounds)
        # a server keeps the last n_obs_steps observations it was sent: sending the whole window makes its
        # history exactly this one (forecast or not)
        return {"step": step + lead, "history": history, "frames": list(self._frames), "known": known,
                "committed": self.start + delay, "first": self._chunk is None}

    # ------------------------------------------------------------------ planning
    def _submit(self, job: dict) -> None:
        with self._wake:
            self._job = job
            self._in_flight = True
            self._wake.notify_all()

    def _planner(self) -> None:
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
        begin = time.perf_counter()
        m = 1 if job["first"] else self.transition.candidates
        prefix = weights = None
        if not job["first"] and job["known"] is not None:
            prefix, weights = prefix_for(self.transition, job["known"], job["committed"], self.horizon,
                                         self.execution_horizon)
        if self._remote:
            observations = self._remote_observations(job) if self.image_keys else job["history"]
            chunks = self.policy.plan_chunk(observations, prefix=prefix, prefix_weights=weights, candidates=m,
                                            delay_steps=job["committed"] - self.start)
        else:
            import torch

            history = torch.from_numpy(job["history"])[None].repeat(m, 1, 1)
            kwargs = {}
            if prefix is not None:
                kwargs = {"prefix": torch.from_numpy(prefix)[None].repeat(m, 1, 1),
                          "prefix_weights": torch.from_numpy(weights)[None].repeat(m, 1),
                          "prefix_mode": self.transition.prefix_mode}
            if self.image_keys:  # {key: [m, n_obs_steps, 3, H, W]}
                kwargs["images"] = {key: torch.from_numpy(np.stack([f[key] for f in job["frames"]]))[None]
                                    .expand(m, -1, -1, -1, -1) for key in self.image_keys}
            plan = self.policy.predict_action(history, generator=self._generator, **kwargs)
            chunks = plan["action_pred"].float().cpu().numpy()
        pick = pick_candidate(chunks, job["known"], job["committed"]) if m > 1 and job["known"] is not None else 0
        return {"chunk": chunks[pick], "step": job["step"], "plan_ms": (time.perf_counter() - begin) * 1e3}

    def _raise_planner_error(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            self._in_flight = False
            raise RuntimeError(f"the planner failed: {type(error).__name__}: {error}") from error

    def _remote_observations(self, job: dict) -> list[dict[str, np.ndarray]]:
        """The window a server plans from, one obs dict per step: the (forecast) low-dim row split back
        into the policy's keys, and that step's frames."""
        keys, sizes = list(self.policy.metadata["obs_keys"]), self._key_sizes
        observations = []
        for row, frames in zip(job["history"], job["frames"]):
            obs, offset = dict(frames), 0
            for key, size in zip(keys, sizes):
                obs[key], offset = row[offset:offset + size], offset + size
            observations.append(obs)
        return observations

    def _observe(self, obs: Any) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """``obs`` checked as the policy checks it: the flat low-dim vector ``[obs_dim]`` and, for image
        policies, the camera frames ``{key: uint8 [3, H, W]}`` (else None)."""
        if not self._remote:
            return self.policy._flat_obs(obs), (self.policy._obs_images(obs) if self.image_keys else None)
        meta = self.policy.metadata
        if not self.image_keys:
            from parapolicy.serving.protocol import flatten_observation

            return flatten_observation(obs, meta["obs_keys"], int(meta["obs_dim"])), None
        kept = self.policy.observation(obs)  # low-dim keys as float32 arrays, then the frames
        self._key_sizes = [int(np.size(kept[key])) for key in meta["obs_keys"]]
        flat = np.concatenate([np.asarray(kept[key], np.float32).reshape(-1) for key in meta["obs_keys"]])
        return flat, {key: kept[key] for key in self.image_keys}

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
