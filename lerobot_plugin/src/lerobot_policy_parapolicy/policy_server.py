"""A drop-in for LeRobot's async-inference ``PolicyServer`` that serves Diffusion Policy, accelerated and safely.

    python -m lerobot_policy_parapolicy.policy_server --host=127.0.0.1 --port=8080 --fps=30 \\
        --inference_latency=0.033 --obs_queue_timeout=1

Same flags and the same gRPC service (``AsyncInference``, LeRobot's generated stubs), so LeRobot's
``robot_client`` talks to it unchanged. What differs from the stock server:

- **per client**: each peer (``context.peer()``) has its own policy instructions, observation queue and
  observation history; one client's ``Ready`` resets only that client.
- **Diffusion Policy's history**: each client's last ``n_obs_steps`` preprocessed observations are stacked
  (``FrameHistory``) before ``predict_action_chunk``; the stock server passes one frame and fails quietly.
- **safe payloads**: ``RemotePolicyConfig`` and ``TimedObservation`` are read with an allow-list
  (``parapolicy.integrations.lerobot_async.safe_loads``); a hostile pickle is refused with INVALID_ARGUMENT and
  logged, nothing in it runs, and the other clients keep being served.
- **accelerated**: importing the plugin swaps the sampler of every LeRobot Diffusion Policy (PARAPOLICY_* knobs).
- binds 127.0.0.1 unless ``--host`` says otherwise; ``--max_seconds`` (> 0) stops it after that long;
  ``--seed`` makes each chunk reproducible (torch seeded with seed + the observation's timestep).
"""


import logging
import pickle  # nosec: only for the actions this server sends; nothing received is read with it
import threading
import time
from collections import OrderedDict
from concurrent import futures
from dataclasses import asdict, dataclass, field
from pprint import pformat
from queue import Empty, Queue
from typing import Any

import draccus
import grpc
import torch

import lerobot_policy_parapolicy
from lerobot.async_inference.configs import PolicyServerConfig
from lerobot.async_inference.constants import SUPPORTED_POLICIES
from lerobot.async_inference.helpers import (
    RemotePolicyConfig,
    TimedAction,
    TimedObservation,
    observations_similar,
    raw_observation_to_observation,
)
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.policies import get_policy_class, make_pre_post_processors
from lerobot.transport import services_pb2, services_pb2_grpc  # type: ignore
from lerobot.utils.import_utils import register_third_party_plugins
from lerobot.utils.utils import init_logging
from parapolicy.integrations.lerobot_async import (
    FrameHistory,
    RefusedMessage,
    UnsafePickleError,
    allowed_globals,
    receive_chunks,
    safe_loads,
)

logger = logging.getLogger("parapolicy_policy_server")
MESSAGE_CLASSES = (RemotePolicyConfig, TimedObservation, PolicyFeature, FeatureType, NormalizationMode)
HISTORY_POLICIES = ("diffusion",)  # policies conditioned on n_obs_steps frames
MAX_SESSIONS = 64  # the oldest idle client is forgotten beyond this


@dataclass
class ParapolicyServerConfig(PolicyServerConfig):
    host: str = field(default="127.0.0.1", metadata={"help": "Host address to bind to (loopback by default)"})
    max_seconds: float = field(default=0.0, metadata={"help": "Stop after this many seconds (0: run until killed)"})
    seed: int | None = field(default=None, metadata={
        "help": "Reproducible chunks: torch's generator is seeded with seed + the observation's timestep before each plan"})


@dataclass
class ServedPolicy:
    policy: Any
    preprocessor: Any
    postprocessor: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class ClientSession:
    peer: str
    spec: RemotePolicyConfig | None = None
    served: ServedPolicy | None = None
    history: FrameHistory | None = None
    queue: Queue = field(default_factory=lambda: Queue(maxsize=1))  # (TimedObservation, policy batch)
    predicted: set = field(default_factory=set)
    last_processed: TimedObservation | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def check_policy_spec(spec: RemotePolicyConfig) -> None:
    """Field types of a ``RemotePolicyConfig`` (the dataclass does not check them)."""
    problems = []
    if not isinstance(spec.policy_type, str) or spec.policy_type not in SUPPORTED_POLICIES:
        problems.append(f"policy_type {spec.policy_type!r} (supported: {SUPPORTED_POLICIES})")
    if not isinstance(spec.pretrained_name_or_path, str) or not spec.pretrained_name_or_path:
        problems.append("pretrained_name_or_path must be a non-empty string")
    if not isinstance(spec.actions_per_chunk, int) or spec.actions_per_chunk <= 0:
        problems.append(f"actions_per_chunk {spec.actions_per_chunk!r} must be a positive int")
    if not isinstance(spec.device, str):
        problems.append("device must be a string")
    if not isinstance(spec.lerobot_features, dict):
        problems.append("lerobot_features must be a dict")
    rename = getattr(spec, "rename_map", {})
    if not isinstance(rename, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in rename.items()):
        problems.append("rename_map must map strings to strings")
    if problems:
        raise RefusedMessage("bad RemotePolicyConfig: " + "; ".join(problems))


def check_observation(obs: TimedObservation) -> None:
    if not isinstance(obs.observation, dict) or not isinstance(obs.timestep, int) or \
            not isinstance(obs.timestamp, (int, float)) or not isinstance(obs.must_go, bool):
        raise RefusedMessage("bad TimedObservation: observation must be a dict, timestep an int, timestamp a number")


class PolicyServer(services_pb2_grpc.AsyncInferenceServicer):
    """LeRobot's ``AsyncInference`` service with per-client sessions (see the module docstring)."""

    def __init__(self, config: ParapolicyServerConfig):
        self.config = config
        self.allowed = allowed_globals(MESSAGE_CLASSES)
        self._sessions: OrderedDict[str, ClientSession] = OrderedDict()
        self._sessions_lock = threading.Lock()
        self._policies: dict[tuple, ServedPolicy] = {}
        self._policies_lock = threading.Lock()
        self.refused = 0  # payloads refused so far (the tests read it)

    # ------------------------------------------------------------------ sessions
    def session(self, peer: str, fresh: bool = False) -> ClientSession:
        with self._sessions_lock:
            if fresh or peer not in self._sessions:
                self._sessions[peer] = ClientSession(peer)
                while len(self._sessions) > MAX_SESSIONS:
                    self._sessions.popitem(last=False)
            self._sessions.move_to_end(peer)
            return self._sessions[peer]

    def _refuse(self, context, peer: str, what: str, err: Exception):
        self.refused += 1
        logger.warning("refused %s from %s: %s", what, peer, err)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"refused {what}: {err}")

    # ------------------------------------------------------------------ RPCs
    def Ready(self, request, context):  # noqa: N802
        peer = context.peer()
        self.session(peer, fresh=True)  # this client only
        logger.info("client %s ready", peer)
        return services_pb2.Empty()

    def SendPolicyInstructions(self, request, context):  # noqa: N802
        peer = context.peer()
        try:
            spec = safe_loads(request.data, RemotePolicyConfig, self.allowed)
            check_policy_spec(spec)
        except (UnsafePickleError, RefusedMessage) as err:
            return self._refuse(context, peer, "policy instructions", err)
        logger.info("policy instructions from %s: %s %s, %d actions per chunk, %s", peer, spec.policy_type,
                    spec.pretrained_name_or_path, spec.actions_per_chunk, spec.device)
        served = self._load(spec)
        session = self.session(peer, fresh=True)
        with session.lock:
            session.spec, session.served = spec, served
            if spec.policy_type in HISTORY_POLICIES:
                session.history = FrameHistory(served.policy.config)
        return services_pb2.Empty()

    def SendObservations(self, request_iterator, context):  # noqa: N802
        peer = context.peer()
        try:
            data = receive_chunks(request_iterator, services_pb2.TRANSFER_BEGIN, services_pb2.TRANSFER_MIDDLE,
                                  services_pb2.TRANSFER_END)
            if data is None:
                raise RefusedMessage("the stream ended before its last chunk")
            obs = safe_loads(data, TimedObservation, self.allowed)
            check_observation(obs)
        except (UnsafePickleError, RefusedMessage) as err:
            return self._refuse(context, peer, "observation", err)
        session = self.session(peer)
        if session.served is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "send policy instructions first")
        try:
            batch = self._prepare(session, obs)
        except Exception as err:  # a malformed but allowed observation: this client's problem only
            return self._refuse(context, peer, "observation", err)
        with session.lock:
            if obs.must_go or session.last_processed is None or self._fresh(session, obs):
                if session.queue.full():
                    try:
                        session.queue.get_nowait()
                    except Empty:
                        pass
                session.queue.put((obs, batch))
        return services_pb2.Empty()

    def GetActions(self, request, context):  # noqa: N802
        peer = context.peer()
        session = self.session(peer)
        started = time.perf_counter()
        if session.served is None:
            return services_pb2.Empty()
        try:
            obs, batch = session.queue.get(timeout=self.config.obs_queue_timeout)
        except Empty:
            return services_pb2.Empty()
        try:
            with session.lock:
                session.predicted.add(obs.get_timestep())
                session.last_processed = obs
            actions = self._plan(session, obs, batch)
            payload = pickle.dumps(actions)
        except Exception as err:
            logger.error("planning for %s failed: %s: %s", peer, type(err).__name__, err)
            return services_pb2.Empty()
        logger.info("chunk #%d for %s: %d actions in %.1f ms", obs.get_timestep(), peer, len(actions),
                    (time.perf_counter() - started) * 1e3)
        time.sleep(max(0.0, self.config.inference_latency - (time.perf_counter() - started)))
        return services_pb2.Actions(data=payload)

    # ------------------------------------------------------------------ policy work
    def _load(self, spec: RemotePolicyConfig) -> ServedPolicy:
        key = (spec.policy_type, spec.pretrained_name_or_path, spec.device,
               tuple(sorted(getattr(spec, "rename_map", {}).items())))
        with self._policies_lock:
            if key not in self._policies:
                start = time.perf_counter()
                policy = get_policy_class(spec.policy_type).from_pretrained(spec.pretrained_name_or_path)
                policy.to(spec.device)
                policy.eval()
                policy.reset()  # empty queues: predict_action_chunk takes the batch we stack
                device = {"device": spec.device}
                pre, post = make_pre_post_processors(
                    policy.config, pretrained_path=spec.pretrained_name_or_path,
                    preprocessor_overrides={"device_processor": device,
                                            "rename_observations_processor": {"rename_map": spec.rename_map}},
                    postprocessor_overrides={"device_processor": device})
                self._policies[key] = ServedPolicy(policy, pre, post)
                logger.info("loaded %s from %s in %.2f s", spec.policy_type, spec.pretrained_name_or_path,
                            time.perf_counter() - start)
            return self._policies[key]

    def _prepare(self, session: ClientSession, obs: TimedObservation) -> dict[str, torch.Tensor]:
        """Raw robot observation -> the policy's batch: LeRobot's conversion and preprocessor, then this client's
        history stacked (Diffusion Policy) or the single frame (policies without history)."""
        served, spec = session.served, session.spec
        frame = raw_observation_to_observation(obs.get_observation(), spec.lerobot_features,
                                               served.policy.config.image_features)
        frame = served.preprocessor(frame)
        if session.history is None:
            return frame
        with session.lock:
            return session.history.push(frame)

    def _fresh(self, session: ClientSession, obs: TimedObservation) -> bool:
        """The stock server's filter: a timestep not planned yet, and a state not too close to the last one."""
        if obs.get_timestep() in session.predicted:
            return False
        return not observations_similar(obs, session.last_processed, lerobot_features=session.spec.lerobot_features)

    def _plan(self, session: ClientSession, obs: TimedObservation, batch: dict) -> list[TimedAction]:
        served, spec = session.served, session.spec
        with served.lock, torch.no_grad():
            if self.config.seed is not None:
                torch.manual_seed(self.config.seed + obs.get_timestep())
            chunk = served.policy.predict_action_chunk(batch)
            if chunk.ndim != 3:
                chunk = chunk.unsqueeze(0)
            chunk = chunk[:, : spec.actions_per_chunk]
            actions = torch.stack([served.postprocessor(chunk[:, i]) for i in range(chunk.shape[1])], dim=1)
        actions = actions.squeeze(0).detach().cpu()
        dt = self.config.environment_dt
        return [TimedAction(timestamp=obs.get_timestamp() + i * dt, timestep=obs.get_timestep() + i, action=a)
                for i, a in enumerate(actions)]


def start(config: ParapolicyServerConfig) -> tuple[grpc.Server, PolicyServer]:
    """Start serving on ``config.host:config.port``; returns (the gRPC server, the servicer)."""
    servicer = PolicyServer(config)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    services_pb2_grpc.add_AsyncInferenceServicer_to_server(servicer, server)
    if server.add_insecure_port(f"{config.host}:{config.port}") == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    server.start()
    swapped = lerobot_policy_parapolicy.INSTALLED or "not accelerated (see the plugin's log line)"
    logger.info("parapolicy PolicyServer on %s:%d; %s", config.host, config.port, swapped)
    return server, servicer


@draccus.wrap()
def serve(cfg: ParapolicyServerConfig) -> None:
    logging.info(pformat(asdict(cfg)))
    server, _ = start(cfg)
    try:
        server.wait_for_termination(timeout=cfg.max_seconds if cfg.max_seconds > 0 else None)
    finally:
        server.stop(grace=1.0)
        logger.info("server stopped")


if __name__ == "__main__":
    init_logging()
    register_third_party_plugins()
    serve()
