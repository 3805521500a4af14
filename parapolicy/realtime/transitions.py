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
- ``forecast``: plan from the observations extrapolated ``d`` steps ahead at the robot's current velocity
  (constant-velocity latency compensation; every observation dimension, so a grasped object moves with the
  hand and a resting one stays), and run the new chunk from its position ``start`` when it lands: the
  chunk is planned for the moment it takes over instead of for the moment it was requested.

A name may carry its one option after a colon: ``bid:16`` (candidates), ``ensemble:0.5`` (blend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TRANSITIONS = ("naive", "prefix", "rtc", "ensemble", "bid", "bid_prefix", "forecast")
DEFAULT_CANDIDATES = 8  # bid, bid_prefix: chunks planned per call when the name gives no number
DEFAULT_BLEND = 0.3  # ensemble: the old chunk's weight over the overlap when the name gives none


@dataclass(frozen=True)
class Transition:
    name: str
    prefix: str = "none"  # none | hard | soft
    candidates: int = 1
    blend: float = 0.0  # weight of the old chunk over the overlap
    forecast: bool = False  # plan from observations extrapolated to the moment the chunk takes over

    @classmethod
    def parse(cls, spec) -> "Transition":
        if isinstance(spec, Transition):
            return spec
        name, _, option = str(spec).strip().partition(":")
        if name not in TRANSITIONS:
            raise ValueError(f"unknown transition {spec!r}; choose one of {', '.join(TRANSITIONS)} "
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
        prefix = {"prefix": "hard", "bid_prefix": "hard", "rtc": "soft"}.get(name, "none")
        return cls(str(spec).strip(), prefix, candidates, blend, forecast=name == "forecast")


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
