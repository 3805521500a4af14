"""Chunk transitions: how a new action chunk takes over from the one the robot is executing.

Index alignment (Diffusion Policy): a chunk has ``H`` positions, position ``start = n_obs_steps - 1`` is
the step at which it was requested. If the new chunk was requested ``shift`` steps after the old one,
position ``j`` of the new chunk is the control step of position ``j + shift`` of the old one. While the
new chunk is planned (``d`` steps), the robot executes the old chunk's positions ``start + shift ..
start + shift + d - 1``; the new chunk then runs from its position ``start + d``.

Transitions (``transition=<name>``):

- ``naive``: switch to the new chunk at ``start + d`` (its first d actions dropped).
- ``prefix``: the new chunk is planned with its positions ``[0, start + d)`` known (the actions executed
  before and during planning), imposed at every denoising step (``predict_action(prefix=...)``).
- ``rtc``: ``prefix`` plus Real-Time Chunking's decaying soft weights over the rest of the overlap.
- ``ensemble``: over the overlap, execute ``blend * old + (1 - blend) * new`` (LeRobot's async merge).
- ``bid``: plan ``candidates`` chunks at once (one batched call) and keep the one closest to the actions
  the robot executes before and during planning (bidirectional decoding's backward coherence).
- ``bid_prefix``: both.
- ``trained``: ``prefix`` for a policy trained for delay (``config.max_delay > 0``): the committed
  positions ``[0, start + d)`` are also given to the network as known clean actions, as in training
  (``predict_action(prefix_mode="trained")``), so the new chunk continues what the robot does. A policy
  that was not trained for delay refuses it.
- ``forecast``: plan from the observations extrapolated ``d`` steps ahead at the robot's current velocity
  (constant-velocity latency compensation; every observation dimension, so a grasped object moves with the
  hand and a resting one stays), and run the new chunk from its position ``start`` when it lands: the
  chunk is planned for the moment it takes over instead of for the moment it was requested.

``auto`` (the eval's and ``AsyncPolicy``'s default) picks by policy: ``trained`` for a policy trained for
delay, ``forecast`` for a state policy, ``naive`` for one that sees cameras (forecasting its proprioception
against stale frames cost the Lift image policy 10 of 30 successes at d = 4; ``timing=hold`` kept 30 of 30).

A name may carry its one option after a colon: ``bid:16`` (candidates), ``ensemble:0.5`` (blend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TRANSITIONS = ("naive", "prefix", "rtc", "ensemble", "bid", "bid_prefix", "forecast", "trained")
DEFAULT_CANDIDATES = 8  # bid, bid_prefix: chunks planned per call when the name gives no number
DEFAULT_BLEND = 0.3  # ensemble: the old chunk's weight over the overlap when the name gives none


@dataclass(frozen=True)
class Transition:
    name: str
    prefix: str = "none"  # none | hard | soft
    candidates: int = 1
    blend: float = 0.0  # weight of the old chunk over the overlap
    forecast: bool = False  # plan from observations extrapolated to the moment the chunk takes over
    trained: bool = False  # the prefix is also the network's known-actions input (a delay-conditioned policy)

    @classmethod
    def parse(cls, spec, config=None) -> "Transition":
        """The transition named by ``spec``; ``auto`` needs the policy's ``config`` to choose (without it,
        ``auto`` parses as itself, for checking a config before the policy is loaded)."""
        if isinstance(spec, Transition):
            spec = spec.name
        name, _, option = str(spec).strip().partition(":")
        if name == "auto":
            if option:
                raise ValueError(f"transition 'auto' takes no option, got {spec!r}")
            if config is None:
                return cls("auto")
            return cls.parse(auto_transition(config))
        if name not in TRANSITIONS:
            raise ValueError(f"unknown transition {spec!r}; choose auto or one of {', '.join(TRANSITIONS)} "
                             f"(bid:<candidates>, ensemble:<old weight>)")
        candidates, blend = 1, 0.0
        if name in ("bid", "bid_prefix"):
            candidates = DEFAULT_CANDIDATES
            if option:
                candidates = int(option) if option.isdigit() else 0
                if candidates < 1:
                    raise ValueError(f"transition {spec!r}: the candidates after ':' must be an integer >= 1")
        elif name == "ensemble":
            blend = DEFAULT_BLEND
            if option:
                try:
                    blend = float(option)
                except ValueError:
                    blend = -1.0
                if not 0.0 <= blend <= 1.0:
                    raise ValueError(f"transition {spec!r}: the old chunk's weight after ':' must be in [0, 1]")
        elif option:
            raise ValueError(f"transition {name!r} takes no option, got {spec!r}")
        prefix = {"prefix": "hard", "bid_prefix": "hard", "rtc": "soft", "trained": "hard"}.get(name, "none")
        return cls(str(spec).strip(), prefix, candidates, blend, forecast=name == "forecast", trained=name == "trained")

    @property
    def prefix_mode(self) -> str:
        """``predict_action``'s ``prefix_mode`` for this transition's prefix."""
        return "trained" if self.trained else "inpaint"

    def check_policy(self, config) -> None:
        """Refuse a transition the policy cannot take: ``trained`` needs a policy trained for delay."""
        if self.trained and not getattr(config, "max_delay", 0):
            raise ValueError("transition=trained needs a policy trained for delay (config max_delay > 0, e.g. "
                             "checkpoints/square_delay or checkpoints/lift_image_delay); this one was not: "
                             "use transition=forecast, prefix or naive, or timing=hold")


def auto_transition(config) -> str:
    """The transition ``auto`` stands for with a policy of this config (see the module docstring)."""
    if getattr(config, "max_delay", 0):
        return "trained"
    return "naive" if getattr(config, "image_keys", None) else "forecast"


def rtc_weights(horizon: int, committed: int, execution_horizon: int) -> np.ndarray:
    """``[horizon]`` soft prefix weights (Real-Time Chunking): 1 on the ``committed`` positions, then
    c * (e^c - 1) / (e - 1) with c falling linearly to 0 at ``horizon - execution_horizon``, 0 after."""
    weights = np.zeros(horizon, dtype=np.float32)
    overlap_end = max(horizon - execution_horizon, committed)
    for i in range(horizon):
        if i < committed:
            weights[i] = 1.0
        elif i < overlap_end:
            c = min(max((overlap_end - i) / (overlap_end - committed + 1), 0.0), 1.0)
            weights[i] = c * (math.exp(c) - 1) / (math.e - 1)
    return weights


def prefix_for(transition: Transition, known: np.ndarray, committed: int, horizon: int, execution_horizon: int):
    """``(prefix [L, A], weights [L])`` for ``predict_action``, or ``(None, None)``.

    known ``[K, A]``: the old chunk aligned to the new one's positions (``known[j]`` is what the robot
    does, or would do, at the new chunk's position j), K <= horizon; ``committed``: how many leading
    positions are certain (executed before the new chunk can take over, ``start + d``).
    """
    if transition.prefix == "none" or committed < 1:
        return None, None
    if transition.prefix == "hard":
        length = min(committed, len(known))
        return known[:length], np.ones(length, dtype=np.float32)
    weights = rtc_weights(horizon, committed, execution_horizon)[: len(known)]
    length = int(np.flatnonzero(weights > 0).max()) + 1 if (weights > 0).any() else 0
    if length == 0:
        return None, None
    return known[:length], weights[:length]


def pick_candidate(candidates: np.ndarray, known: np.ndarray, committed: int) -> int:
    """Bidirectional decoding's backward coherence: the index of the chunk ``candidates [M, H, A]``
    closest (squared distance) to ``known [K, A]`` over the first ``committed`` positions."""
    length = min(committed, len(known), candidates.shape[1])
    if length < 1:
        return 0
    distance = ((candidates[:, :length] - known[None, :length]) ** 2).sum(axis=(1, 2))
    return int(np.argmin(distance))


def forecast_history(history: np.ndarray, steps: int, low=None, high=None) -> np.ndarray:
    """``[n_obs, obs_dim]`` observations (oldest first) -> the same window ``steps`` control steps later,
    extrapolated at the velocity of the last two observations (unchanged if ``steps`` is 0 or there is
    one observation). ``low``/``high`` ``[obs_dim]`` (the policy's normaliser range: what it was trained
    on) bound the forecast, so a closing gripper is not extrapolated past where fingers stop."""
    if steps <= 0 or len(history) < 2:
        return history
    velocity = history[-1] - history[-2]
    forecast = history + steps * velocity[None]
    if low is not None and high is not None:
        forecast = np.clip(forecast, np.minimum(low, history.min(0)), np.maximum(high, history.max(0)))
    return forecast.astype(history.dtype)
