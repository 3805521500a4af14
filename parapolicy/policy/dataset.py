"""Windows of (observation history, action sequence) from robomimic low-dim HDF5 demonstrations.

File layout (ours and robomimic's ``low_dim.hdf5``)::

    data/demo_<i>/obs/<key>   [T, key_dim]
    data/demo_<i>/obs/<camera>_image   [T, H, W, 3] uint8 (image datasets; robomimic's layout, upright)
    data/demo_<i>/actions     [T, action_dim]
    mask/<filter_key>         optional list of demo names (e.g. robomimic's "train" / "valid")

Padding follows Diffusion Policy's SequenceSampler: a window of ``horizon`` frames may start
``pad_before = n_obs_steps - 1`` frames before an episode and end ``pad_after = n_action_steps - 1``
frames after it; out-of-episode frames repeat the first / last frame. Everything is held in memory
and windows are gathered with one vectorised index per batch, so sampling costs microseconds.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


@dataclass
class Demo:
    name: str
    obs: np.ndarray  # [T, obs_dim] float32, obs keys concatenated in the given order
    actions: np.ndarray  # [T, action_dim] float32
    images: dict[str, np.ndarray] | None = None  # camera key -> [T, 3, H, W] uint8


def _demo_number(name: str) -> int:
    match = re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else -1


def list_demos(path: str | Path, filter_key: str | None = None) -> list[str]:
    """Demo group names under ``data/``, sorted by their integer suffix (demo_2 before demo_10).

    ``filter_key`` restricts to the names stored in ``mask/<filter_key>`` (robomimic convention).
    """
    import h5py

    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise ValueError(f"{path}: no 'data' group; not a robomimic-style HDF5 file")
        names = list(f["data"].keys())
        if filter_key is not None:
            if "mask" not in f or filter_key not in f["mask"]:
                available = list(f["mask"].keys()) if "mask" in f else []
                raise ValueError(f"{path}: filter key mask/{filter_key} not found (available: {available})")
            wanted = {n.decode() if isinstance(n, bytes) else str(n) for n in f["mask"][filter_key][()]}
            names = [n for n in names if n in wanted]
    return sorted(names, key=lambda n: (_demo_number(n), n))


def load_demos(
    path: str | Path,
    obs_keys: Sequence[str],
    filter_key: str | None = None,
    demo_names: Sequence[str] | None = None,
    image_keys: Sequence[str] = (),
    resize_shape: Sequence[int] | None = None,
) -> list[Demo]:
    """Read demos into memory, concatenating ``obs_keys`` in order into one ``[T, obs_dim]`` array.

    ``image_keys``: camera frames to load as uint8 ``[T, 3, H, W]``, resized to ``resize_shape`` (H, W) if
    given, as the image policy's encoder would (bilinear, antialiased), so a small policy holds and
    gathers a quarter of the pixels.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} not found")
    names = list(demo_names) if demo_names is not None else list_demos(path, filter_key)
    if not names:
        raise ValueError(f"{path}: no demonstrations found")
    demos = []
    with h5py.File(path, "r") as f:
        for name in names:
            group = f["data"][name]
            missing = [k for k in (*obs_keys, *image_keys) if k not in group["obs"]]
            if missing:
                raise ValueError(
                    f"{path}: data/{name}/obs lacks keys {missing} (has {sorted(group['obs'].keys())})"
                )
            parts = [np.asarray(group["obs"][k][()], dtype=np.float32) for k in obs_keys]
            parts = [p.reshape(len(p), -1) for p in parts]  # scalars per step become [T, 1]
            actions = np.asarray(group["actions"][()], dtype=np.float32)
            if any(len(p) != len(actions) for p in parts):
                raise ValueError(f"{path}: data/{name} has obs and actions of different lengths")
            images = {key: _load_frames(group["obs"][key], resize_shape) for key in image_keys} or None
            if images and any(len(v) != len(actions) for v in images.values()):
                raise ValueError(f"{path}: data/{name} has images and actions of different lengths")
            demos.append(Demo(name, np.concatenate(parts, axis=1), actions, images))
    return demos


def _load_frames(dataset, resize_shape: Sequence[int] | None) -> np.ndarray:
    """An HDF5 ``[T, H, W, 3]`` uint8 frame dataset -> ``[T, 3, H', W']`` uint8 (resized if asked)."""
    frames = np.asarray(dataset[()])
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{dataset.name}: expected uint8 [T, H, W, 3] frames, got {frames.dtype} {list(frames.shape)}")
    frames = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))
    if resize_shape is not None and tuple(frames.shape[-2:]) != tuple(resize_shape):
        resized = torch.nn.functional.interpolate(frames.float(), size=tuple(int(v) for v in resize_shape),
                                                  mode="bilinear", align_corners=False, antialias=True)
        frames = resized.round().clamp(0, 255).to(torch.uint8)
    return frames.numpy()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class SequenceDataset(torch.utils.data.Dataset):
    """In-memory windows over demos.

    ``dataset[i]`` / ``dataset.sample(batch_size)`` give ``obs [.., n_obs_steps, obs_dim]`` and
    ``action [.., horizon, action_dim]`` in raw (unnormalised) units.
    """

    def __init__(self, demos: Sequence[Demo], horizon: int = 16, n_obs_steps: int = 2, n_action_steps: int = 8):
        if not demos:
            raise ValueError("SequenceDataset needs at least one demo")
        if n_obs_steps > horizon:
            raise ValueError(f"n_obs_steps ({n_obs_steps}) > horizon ({horizon})")
        self.horizon = horizon
        self.n_obs_steps = n_obs_steps
        self.n_action_steps = n_action_steps
        self.demo_names = [d.name for d in demos]
        self.obs = torch.from_numpy(np.concatenate([d.obs for d in demos]))  # [N_frames, obs_dim]
        self.actions = torch.from_numpy(np.concatenate([d.actions for d in demos]))  # [N_frames, A]
        keys = list(demos[0].images or {})
        # camera key -> [N_frames, 3, H, W] uint8
        self.images = {key: torch.from_numpy(np.concatenate([d.images[key] for d in demos])) for key in keys}

        pad_before, pad_after = n_obs_steps - 1, n_action_steps - 1
        starts, firsts, lasts = [], [], []
        offset = 0
        for demo in demos:
            length = len(demo.actions)
            # Window start times (episode-relative), DP's range: -pad_before .. length - horizon + pad_after.
            rel = np.arange(-pad_before, length - horizon + pad_after + 1)
            starts.append(offset + rel)
            firsts.append(np.full(len(rel), offset))
            lasts.append(np.full(len(rel), offset + length - 1))
            offset += length
        self._start = torch.from_numpy(np.concatenate(starts)).long()  # [N_windows] absolute frame
        self._first = torch.from_numpy(np.concatenate(firsts)).long()  # episode's first frame
        self._last = torch.from_numpy(np.concatenate(lasts)).long()  # episode's last frame
        self._steps = torch.arange(horizon)

    @classmethod
    def from_hdf5(
        cls,
        path: str | Path,
        obs_keys: Sequence[str],
        horizon: int = 16,
        n_obs_steps: int = 2,
        n_action_steps: int = 8,
        filter_key: str | None = None,
        demo_names: Sequence[str] | None = None,
    ) -> "SequenceDataset":
        return cls(load_demos(path, obs_keys, filter_key, demo_names), horizon, n_obs_steps, n_action_steps)

    @property
    def obs_dim(self) -> int:
        return self.obs.shape[1]

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]

    def __len__(self) -> int:
        return len(self._start)

    def windows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gather windows ``index [B]`` -> ``obs [B, n_obs_steps, obs_dim]``, ``action [B, horizon, A]``
        (and, for image datasets, ``images`` {key: uint8 ``[B, n_obs_steps, 3, H, W]``})."""
        frames = self._start[index, None] + self._steps  # [B, horizon]
        # Clamping into the episode repeats its first / last frame: DP's edge padding.
        frames = torch.maximum(torch.minimum(frames, self._last[index, None]), self._first[index, None])
        window = {"obs": self.obs[frames[:, : self.n_obs_steps]], "action": self.actions[frames]}
        if self.images:
            window["images"] = {key: value[frames[:, : self.n_obs_steps]] for key, value in self.images.items()}
        return window

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.windows(torch.tensor([i]))
        return {k: ({key: x[0] for key, x in v.items()} if isinstance(v, dict) else v[0]) for k, v in batch.items()}

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Uniformly random windows (with replacement)."""
        index = torch.randint(len(self), (batch_size,), generator=generator)
        return self.windows(index)


def split_demos(demos: Sequence[Demo], val_ratio: float, seed: int = 0) -> tuple[list[Demo], list[Demo]]:
    """Hold out ``round(val_ratio * n)`` whole demos (at least 1 if val_ratio > 0 and n > 1)."""
    n = len(demos)
    n_val = int(round(val_ratio * n))
    if val_ratio > 0 and n > 1:
        n_val = max(1, n_val)
    n_val = min(n_val, n - 1)
    if n_val <= 0:
        return list(demos), []
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    train = [d for i, d in enumerate(demos) if i not in val_idx]
    val = [d for i, d in enumerate(demos) if i in val_idx]
    return train, val
