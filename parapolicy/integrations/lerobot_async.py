"""LeRobot's async-inference messages, read safely, and each client's observation history.

LeRobot's ``PolicyServer`` unpickles every payload a client sends (``RemotePolicyConfig`` through
``SendPolicyInstructions``, ``TimedObservation`` through ``SendObservations``): a crafted pickle runs code on the
server. ``safe_loads`` reads them with an allow-list instead: the message classes the caller names (LeRobot's
dataclasses and enums, by import path), plain containers and scalars, numpy arrays and scalars (object arrays
refused) and torch tensors. Torch pickles a tensor's storage as ``torch.storage._load_from_bytes``, which calls
``torch.load(weights_only=False)`` on bytes the sender chose: here it is ``torch.load(weights_only=True)``.
Anything else raises ``UnsafePickleError`` naming the global before anything is called, and a message of
another class than expected is refused too.

``FrameHistory`` keeps the last ``n_obs_steps`` preprocessed frames of one client (or of one RTC policy) and
stacks them the way LeRobot's ``select_action`` queues feed ``generate_actions``. Duck-typed: lerobot is never
imported here (the plugin, ``lerobot_plugin/``, passes LeRobot's classes in).
"""

from __future__ import annotations

import io
import pickle
from collections import deque
from typing import Any, Iterable

import torch

from parapolicy.importers.safe_pickle import _ALLOWED as _TENSOR_AND_BUILTIN_GLOBALS
from parapolicy.importers.safe_pickle import UnsafePickleError

OBS_STATE, OBS_ENV_STATE, OBS_IMAGES = "observation.state", "observation.environment_state", "observation.images"
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024  # one observation; LeRobot sends 2 MB chunks


class RefusedMessage(ValueError):
    """A payload that is not an allowed message (``UnsafePickleError`` is raised for a forbidden global)."""


def _tensor_from_bytes(data: bytes) -> Any:
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"torch.storage._load_from_bytes takes bytes, got {type(data).__name__}")
    return torch.load(io.BytesIO(data), weights_only=True)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    import numpy as np

    def dtype(*args: Any) -> Any:
        made = np.dtype(*args)
        if made.hasobject:
            raise pickle.UnpicklingError(f"numpy dtype {made} holds Python objects: refused")
        return made

    found = {}
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            mod = __import__(module, fromlist=["_reconstruct"])
        except ImportError:
            continue
        found[(module, "_reconstruct")] = mod._reconstruct
        found[(module, "scalar")] = mod.scalar
    found[("numpy", "ndarray")] = np.ndarray
    found[("numpy", "dtype")] = dtype
    return found


def allowed_globals(classes: Iterable[type] = ()) -> dict[tuple[str, str], Any]:
    """The allow-list: ``{(module, name): object}`` for ``classes`` (by their import path), tensors, numpy
    arrays / scalars, plain containers."""
    allowed = dict(_TENSOR_AND_BUILTIN_GLOBALS)
    allowed.update(_numpy_globals())
    allowed[("torch.storage", "_load_from_bytes")] = _tensor_from_bytes
    for cls in classes:
        allowed[(cls.__module__, cls.__qualname__)] = cls
    return allowed


class MessageUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` admits only ``allowed`` (see ``allowed_globals``)."""

    def __init__(self, file: Any, allowed: dict[tuple[str, str], Any]):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(module, name) from None


def safe_loads(data: bytes, expected: type | tuple[type, ...], allowed: dict[tuple[str, str], Any]) -> Any:
    """Unpickle ``data`` with the allow-list ``allowed``; the result must be an ``expected`` instance.
    Raises ``UnsafePickleError`` (a forbidden global, nothing called) or ``RefusedMessage``."""
    if not isinstance(data, (bytes, bytearray)):
        raise RefusedMessage(f"a message is bytes, got {type(data).__name__}")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise RefusedMessage(f"message of {len(data)} bytes is over the {MAX_PAYLOAD_BYTES} byte limit")
    try:
        obj = MessageUnpickler(io.BytesIO(data), allowed).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # truncated, malformed, or a rebuild that refused its arguments
        raise RefusedMessage(f"not a readable message: {type(err).__name__}: {err}") from None
    if not isinstance(obj, expected):
        names = expected.__name__ if isinstance(expected, type) else "/".join(c.__name__ for c in expected)
        raise RefusedMessage(f"expected a {names}, got a {type(obj).__name__}")
    return obj


def receive_chunks(items: Iterable[Any], begin: int, middle: int, end: int,
                   limit: int = MAX_PAYLOAD_BYTES) -> bytes | None:
    """Join LeRobot's ``send_bytes_in_chunks`` stream (items with ``transfer_state`` and ``data``) into one
    payload, at most ``limit`` bytes; None when the stream ends before ``TRANSFER_END``."""
    buffer = bytearray()
    for item in items:
        state = item.transfer_state
        if state == begin:
            buffer = bytearray(item.data)
        elif state in (middle, end):
            buffer += item.data
        else:
            raise RefusedMessage(f"unknown transfer state {state}")
        if len(buffer) > limit:
            raise RefusedMessage(f"message over the {limit} byte limit")
        if state == end:
            return bytes(buffer)
    return None


def frame_keys(config: Any) -> list[str]:
    """The per-step inputs of a LeRobot Diffusion Policy: state, each camera, the environment state."""
    keys = [OBS_STATE]
    keys += list(getattr(config, "image_features", None) or {})
    if getattr(config, "env_state_feature", None):
        keys.append(OBS_ENV_STATE)
    return keys


class FrameHistory:
    """The last ``n_obs_steps`` frames of one observer, stacked as ``generate_actions`` takes them.

    ``push(frame)``: one preprocessed frame (``observation.state`` ``[B, D]``, each camera ``[B, C, H, W]``, the
    environment state ``[B, E]``) -> ``{key: [B, n_obs_steps, ...]}``, cameras also stacked into
    ``observation.images`` ``[B, n_obs_steps, N, C, H, W]``. The first frame fills the history (LeRobot's
    ``populate_queues`` does the same), so the first plan conditions on n copies of it.
    """

    def __init__(self, config: Any):
        self.n_obs_steps = int(getattr(config, "n_obs_steps", 1) or 1)
        self.keys = frame_keys(config)
        self.cameras = list(getattr(config, "image_features", None) or {})
        self.frames: deque[dict[str, torch.Tensor]] = deque(maxlen=self.n_obs_steps)

    def __len__(self) -> int:
        return len(self.frames)

    def clear(self) -> None:
        self.frames.clear()

    def push(self, frame: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [k for k in self.keys if k not in frame]
        if missing:
            raise ValueError(f"the observation lacks {missing} (has {sorted(frame)})")
        step = {k: frame[k] for k in self.keys}
        if not self.frames:
            self.frames.extend([step] * self.n_obs_steps)
        else:
            self.frames.append(step)
        batch = {k: torch.stack([f[k] for f in self.frames], dim=1) for k in self.keys}
        if self.cameras:
            batch[OBS_IMAGES] = torch.stack([batch[k] for k in self.cameras], dim=-4)
        return batch
