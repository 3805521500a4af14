"""The policy server's message protocol (version ``PROTOCOL_VERSION``), shared by server and client.

Every websocket message is one binary frame holding a msgpack map (``parapolicy.serving.codec``).

server -> client, right after connecting::

    {"type": "metadata", "protocol": 1, "obs_keys": [...], "obs_key_dims": [...] | null, "obs_dim": 23,
     "action_dim": 7, "horizon": 16, "n_obs_steps": 2, "n_action_steps": 8, "sampler": {...},
     "checkpoint": {...}, "batching": {"max_batch", "max_wait_ms"}, "deadline_ms", "max_message_bytes"}

client -> server, a request::

    {"type": "infer",            # optional, the only request type
     "id": 17,                   # int or str, echoed in the reply
     "obs": ...,                 # one observation (robosuite obs dict or flat [obs_dim] array) or a list /
                                 # [k, obs_dim] array of them, oldest first: the steps since the last request
     "reset": false,             # optional: start a new episode (history, warm start, generator)
     "seed": 100000,             # optional, with reset: seeds this robot's torch.Generator
     "deadline_ms": 200.0}       # optional: latency budget of this request (default: the server's)

server -> client, the reply::

    {"type": "action", "id": 17, "action": <float32 [n_action_steps, action_dim]>,
     "timing": {"server_ms", "queue_ms", "plan_ms", "batch", "rounds", "model_evals", "converged",
                "warm", "deadline_ms", "deadline_missed"},
     "seed": 100000}             # in replies to reset requests: the generator's seed (drawn if not sent)

or an error (the connection stays usable)::

    {"type": "error", "id": 17 | null, "code": "bad_message" | "bad_request" | "shutting_down" | "internal",
     "error": "what was wrong"}
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

PROTOCOL_VERSION = 1
REQUEST_KEYS = frozenset({"type", "id", "obs", "reset", "seed", "deadline_ms"})
MAX_OBS_PER_REQUEST = 64
MAX_ID_CHARS = 128
# A policy's obs key -> the name robosuite's own observation dict gives it (as DiffusionPolicy.act reads it).
OBS_KEY_ALIASES = {"object": "object-state"}


class BadRequest(ValueError):
    """A well-formed message whose content is wrong (missing keys, shapes, NaN, ...)."""

    def __init__(self, message: str, request_id: Any = None):
        super().__init__(message)
        self.request_id = request_id


@dataclasses.dataclass
class Request:
    id: int | str
    observations: list[np.ndarray]  # flat float32 [obs_dim] each, oldest first
    reset: bool = False
    seed: int | None = None
    deadline_ms: float | None = None


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and len(value) <= MAX_ID_CHARS)


def request_id_of(message: Any) -> Any:
    """The request's id if it has a valid one (for error replies), else None."""
    if isinstance(message, dict) and _valid_id(message.get("id")):
        return message["id"]
    return None


def _split_observations(obs: Any) -> list[Any]:
    """One observation or a sequence of them -> a list of single observations."""
    if isinstance(obs, Mapping):
        return [obs]
    if isinstance(obs, np.ndarray):
        if obs.ndim == 1:
            return [obs]
        if obs.ndim == 2:
            return list(obs)
        raise ValueError(f"obs array must be [obs_dim] or [k, obs_dim], got shape {list(obs.shape)}")
    if isinstance(obs, list):
        if obs and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obs):
            return [np.asarray(obs, dtype=np.float64)]  # one flat vector sent as a plain list
        return [np.asarray(o, dtype=np.float64) if isinstance(o, list) else o for o in obs]
    raise ValueError(f"obs must be an observation dict, an array or a list of them, got {type(obs).__name__}")


def parse_request(message: Any, flatten: Callable[[Any], np.ndarray]) -> Request:
    """Validate a decoded request. ``flatten(obs) -> float32 [obs_dim]`` checks one observation (keys,
    shape, NaN/inf) and raises ``ValueError`` naming the problem. Raises ``BadRequest``."""
    rid = request_id_of(message)
    if not isinstance(message, dict):
        raise BadRequest(f"a request must be a msgpack map, got {type(message).__name__}")
    unknown = sorted(set(map(str, message)) - REQUEST_KEYS)
    if unknown:
        raise BadRequest(f"unknown request keys {unknown} (allowed: {sorted(REQUEST_KEYS)})", rid)
    kind = message.get("type", "infer")
    if kind != "infer":
        raise BadRequest(f"unknown request type {kind!r} (only 'infer')", rid)
    if "id" not in message:
        raise BadRequest("request lacks 'id'")
    if rid is None:
        raise BadRequest(f"'id' must be an int or a string of at most {MAX_ID_CHARS} characters, "
                         f"got {type(message['id']).__name__}")
    if "obs" not in message:
        raise BadRequest("request lacks 'obs'", rid)
    reset = message.get("reset", False)
    if not isinstance(reset, bool):
        raise BadRequest(f"'reset' must be true or false, got {reset!r}", rid)
    seed = message.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise BadRequest(f"'seed' must be an integer in [0, 2**63), got {seed!r}", rid)
        if not reset:
            raise BadRequest("'seed' is only read with reset=true", rid)
    deadline = message.get("deadline_ms")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                                 or not deadline > 0):
        raise BadRequest(f"'deadline_ms' must be a number > 0, got {deadline!r}", rid)
    try:
        raw = _split_observations(message["obs"])
        if not 1 <= len(raw) <= MAX_OBS_PER_REQUEST:
            raise ValueError(f"obs holds {len(raw)} observations, expected 1..{MAX_OBS_PER_REQUEST}")
        observations = [flatten(o) for o in raw]
    except ValueError as err:
        raise BadRequest(f"bad obs: {err}", rid) from None
    return Request(rid, observations, reset, seed, None if deadline is None else float(deadline))


def flatten_observation(obs: Any, obs_keys: list[str], obs_dim: int) -> np.ndarray:
    """One observation (robosuite-style dict or flat vector) -> float32 ``[obs_dim]``, checked for keys,
    shape and NaN/inf; the same values ``DiffusionPolicy.act`` builds from it (client-side check)."""
    if isinstance(obs, Mapping):
        keys = [k if k in obs else OBS_KEY_ALIASES.get(k, k) for k in obs_keys]
        missing = [k for k, key in zip(obs_keys, keys) if key not in obs]
        if missing:
            raise ValueError(f"observation dict lacks keys {missing} (policy needs {list(obs_keys)})")
        flat = np.concatenate([np.asarray(obs[k], dtype=np.float32).reshape(-1) for k in keys])
    else:
        if hasattr(obs, "detach"):  # torch tensor
            obs = obs.detach().cpu().numpy()
        if not isinstance(obs, (np.ndarray, list, tuple)):
            raise ValueError(f"observation must be a dict or an array, got {type(obs).__name__}")
        flat = np.asarray(obs, dtype=np.float32)
    if flat.shape != (obs_dim,):
        raise ValueError(f"observation must give {obs_dim} values (keys {list(obs_keys)}), got shape {list(flat.shape)}")
    if not np.isfinite(flat).all():
        raise ValueError("observation contains NaN or inf")
    return flat


def error_reply(code: str, message: str, request_id: Any = None) -> dict:
    return {"type": "error", "id": request_id, "code": code, "error": message}
