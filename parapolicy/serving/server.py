"""Websocket policy server: one Diffusion Policy, many robots, dynamic batching across them.

Each websocket connection is one robot. Its ``RobotSession`` keeps the observation history, the
previous call's sample (warm starts) and its own ``torch.Generator`` (seeded at reset when the client
sends a seed). Requests from different connections that arrive within ``max_wait_ms`` of the first
waiting one (up to ``max_batch``; no wait once every connected robot is waiting) are planned in one
``predict_action`` call on a ``[B, n_obs_steps, obs_dim]`` batch (image policies: with each camera's
``[B, n_obs_steps, 3, H, W]`` uint8 frames, encoded in the same call). Every robot draws its own ``x_T [1, H, A]`` and step noise ``[N, 1, H, A]`` from its
generator, in the order ``parapolicy.realtime.planner`` draws them (as the eval's runner), so a robot gets the chunk it
would get alone: exactly for sequential samplers (up to float rounding of a larger batch), within the
sampler's tolerance for parallel ones (a Picard window advances by the slowest row of the batch, so a
batched row may iterate a round more than it would alone).

The model runs in one worker thread, so the event loop stays free to receive, validate and answer.
Bad input is answered with an error and never reaches the model; an exception in a model call fails
the requests of that batch only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import hmac
import itertools
import json
import logging
import os
import secrets
import threading
import time
from collections import deque
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parapolicy.realtime.planner import BatchPlanner  # the in-process eval's planning call and draw order
from parapolicy.serving.codec import CodecError, packb, unpackb
from parapolicy.serving.protocol import PROTOCOL_VERSION, PROTOCOLS, BadRequest, Request, error_reply, parse_request

log = logging.getLogger("parapolicy.serve")
TOKEN_ENV = "PARAPOLICY_TOKEN"


def checkpoint_info(path: str | Path | None) -> dict[str, Any]:
    """Provenance of a checkpoint folder: path, sha256 of the weights, training record (from config.json)."""
    if path is None:
        return {"path": None}
    path = Path(path)
    info: dict[str, Any] = {"path": str(path)}
    weights = path / "model.safetensors"
    if weights.is_file():
        digest = hashlib.sha256()
        with weights.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        info["sha256"] = digest.hexdigest()
    config = path / "config.json"
    if config.is_file():
        meta = json.loads(config.read_text())
        training = meta.get("training", {})
        info.update(env=meta.get("env"), num_parameters=meta.get("num_parameters"),
                    training={k: training.get(k) for k in ("date", "git_commit", "iterations", "dataset_sha256")
                              if k in training})
    return info


def _obs_key_dims(config) -> list[int] | None:
    """Per-key dims of the policy's observation when its env is a known task (else None)."""
    try:
        from parapolicy.envs.robosuite_env import get_task

        task = get_task(str(config.env))
    except Exception:
        return None
    if list(task.obs_keys) != list(config.obs_keys):
        return None
    return list(task.obs_dims)


class RobotSession:
    """One connection's state: observation history (and camera frames), warm-start sample, generator."""

    def __init__(self, conn_id: int, n_obs_steps: int):
        self.conn_id = conn_id
        self.n_obs_steps = n_obs_steps
        self.requests = 0
        self.reset(None)

    def reset(self, seed: int | None) -> None:
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.history: deque[np.ndarray] = deque(maxlen=self.n_obs_steps)
        self.image_history: deque[dict[str, np.ndarray]] = deque(maxlen=self.n_obs_steps)  # image policies
        self.previous_sample: torch.Tensor | None = None  # warm starts never cross episodes

    def observe(self, observations: list[np.ndarray], images: list[dict[str, np.ndarray]] | None = None) -> None:
        """Append flat observations (oldest first) and, for image policies, their frames {key: uint8
        [3, H, W]}; the first after a reset fills the history, as act() does."""
        for k, flat in enumerate(observations):
            fill = 1 if self.history else self.n_obs_steps
            self.history.extend([flat] * fill)
            if images is not None:
                self.image_history.extend([images[k]] * fill)

    def stacked_images(self) -> dict[str, np.ndarray] | None:
        """The frames of the history: {key: uint8 [n_obs_steps, 3, H, W]}, or None (no cameras)."""
        if not self.image_history:
            return None
        return {key: np.stack([step[key] for step in self.image_history]) for key in self.image_history[0]}


@dataclasses.dataclass
class _Pending:
    robot: RobotSession
    history: np.ndarray  # [n_obs_steps, obs_dim]
    received: float  # perf_counter at receipt
    future: asyncio.Future
    started: float = 0.0  # perf_counter when its batch went to the model
    request: Request | None = None  # protocol v2 options (prefix, candidates, chunk)
    images: dict[str, np.ndarray] | None = None  # image policies: {key: uint8 [n_obs_steps, 3, H, W]}

    def signature(self, warm_start: bool) -> tuple:
        """Requests plan together when they agree on what ``predict_action`` does for all rows at once."""
        r = self.request
        warm = bool(warm_start and self.robot.previous_sample is not None and (r is None or r.candidates == 1))
        return (warm, 0 if r is None or r.prefix is None else len(r.prefix), 1 if r is None else r.candidates,
                r is not None and r.prefix_weights is not None)


@dataclasses.dataclass
class ServerStats:
    """Counters printed on shutdown (and served by /healthz)."""

    connections: int = 0
    requests: int = 0
    errors: int = 0
    batches: int = 0
    deadline_missed: int = 0
    batch_sizes: list = dataclasses.field(default_factory=list)
    server_ms: list = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.server_ms, dtype=np.float64)
        p50, p99 = (np.percentile(lat, [50, 99]).tolist() if lat.size else (float("nan"), float("nan")))
        return {"connections": self.connections, "requests": self.requests, "errors": self.errors,
                "batches": self.batches, "mean_batch": float(np.mean(self.batch_sizes)) if self.batch_sizes else 0.0,
                "deadline_missed": self.deadline_missed, "server_ms_p50": p50, "server_ms_p99": p99}

    def format(self) -> str:
        s = self.summary()
        return (f"served {s['requests']} requests in {s['batches']} batches (mean batch {s['mean_batch']:.2f}) "
                f"over {s['connections']} connections; {s['errors']} error replies, {s['deadline_missed']} past "
                f"deadline; server latency p50 {s['server_ms_p50']:.1f} ms, p99 {s['server_ms_p99']:.1f} ms")


class PolicyServer:
    """Serve ``policy`` (a loaded ``DiffusionPolicy`` with its sampler set) over websockets.

    Args:
      max_batch: most requests planned in one model call (1 = no batching).
      max_wait_ms: how long the first waiting request may wait for others (0 = no batching).
      deadline_ms: default latency budget per request; a reply later than it is flagged.
      max_message_bytes: larger incoming messages close the connection (code 1009, "message too big").
      token: shared secret; connections without ``Authorization: Bearer <token>`` are refused with HTTP
        401 during the handshake (None: ``$PARAPOLICY_TOKEN`` if set, else no token).
      checkpoint: the checkpoint folder, for the metadata's provenance.

    With the policy's fast path on (``load_policy(..., fast_path="on")``), ``run()`` first warms it up
    for every batch size 1..max_batch (CPU: picks each shape's backend), so that no robot's request pays
    for a new shape; the backends and seconds spent go into the metadata (``fast_path``).
    """

    def __init__(self, policy, host: str = "127.0.0.1", port: int = 8000, *, max_batch: int = 8,
                 max_wait_ms: float = 2.0, deadline_ms: float | None = None, max_message_bytes: int = 1 << 20,
                 token: str | None = None, checkpoint: str | Path | None = None, shutdown_timeout_s: float = 30.0,
                 sampler_config: dict | None = None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
        if deadline_ms is not None and not deadline_ms > 0:
            raise ValueError(f"deadline_ms must be null or > 0, got {deadline_ms!r}")
        if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be an integer >= 1024, got {max_message_bytes!r}")
        if not 0 <= int(port) < 65536:
            raise ValueError(f"port must be in [0, 65536), got {port!r}")
        self.policy = policy
        self.host, self.port = str(host), int(port)
        self.max_batch = max_batch if max_wait_ms > 0 else 1
        self.max_wait_ms = float(max_wait_ms) if max_batch > 1 else 0.0
        self.deadline_ms = None if deadline_ms is None else float(deadline_ms)
        self.max_message_bytes = max_message_bytes
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.shutdown_timeout_s = float(shutdown_timeout_s)
        self.stats = ServerStats()
        self.metadata = self._build_metadata(checkpoint, sampler_config)
        self._conn_ids = itertools.count(1)
        self._pending: deque[_Pending] = deque()
        self._arrived: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight = 0
        self._open_sessions = 0
        self._stopping = False
        self._ws_server = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        self._planner = BatchPlanner(policy)
        self.ready = threading.Event()  # set once listening (``port`` is then the bound port)

    # ------------------------------------------------------------------ metadata
    def _build_metadata(self, checkpoint, sampler_config) -> dict[str, Any]:
        cfg, policy = self.policy.config, self.policy
        sampler = {"name": policy.sampler_name, "num_inference_steps": policy.num_inference_steps,
                   "options": policy.sampler_options, "warm_start": bool(policy.warm_start)}
        if sampler_config is not None:
            sampler["config"] = sampler_config
        return {
            "type": "metadata", "protocol": PROTOCOL_VERSION, "protocols": list(PROTOCOLS), "obs_keys": list(cfg.obs_keys),
            "obs_key_dims": _obs_key_dims(cfg), "obs_dim": cfg.obs_dim, "action_dim": cfg.action_dim,
            "action_space": cfg.action_space,  # absolute_rot6d: chunks are poses, RemotePolicy.act converts them
            "horizon": cfg.horizon, "n_obs_steps": cfg.n_obs_steps, "n_action_steps": cfg.n_action_steps,
            "env": cfg.env, "sampler": sampler, "checkpoint": checkpoint_info(checkpoint),
            "device": str(policy.device), "torch_threads": torch.get_num_threads(),
            "batching": {"max_batch": self.max_batch, "max_wait_ms": self.max_wait_ms},
            "deadline_ms": self.deadline_ms, "max_message_bytes": self.max_message_bytes,
            "image_keys": list(cfg.image_keys or []), "image_shape": list(cfg.image_shape) if cfg.image_keys else None,
            "max_delay": int(getattr(cfg, "max_delay", 0)),  # > 0: trained for delay, a hard prefix conditions it
        }

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Listen until ``request_stop()``; then answer in-flight requests, close, print the counters."""
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._arrived, self._stop = asyncio.Event(), asyncio.Event()
        # on the model thread, before listening: the first request of each batch size is served warm
        self.metadata["fast_path"] = await self._loop.run_in_executor(self._executor, self.warm_up)
        self._ws_server = await serve(
            self._handle, self.host, self.port, process_request=self._process_request,
            max_size=self.max_message_bytes, compression=None, ping_interval=20, ping_timeout=60,
            close_timeout=5, server_header=f"parapolicy-serve/{PROTOCOL_VERSION}")
        self.port = self._ws_server.sockets[0].getsockname()[1]
        batcher = asyncio.create_task(self._batch_loop())
        log.info("serving %s (%s) on ws://%s:%d (max_batch %d, max_wait_ms %g, token %s)",
                 self.metadata["sampler"]["name"], self.metadata["checkpoint"].get("path"), self.host, self.port,
                 self.max_batch, self.max_wait_ms, "on" if self.token else "off")
        self.ready.set()
        try:
            await self._stop.wait()
            self._stopping = True
            self._ws_server.server.close()  # stop accepting; open connections keep being served
            await self._drain()
            self._ws_server.close(close_connections=True, reason="server shutting down")
            await asyncio.wait_for(self._ws_server.wait_closed(), timeout=10)
        finally:
            batcher.cancel()
            self._executor.shutdown(wait=True)
            log.info(self.stats.format())

    def warm_up(self) -> dict[str, Any] | None:
        """Warm the policy's fast path up for batch sizes 1..max_batch; None when it is off."""
        from parapolicy.policy.accel import active_fast_path, warm_up

        if active_fast_path(self.policy) is None:
            return None
        backends, seconds = {}, 0.0
        for batch in range(1, self.max_batch + 1):
            done = warm_up(self.policy, batch)
            backends.update(done.get("backends", {}))
            seconds += done.get("warmup_s", 0.0)
        if seconds:
            log.info("fast path warmed up for batch sizes 1..%d in %.1f s", self.max_batch, seconds)
        return {"backends": backends, "warmup_s": seconds}

    def request_stop(self) -> None:
        """Graceful shutdown (thread-safe): no new connections, in-flight requests are answered."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def _drain(self) -> None:
        deadline = time.perf_counter() + self.shutdown_timeout_s
        while self._inflight and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        if self._inflight:
            log.warning("shutdown: %d requests still in flight after %.0f s", self._inflight, self.shutdown_timeout_s)

    # ------------------------------------------------------------------ HTTP side
    def _process_request(self, connection, request):
        """Before the handshake: /healthz answers over plain HTTP; a wrong token is refused here."""
        if request.path.split("?", 1)[0] == "/healthz":
            status = HTTPStatus.SERVICE_UNAVAILABLE if self._stopping else HTTPStatus.OK
            body = {"status": "stopping" if self._stopping else "ok", "protocol": PROTOCOL_VERSION,
                    "sampler": self.metadata["sampler"]["name"], "open_connections": self._open_sessions,
                    "inflight": self._inflight, **self.stats.summary()}
            return connection.respond(status, json.dumps(body) + "\n")
        if self.token:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                log.info("refused a connection from %s: missing or wrong token", _peer(connection))
                return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
        return None

    # ------------------------------------------------------------------ websocket side
    async def _handle(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        cfg = self.policy.config
        robot = RobotSession(next(self._conn_ids), cfg.n_obs_steps)
        self.stats.connections += 1
        self._open_sessions += 1
        peer = _peer(ws)
        log.info("connection %d from %s opened", robot.conn_id, peer)
        reason = "closed by client"
        try:
            await ws.send(packb(self.metadata))
            async for raw in ws:
                received = time.perf_counter()
                self._inflight += 1
                try:
                    if self._stopping:
                        await ws.send(packb(error_reply("shutting_down", "server is shutting down")))
                        self.stats.errors += 1
                        reason = "server shutting down"
                        await ws.close(1001, "server shutting down")
                        break
                    reply = await self._answer(robot, raw, received)
                    await ws.send(packb(reply))
                finally:
                    self._inflight -= 1
        except ConnectionClosed as err:
            rcvd = err.rcvd or err.sent
            reason = f"code {rcvd.code} {rcvd.reason!r}" if rcvd is not None else "connection lost"
        except Exception:  # never let one connection's failure reach the server
            log.exception("connection %d: unexpected error", robot.conn_id)
            reason = "internal error"
        finally:
            self._open_sessions -= 1
            log.info("connection %d from %s closed after %d requests (%s)", robot.conn_id, peer, robot.requests, reason)

    async def _answer(self, robot: RobotSession, raw, received: float) -> dict:
        """One message -> its reply (an action chunk or an error naming the problem)."""
        try:
            if isinstance(raw, str):
                raise CodecError("expected binary msgpack frames, got a text frame")
            message = unpackb(raw)
            frames = self.policy.observation_frames if self.policy.config.image_keys else None
            request = parse_request(message, self.policy.flat_observation, frames)
        except (CodecError, BadRequest) as err:
            self.stats.errors += 1
            code = "bad_request" if isinstance(err, BadRequest) else "bad_message"
            return error_reply(code, str(err), getattr(err, "request_id", None))
        if request.reset:
            robot.reset(request.seed)
        robot.observe(request.observations, request.images)
        robot.requests += 1
        cfg = self.policy.config
        if request.prefix is not None and (request.prefix.shape[1] != cfg.action_dim or len(request.prefix) > cfg.horizon):
            self.stats.errors += 1
            return error_reply("bad_request", f"'prefix' must be [L <= {cfg.horizon}, {cfg.action_dim}], got "
                               f"{list(request.prefix.shape)}", request.id)
        pending = _Pending(robot, np.stack(robot.history), received, self._loop.create_future(), request=request,
                           images=robot.stacked_images())
        self._pending.append(pending)
        self._arrived.set()
        result = await pending.future
        if isinstance(result, Exception):
            self.stats.errors += 1
            return error_reply("internal", f"planning failed: {type(result).__name__}: {result}", request.id)
        server_ms = (time.perf_counter() - received) * 1e3
        deadline = request.deadline_ms if request.deadline_ms is not None else self.deadline_ms
        missed = deadline is not None and server_ms > deadline
        self.stats.requests += 1
        self.stats.server_ms.append(server_ms)
        self.stats.deadline_missed += int(missed)
        timing = {"server_ms": server_ms, "queue_ms": (pending.started - received) * 1e3, **result["timing"],
                  "deadline_ms": deadline, "deadline_missed": missed}
        if request.delay_steps is not None:
            timing["delay_steps"] = request.delay_steps
        reply = {"type": "action", "id": request.id, "timing": timing}
        if request.chunk:
            reply.update(chunks=result["chunks"], start=cfg.action_start)
        else:
            reply["action"] = result["action"]
        if request.reset:
            reply["seed"] = robot.seed
        return reply

    # ------------------------------------------------------------------ batching
    async def _next_batch(self) -> list[_Pending]:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        if self.max_batch > 1:
            # wait for more robots until max_wait_ms after the oldest waiting request arrived
            # (no wait when every connected robot is already waiting: nobody else can join)
            deadline = self._pending[0].received + self.max_wait_ms / 1e3
            while len(self._pending) < min(self.max_batch, self._open_sessions):
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), timeout=left)
                except asyncio.TimeoutError:
                    break
        return [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            started = time.perf_counter()
            for item in batch:
                item.started = started
            try:
                results = await loop.run_in_executor(self._executor, self._plan, batch)
            except Exception as err:  # e.g. the executor is gone during shutdown
                results = [err] * len(batch)
            for item, result in zip(batch, results):
                if not item.future.done():
                    item.future.set_result(result)

    def _plan(self, batch: list[_Pending]) -> list[Any]:
        """Worker thread: plan a batch. Rows go in one ``predict_action`` call per signature (warm start or
        not, prefix length, candidates), since those options hold for all rows of a call.

        Noise per robot, from its generator, in ``parapolicy.realtime.planner``'s order: x_T and step noise
        (as v1), then those of the extra candidates, then the prefix's noise, so a v1 request draws exactly
        what it always did."""
        policy = self.policy
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(batch):
            groups.setdefault(item.signature(policy.warm_start), []).append(i)
        results: list[Any] = [None] * len(batch)
        for (warm, prefix_len, m, _), rows in groups.items():
            start = time.perf_counter()
            try:
                requests = [batch[i].request for i in rows]
                images = None
                if batch[rows[0]].images is not None:  # {key: [B, n_obs_steps, 3, H, W]} uint8
                    images = {key: np.stack([batch[i].images[key] for i in rows]) for key in batch[rows[0]].images}
                prefix = weights = None
                if prefix_len:
                    prefix = np.stack([r.prefix for r in requests])
                    if requests[0].prefix_weights is not None:
                        weights = np.stack([r.prefix_weights for r in requests])
                planned = self._planner.plan(
                    np.stack([batch[i].history for i in rows]), [batch[i].robot.generator for i in rows], m,
                    images=images, prefix=prefix, prefix_weights=weights,
                    warm_from=torch.cat([batch[i].robot.previous_sample for i in rows]) if warm else None)
                plan = planned.result
                chunks = planned.chunks
                actions = plan["action"].float().cpu().numpy()  # also waits for a GPU
                plan_ms = (time.perf_counter() - start) * 1e3
                converged = plan["converged"]
                converged = bool(converged.all()) if torch.is_tensor(converged) else converged
                timing = {"plan_ms": plan_ms, "batch": len(rows), "rounds": _as_int(plan["rounds"]),
                          "model_evals": _as_int(plan["model_evals"]), "converged": converged, "warm": warm}
                for row, i in enumerate(rows):
                    batch[i].robot.previous_sample = planned.samples[row, 0:1]
                    results[i] = {"action": np.ascontiguousarray(actions[row * m]),
                                  "chunks": np.ascontiguousarray(chunks[row]), "timing": timing}
                self.stats.batches += 1
                self.stats.batch_sizes.append(len(rows))
            except Exception as err:  # fails this call's requests, never the server
                log.exception("planning a batch of %d failed", len(rows))
                for i in rows:
                    results[i] = err
        return results


def _as_int(value: Any) -> Any:
    if torch.is_tensor(value):
        return int(value.max())
    return None if value is None else int(value)


def _peer(connection) -> str:
    try:
        host, port = connection.remote_address[:2]
        return f"{host}:{port}"
    except Exception:
        return "?"


class ServerThread:
    """Run a ``PolicyServer`` on its own event loop in a background thread (tests, benchmarks, notebooks).

        with ServerThread(PolicyServer(policy, port=0)) as server:
            RemotePolicy(server.url).act(obs)
    """

    def __init__(self, server: PolicyServer, startup_timeout_s: float = 60.0):
        self.server = server
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="policy-server", daemon=True)
        self._thread.start()
        if not server.ready.wait(startup_timeout_s):
            raise RuntimeError(f"server did not start within {startup_timeout_s} s")
        if self.error is not None:
            raise RuntimeError(f"server failed to start: {self.error!r}") from self.error

    def _main(self) -> None:
        try:
            asyncio.run(self.server.run())
        except BaseException as err:  # surfaced by __init__ / stop()
            self.error = err
            self.server.ready.set()

    @property
    def url(self) -> str:
        return f"ws://{self.server.host}:{self.server.port}"

    def stop(self, timeout_s: float = 60.0) -> None:
        self.server.request_stop()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise RuntimeError(f"server did not stop within {timeout_s} s")

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
