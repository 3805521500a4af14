"""``RemotePolicy``: a policy served by ``python -m parapolicy.serve``, with a local policy's control-loop API.

    from parapolicy.serving.client import RemotePolicy

    policy = RemotePolicy("ws://127.0.0.1:8000")       # token=... or $PARAPOLICY_TOKEN if the server wants one
    policy.reset(seed=0)                               # at every episode start (seed: reproducible noise)
    action = policy.act(env.raw_obs)                   # robosuite obs dict or flat [obs_dim] vector
                                                       # (image policies: the dict with the camera frames)
    policy.last_info                                   # replanned, rounds, model_evals, converged, latency_s, server_ms

Who keeps what: the **client** keeps the action queue and the observations seen since the last request;
the **server** keeps the robot's observation history (``n_obs_steps``), its warm-start sample and its
noise generator. ``act()`` answers from the queue while it holds actions (no network) and, when it runs
dry, sends every observation recorded since the previous request (the last ``n_obs_steps`` of them) in
one request and queues the returned chunk of ``n_action_steps`` actions. So the server's history at
every plan is exactly the one a local ``DiffusionPolicy.act()`` would hold, with one round trip per
chunk instead of one per control step. An image policy's observations travel as dicts of the low-dim
keys and the uint8 camera frames (two 84x84 cameras: 42 KB a step, ~85 KB a request at n_obs_steps 2);
a request over the server's ``max_message_bytes`` is refused here, before it is sent.

Needs only numpy, msgpack and websockets (no torch) on the robot's side.
"""

from __future__ import annotations

import inspect
import os
import time
from collections import deque
from typing import Any

import numpy as np

from parapolicy.observation import flatten_observation, reduced_observation
from parapolicy.serving.codec import packb, unpackb
from parapolicy.serving.protocol import PROTOCOL_VERSION, PROTOCOLS

TOKEN_ENV = "PARAPOLICY_TOKEN"


class RemotePolicyError(RuntimeError):
    """The server answered with an error that is not about the request's content (internal, shutting down)."""


class RemotePolicy:
    """Blocking websocket client for one robot.

    Args:
      url: ``ws://host:port`` of a running ``python -m parapolicy.serve``.
      token: shared secret (default ``$PARAPOLICY_TOKEN``); sent as ``Authorization: Bearer <token>``.
      timeout_s: longest wait for a reply; past it ``act()`` raises ``TimeoutError`` (then ``reset()``).
      connect_timeout_s: longest wait for the connection and the server's metadata.

    ``metadata`` holds what the server sent on connect (obs keys and dims, action dim, horizon,
    n_obs_steps, n_action_steps, sampler, checkpoint provenance). Errors: ``ValueError`` for a bad
    observation (checked here, as a local policy does, and by the server), ``TimeoutError``,
    ``ConnectionError`` (``reconnect()`` opens a new connection, a fresh robot on the server),
    ``PermissionError`` for a refused token, ``RemotePolicyError`` for other server-side errors.
    """

    def __init__(self, url: str = "ws://127.0.0.1:8000", token: str | None = None, timeout_s: float = 30.0,
                 connect_timeout_s: float = 10.0, max_message_bytes: int = 16 << 20):
        if not str(url).startswith(("ws://", "wss://")):
            raise ValueError(f"url must start with ws:// or wss://, got {url!r}")
        if not timeout_s > 0 or not connect_timeout_s > 0:
            raise ValueError("timeout_s and connect_timeout_s must be > 0")
        self.url = str(url)
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.timeout_s, self.connect_timeout_s = float(timeout_s), float(connect_timeout_s)
        self.max_message_bytes = int(max_message_bytes)
        self.metadata: dict[str, Any] = {}
        self.last_info: dict[str, Any] = {}
        self._ws = None
        self._next_id = 0
        self.connect()
        self.reset()

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        """Open the connection and read the server's metadata (checks the protocol version)."""
        from websockets.exceptions import InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        options = dict(additional_headers=headers, open_timeout=self.connect_timeout_s, max_size=self.max_message_bytes,
                       compression=None, proxy=None, close_timeout=2)
        if "legacy" in inspect.signature(connect).parameters:
            options["legacy"] = True  # websockets >= 17: a plain connection (we reconnect on request only)
        try:
            self._ws = connect(self.url, **options)
        except InvalidStatus as err:
            status = err.response.status_code
            if status == 401:
                raise PermissionError(f"{self.url} refused the connection: missing or wrong token (HTTP 401)") from None
            raise ConnectionError(f"{self.url} refused the connection with HTTP {status}") from None
        except (OSError, TimeoutError, InvalidHandshake) as err:
            raise ConnectionError(f"cannot connect to {self.url}: {type(err).__name__}: {err}") from None
        try:
            metadata = unpackb(self._ws.recv(timeout=self.connect_timeout_s))
        except TimeoutError:
            self.close()
            raise TimeoutError(f"{self.url} sent no metadata within {self.connect_timeout_s} s") from None
        if not isinstance(metadata, dict) or metadata.get("type") != "metadata":
            self.close()
            raise ConnectionError(f"{self.url} did not start with a metadata message")
        if metadata.get("protocol") != PROTOCOL_VERSION:
            self.close()
            raise ConnectionError(f"{self.url} speaks protocol {metadata.get('protocol')}, "
                                  f"this client {PROTOCOL_VERSION}")
        self.metadata = metadata
        self._reset_next = True  # a new connection is a new robot on the server

    def reconnect(self) -> None:
        """Close and reopen the connection; the next ``act()`` starts a new episode (call ``reset()`` to seed it)."""
        self.close()
        self.connect()
        self.reset()

    def close(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            finally:
                self._ws = None

    def __enter__(self) -> "RemotePolicy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ control-loop API
    @property
    def n_obs_steps(self) -> int:
        return int(self.metadata["n_obs_steps"])

    @property
    def n_action_steps(self) -> int:
        return int(self.metadata["n_action_steps"])

    @property
    def image_keys(self) -> list[str]:
        """The cameras the served policy sees ([] for a low-dim policy)."""
        return list(self.metadata.get("image_keys") or [])

    def observation(self, obs: Any) -> np.ndarray | dict[str, np.ndarray]:
        """``obs`` checked as a local policy checks it, in the form a request carries: a flat float32
        ``[obs_dim]`` vector, or for an image policy a dict of its low-dim keys and uint8 ``[3, H, W]`` frames."""
        meta = self.metadata
        if self.image_keys:
            return reduced_observation(obs, meta["obs_keys"], int(meta["obs_dim"]), self.image_keys, meta["image_shape"])
        return flatten_observation(obs, meta["obs_keys"], int(meta["obs_dim"]))

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode: the next request resets the server-side history, warm start and generator
        (seeded with ``seed``; a random seed if None)."""
        self._queue: deque[np.ndarray] = deque()
        self._recent: deque[np.ndarray] = deque(maxlen=self.n_obs_steps)  # observations since the last request
        self._reset_next = True
        self._seed = None if seed is None else int(seed)

    def act(self, obs: Any) -> np.ndarray:
        """One control step: record ``obs`` and return the next action ``[action_dim]`` (float32); asks the
        server for a new chunk when the queue is empty."""
        start = time.perf_counter()
        self._recent.append(self.observation(obs))
        info: dict[str, Any] = {"replanned": not self._queue, "rounds": 0, "model_evals": 0, "converged": None}
        if not self._queue:
            recent = list(self._recent) if self.image_keys else np.stack(self._recent)
            reply = self.infer(recent, reset=self._reset_next, seed=self._seed)
            self._recent.clear()
            self._reset_next = False
            self._queue.extend(np.asarray(reply["action"], dtype=np.float32))
            timing = reply["timing"]
            info.update(rounds=timing["rounds"], model_evals=timing["model_evals"], converged=timing["converged"],
                        server_ms=timing["server_ms"], batch=timing["batch"], warm=timing["warm"],
                        deadline_missed=timing["deadline_missed"])
        action = self._queue.popleft()
        space = self.metadata.get("action_space", "delta")
        if space != "delta":  # a pose (absolute_rot6d) to robosuite's absolute command, as a local act() does
            from parapolicy.policy.action_space import to_env_action  # torch: only for such policies

            action = to_env_action(action, space)
        info["latency_s"] = time.perf_counter() - start
        self.last_info = info
        return action

    def plan_chunk(self, observations: Any, prefix=None, prefix_weights=None, candidates: int = 1,
                   delay_steps: int | None = None) -> np.ndarray:
        """Protocol v2: plan whole chunks ``[candidates, horizon, action_dim]`` (raw units) from the
        observations since the last request, with an optional known ``prefix`` ``[L, A]`` (and
        ``prefix_weights`` ``[L]``). Used by ``parapolicy.realtime.AsyncPolicy``; bypasses ``act()``'s queue.
        An image policy's ``observations`` are obs dicts with the camera frames (one, or a list, oldest first)."""
        if 2 not in self.metadata.get("protocols", [self.metadata.get("protocol")]):
            raise ConnectionError(f"{self.url} serves protocol {self.metadata.get('protocol')} only; "
                                  f"real-time chunking needs protocol 2")
        extra: dict[str, Any] = {"chunk": True, "candidates": int(candidates)}
        if prefix is not None:
            extra["prefix"] = np.asarray(prefix, dtype=np.float32)
            if prefix_weights is not None:
                extra["prefix_weights"] = np.asarray(prefix_weights, dtype=np.float32)
        if delay_steps is not None:
            extra["delay_steps"] = int(delay_steps)
        if self.image_keys:  # send only what the server reads, checked here
            observations = [self.observation(o) for o in ([observations] if isinstance(observations, dict)
                                                           else observations)]
        reply = self.infer(observations, reset=self._reset_next, seed=self._seed, **extra)
        self._reset_next = False
        timing = reply["timing"]
        self.last_info = {"replanned": True, "rounds": timing["rounds"], "model_evals": timing["model_evals"],
                          "converged": timing["converged"], "server_ms": timing["server_ms"], "batch": timing["batch"],
                          "latency_s": reply["latency_ms"] / 1e3}
        return np.asarray(reply["chunks"], dtype=np.float32)

    def infer(self, obs: Any, reset: bool = False, seed: int | None = None, deadline_ms: float | None = None,
              **v2: Any) -> dict:
        """One request: ``obs`` is an observation or a ``[k, obs_dim]`` stack of the steps since the last
        request (oldest first). Returns the server's reply (``action [n_action_steps, action_dim]``,
        ``timing``) with ``latency_ms`` (end to end, measured here) added."""
        from websockets.exceptions import ConnectionClosed

        if self._ws is None:
            raise ConnectionError(f"not connected to {self.url}; call reconnect()")
        self._next_id += 1
        rid = self._next_id
        message = {"id": rid, "obs": obs, "reset": bool(reset)}
        if reset and seed is not None:
            message["seed"] = int(seed)
        if deadline_ms is not None:
            message["deadline_ms"] = float(deadline_ms)
        message.update(v2)  # protocol v2 keys (plan_chunk)
        packed = packb(message)
        limit = self.metadata.get("max_message_bytes")
        if limit is not None and len(packed) > int(limit):  # the server would close the connection (1009)
            raise ValueError(f"request {rid} is {len(packed)} bytes, over the server's max_message_bytes {limit}: "
                             f"send fewer observations per request, or start the server with a larger max_message_bytes")
        start = time.perf_counter()
        try:
            self._ws.send(packed)
            while True:
                left = self.timeout_s - (time.perf_counter() - start)
                if left <= 0:
                    raise TimeoutError
                reply = unpackb(self._ws.recv(timeout=left))
                if isinstance(reply, dict) and reply.get("id") == rid:
                    break
                if isinstance(reply, dict) and reply.get("type") == "error" and reply.get("id") is None:
                    raise RemotePolicyError(f"{self.url}: {reply.get('code')}: {reply.get('error')}")
                # else: the late reply of an earlier, timed-out request; skip it
        except TimeoutError:
            self._queue.clear()
            self._reset_next = True  # the server's state for this robot is unknown now
            raise TimeoutError(f"no reply from {self.url} within {self.timeout_s} s (request {rid}); "
                               f"the episode must restart: call reset(), or reconnect() if the server is gone") from None
        except ConnectionClosed as err:
            self._ws = None
            raise ConnectionError(f"connection to {self.url} closed ({err}); call reconnect()") from None
        if reply.get("type") == "error":
            if reply.get("code") == "bad_request":
                raise ValueError(f"server rejected request {rid}: {reply.get('error')}")
            raise RemotePolicyError(f"{self.url}: {reply.get('code')}: {reply.get('error')}")
        reply["latency_ms"] = (time.perf_counter() - start) * 1e3
        return reply
