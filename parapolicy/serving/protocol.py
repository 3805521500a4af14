"""The policy server's message protocol (versions 1 and 2), shared by server and client.

Version 2 adds real-time chunking (``parapolicy.realtime``) to version 1 without changing it: a v1 client
sends v1 requests and gets v1 replies from a v2 server. The metadata still says ``"protocol": 1`` (what a
v1 client checks) and lists ``"protocols": [1, 2]``; a v2 client requires 2 in that list.

Every websocket message is one binary frame holding a msgpack map (``parapolicy.serving.codec``).

server -> client, right after connecting::

    {"type": "metadata", "protocol": 1, "obs_keys": [...], "obs_key_dims": [...] | null, "obs_dim": 23,
     "action_dim": 7, "horizon": 16, "n_obs_steps": 2, "n_action_steps": 8, "sampler": {...},
     "checkpoint": {...}, "batching": {"max_batch", "max_wait_ms"}, "deadline_ms", "max_message_bytes",
     "image_keys": [...], "image_shape": [3, H, W] | null}   # image policies: the cameras they see

client -> server, a request::

    {"type": "infer",            # optional, the only request type
     "id": 17,                   # int or str, echoed in the reply
     "obs": ...,                 # one observation (robosuite obs dict or flat [obs_dim] array) or a list /
                                 # [k, obs_dim] array of them, oldest first: the steps since the last request;
                                 # an image policy's are dicts holding its cameras' uint8 frames
                                 # ([H, W, 3] or [3, H, W]) beside the low-dim keys
     "reset": false,             # optional: start a new episode (history, warm start, generator)
     "seed": 100000,             # optional, with reset: seeds this robot's torch.Generator
     "deadline_ms": 200.0}       # optional: latency budget of this request (default: the server's)

version 2 adds, all optional (``RemotePolicy.plan_chunk``, ``AsyncPolicy``)::

     "chunk": true,              # reply with the whole predicted chunk(s), not the executed slice
     "candidates": 8,            # plan this many chunks in one call (bidirectional decoding); needs chunk
     "prefix": <float32 [L, A]>, # known leading actions of the chunk (raw units): the actions the robot
                                 # executes before the new chunk can take over; imposed at every step
     "prefix_weights": <[L]>,    # in [0, 1], default 1 (exact); RTC-style soft weights below 1
     "delay_steps": 4            # the client's delay estimate for this plan (recorded in the timing)

and its reply to a ``chunk`` request carries ``"chunks": <float32 [candidates, horizon, A]>`` and
``"start"`` (the position of the request's own step) instead of ``"action"``. The server keeps no
chunk: the client sends the prefix because only it knows what the robot actually executed (stalls,
holds, blends).

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

PROTOCOL_VERSION = 1  # what the metadata's "protocol" says, so that v1 clients keep connecting
PROTOCOLS = (1, 2)  # served; v2 = v1 + the real-time keys below
V2_KEYS = frozenset({"chunk", "candidates", "prefix", "prefix_weights", "delay_steps"})
REQUEST_KEYS = frozenset({"type", "id", "obs", "reset", "seed", "deadline_ms"}) | V2_KEYS
MAX_CANDIDATES = 64
MAX_OBS_PER_REQUEST = 64
MAX_ID_CHARS = 128


class BadRequest(ValueError):
    """A well-formed message whose content is wrong (missing keys, shapes, NaN, ...)."""

    def __init__(self, message: str, request_id: Any = None):
        super().__init__(message)
        self.request_id = request_id


@dataclasses.dataclass
class Request:
    id: int | str
    observations: list[np.ndarray]  # flat float32 [obs_dim] each, oldest first
    images: list[dict[str, np.ndarray]] | None = None  # image policies: {key: uint8 [3, H, W]} per observation
    reset: bool = False
    seed: int | None = None
    deadline_ms: float | None = None
    # protocol v2 (real time)
    chunk: bool = False
    candidates: int = 1
    prefix: np.ndarray | None = None  # float32 [L, A]
    prefix_weights: np.ndarray | None = None  # float32 [L]
    delay_steps: int | None = None


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


def parse_request(message: Any, flatten: Callable[[Any], np.ndarray],
                  frames: Callable[[Any], dict[str, np.ndarray]] | None = None) -> Request:
    """Validate a decoded request. ``flatten(obs) -> float32 [obs_dim]`` checks one observation (keys,
    shape, NaN/inf) and raises ``ValueError`` naming the problem; so does ``frames(obs) -> {key: uint8
    [3, H, W]}``, given for image policies. Raises ``BadRequest``."""
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
        images = None if frames is None else [frames(o) for o in raw]
    except ValueError as err:
        raise BadRequest(f"bad obs: {err}", rid) from None
    request = Request(rid, observations, images, reset, seed, None if deadline is None else float(deadline))
    if V2_KEYS & set(message):
        _parse_v2(message, request, rid)
    return request


def _parse_v2(message: dict, request: Request, rid: Any) -> None:
    """The version-2 keys of ``message`` into ``request`` (shapes against the policy are checked by the server)."""
    chunk = message.get("chunk", False)
    if not isinstance(chunk, bool):
        raise BadRequest(f"'chunk' must be true or false, got {chunk!r}", rid)
    candidates = message.get("candidates", 1)
    if isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= MAX_CANDIDATES:
        raise BadRequest(f"'candidates' must be an integer in [1, {MAX_CANDIDATES}], got {candidates!r}", rid)
    if candidates > 1 and not chunk:
        raise BadRequest("'candidates' > 1 needs 'chunk': true (the client picks among the chunks)", rid)
    delay = message.get("delay_steps")
    if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int) or delay < 0):
        raise BadRequest(f"'delay_steps' must be an integer >= 0, got {delay!r}", rid)
    prefix, weights = message.get("prefix"), message.get("prefix_weights")
    if prefix is not None:
        try:
            prefix = np.asarray(prefix, dtype=np.float32)
        except (TypeError, ValueError):
            raise BadRequest("'prefix' must be a [L, action_dim] array of numbers", rid) from None
        if prefix.ndim != 2 or prefix.shape[0] < 1 or not np.isfinite(prefix).all():
            raise BadRequest(f"'prefix' must be a finite [L, action_dim] array, got shape {list(prefix.shape)}", rid)
        if weights is not None:
            try:
                weights = np.asarray(weights, dtype=np.float32)
            except (TypeError, ValueError):
                raise BadRequest("'prefix_weights' must be an array of numbers", rid) from None
            if weights.shape != (prefix.shape[0],) or not np.isfinite(weights).all() or (weights < 0).any() or (weights > 1).any():
                raise BadRequest(f"'prefix_weights' must be [L] = [{prefix.shape[0]}] values in [0, 1]", rid)
    elif weights is not None:
        raise BadRequest("'prefix_weights' needs a 'prefix'", rid)
    request.chunk, request.candidates, request.delay_steps = chunk, candidates, delay
    request.prefix, request.prefix_weights = prefix, weights


def error_reply(code: str, message: str, request_id: Any = None) -> dict:
    return {"type": "error", "id": request_id, "code": code, "error": message}
