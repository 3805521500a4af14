"""The chunk schedule of one robot: which action runs at each control step. No clock, no threads.

Steps are counted from the episode's first observation (step 0). A chunk has ``horizon`` positions; a
plan requested at step r holds the chunk whose position ``start = n_obs_steps - 1`` is step r (or r + lead
for a forecast, planned for the moment it takes over). So the action of the chunk in force at step t is
its position ``t - chunk_step + start``; past the chunk's end the robot holds (a *stall*). With
``timing="hold"`` the robot also holds for the d steps a plan takes, then runs the chunk from its start.

*Hold* is the controller's stay-in-place command: a zero arm delta, or for absolute-pose policies the
arm's current pose (``parapolicy.observation.pose_hold_command``), with the gripper as last commanded.
The caller passes it in (it knows the robot), so the simulator's runner and ``AsyncPolicy`` hold alike;
it may be a function returning it, called only when a hold is needed.

A plan's life: ``due(t)`` says a plan should start at step t; ``requested(t, ...)`` books it (planned
for step t + lead); ``arrived(chunk, t)`` gives its chunk when it is known (the runner: at once, landing
d steps later; ``AsyncPolicy``: when the planner thread is done); ``landing_due(t)`` / ``land(t)`` switch to
it at the first step it may run. What the new chunk must agree with (``known``) and where it is certain
(``committed``) are what the prefix transitions and bidirectional decoding need.

Used by ``parapolicy.realtime.runner.PolicyRunner`` (one schedule per env) and ``AsyncPolicy``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from parapolicy.realtime.latency import delay_steps
from parapolicy.realtime.transitions import Transition, pick_candidate, prefix_for

# the delay a plan's prefix assumes is that of the slowest of this many latest plans
LATENCY_WINDOW = 5
TIMINGS = ("sync", "async", "hold")


@dataclass
class PendingPlan:
    """A requested plan: its chunk (None until it arrives), the step its position ``start`` is, the
    first step it may take over, when it arrived and when it was requested."""

    step: int
    earliest: int
    requested: int
    chunk: np.ndarray | None = None
    arrived: int | None = None


class ChunkSchedule:
    """One robot's chunks, in control steps.

    Args:
      horizon, start: the chunk's length H and the position of the request's own step (``n_obs_steps - 1``).
      execution_horizon: steps between plan starts.
      transition: how a new chunk takes over (``Transition`` or its name).
      timing: "sync" (every plan lands at once), "async" or "hold".
    """

    def __init__(self, horizon: int, start: int, execution_horizon: int, transition="naive", timing: str = "async"):
        if timing not in TIMINGS:
            raise ValueError(f"timing must be one of {', '.join(TIMINGS)}, got {timing!r}")
        self.horizon, self.start, self.execution_horizon = int(horizon), int(start), int(execution_horizon)
        self.transition = Transition.parse(transition)
        self.timing = timing
        self.reset()

    def reset(self) -> None:
        """A new episode: no chunk, nothing executed, no latency seen."""
        self.chunk: np.ndarray | None = None  # [H, A], raw units
        self.chunk_step = 0  # the step of the chunk's position `start`
        self.old: np.ndarray | None = None  # the chunk before (blending transitions only)
        self.old_step: int | None = None
        self.hold_until = 0  # timing=hold: the robot holds before this step
        self.pending: PendingPlan | None = None
        self.next_request = 0
        self.last_request: int | None = None
        self.executed: list[np.ndarray] = []  # the action of every step so far
        self.recent_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)

    # ------------------------------------------------------------------ executing
    @property
    def first(self) -> bool:
        """No chunk yet: the next plan is the episode's first (it blocks, without delay)."""
        return self.chunk is None and self.pending is None

    def action_at(self, t: int, hold: np.ndarray) -> tuple[np.ndarray, str]:
        """(action ``[A]``, kind) at step t: kind is "chunk", "hold" (timing=hold, while planning) or "stall"
        (the chunk ran out); ``hold`` is the stay-in-place action."""
        if t < self.hold_until:
            return _resolve(hold), "hold"
        j = t - self.chunk_step + self.start
        if j >= self.horizon:
            return _resolve(hold), "stall"
        action = self.chunk[j]
        blend = self.transition.blend
        if blend > 0 and self.old is not None:
            k = t - self.old_step + self.start
            if k < self.horizon:
                action = blend * self.old[k] + (1 - blend) * action
        return action, "chunk"

    def record(self, action: np.ndarray) -> None:
        """The action the robot executed at the next step (``len(executed)``)."""
        self.executed.append(np.asarray(action, dtype=np.float32))

    # ------------------------------------------------------------------ planning
    def due(self, t: int) -> bool:
        """Whether a plan should start at step t: none pending and ``execution_horizon`` steps since the last
        (timing=hold: since its chunk started)."""
        return self.pending is None and t >= self.next_request

    def note_latency(self, latency_ms: float) -> None:
        """A plan's latency (not the first's: it blocks, often on a cold start), for ``delay_estimate``."""
        self.recent_ms.append(float(latency_ms))

    def delay_estimate(self, control_period_s: float) -> int:
        """The delay the next plan's prefix assumes: the slowest of the last ``LATENCY_WINDOW`` plans, in steps."""
        return delay_steps(max(self.recent_ms), control_period_s) if self.recent_ms else 0

    def lead(self, d: int) -> int:
        """How far ahead a plan with delay d is planned: d for ``forecast`` (async), else 0."""
        return d if self.transition.forecast and self.timing == "async" and not self.first else 0

    def candidates(self) -> int:
        """Chunks to plan at once (bidirectional decoding), 1 for the first plan."""
        return 1 if self.first else self.transition.candidates

    def needs_known(self) -> bool:
        """Whether the next plan needs ``known`` (a prefix or candidates to compare)."""
        return self.timing != "sync" and not self.first and (self.transition.prefix != "none"
                                                              or self.transition.candidates > 1)

    def known(self, t: int, d: int, hold: np.ndarray) -> np.ndarray:
        """``[K, A]``: what the robot did or will do at a plan's positions 0..K-1 (requested at step t with
        delay d): the executed actions before t, then what runs during the d planning steps, then the
        current chunk while it lasts."""
        rows = []
        for j in range(self.horizon):
            when = t - self.start + j
            if when < t:
                rows.append(self.executed[when] if when >= 0 else self.executed[0] if self.executed else _resolve(hold))
            elif when < t + d:
                rows.append(self.action_at(when, hold)[0])
            else:
                k = when - self.chunk_step + self.start
                if k >= self.horizon:
                    break
                rows.append(self.chunk[k])
        return np.asarray(rows, dtype=np.float32)

    def committed(self, d: int) -> int:
        """Positions of a plan with delay d that are certain before it can take over: ``start + d``."""
        return self.start + d

    def prefix(self, known: np.ndarray, d: int):
        """``(prefix [L, A], weights [L])`` for the transition (async only), or ``(None, None)``."""
        if self.timing != "async" or self.first:
            return None, None
        return prefix_for(self.transition, known, self.committed(d), self.horizon, self.execution_horizon)

    def pick(self, candidates: np.ndarray, known: np.ndarray | None, d: int) -> int:
        """The candidate ``[M, H, A]`` closest to ``known`` over the committed positions (0 for one)."""
        if len(candidates) == 1 or known is None:
            return 0
        return pick_candidate(candidates, known, self.committed(d))

    def requested(self, t: int, lead: int = 0, hold_steps: int = 0) -> None:
        """A plan starts at step t, planned for step t + lead (forecast); timing=hold: the robot holds
        ``hold_steps`` (its delay) and then runs the new chunk from its start."""
        if hold_steps and self.timing != "hold":
            raise ValueError("hold_steps is timing=hold's")
        self.last_request = t
        if hold_steps:
            self.hold_until = t + hold_steps
            self.pending = PendingPlan(step=t + hold_steps, earliest=t, requested=t)
        else:
            self.pending = PendingPlan(step=t + lead, earliest=t + lead, requested=t)
        self.next_request = t + hold_steps + self.execution_horizon

    def arrived(self, chunk: np.ndarray, t: int) -> None:
        """The pending plan's chunk ``[H, A]`` is known from step t on."""
        self.pending.chunk, self.pending.arrived = chunk, int(t)

    def landing_due(self, t: int) -> bool:
        """Whether the pending chunk takes over at step t (it has arrived, and its planned step has come)."""
        p = self.pending
        return p is not None and p.chunk is not None and t >= max(p.arrived, p.earliest)

    def land(self, t: int, hold: np.ndarray) -> tuple[int, float | None]:
        """The pending chunk takes over at step t. Returns (its delay: steps past the step it was planned
        for, the action jump at the switch: its first action against the last one executed (a hold, in
        timing=hold); None before any action or when it starts past its end)."""
        p, self.pending = self.pending, None
        self.old, self.old_step = (self.chunk, self.chunk_step) if self.transition.blend > 0 else (None, None)
        self.chunk, self.chunk_step = p.chunk, p.step
        first_position = max(t, p.step) - p.step + self.start
        jump = None
        if self.executed and first_position < self.horizon:
            before = _resolve(hold) if p.step > t else self.executed[-1]
            jump = float(np.abs(p.chunk[first_position] - before).max())
        return max(0, t - p.step), jump


def _resolve(hold):
    return hold() if callable(hold) else hold
