"""Windows of (observation history, action sequence) from robomimic low-dim HDF5 demonstrations.

File layout (ours and robomimic's ``low_dim.hdf5``)::

    data/demo_<i>/obs/<key>   [T, key_dim]
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
) -> list[Demo]:
    """Read demos into memory, concatenating ``obs_keys`` in order into one ``[T, obs_dim]`` array."""
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
            missing = [k for k in obs_keys if k not in group["obs"]]
            if missing:
                raise ValueError(
                    f"{path}: data/{name}/obs lacks keys {missing} (has {sorted(group['obs'].keys())})"
                )
            parts = [np.asarray(group["obs"][k][()], dtype=np.float32) for k in obs_keys]
            parts = [p.reshape(len(p), -1) for p in parts]  # scalars per step become [T, 1]
            actions = np.asarray(group["actions"][()], dtype=np.float32)
            if any(len(p) != len(actions) for p in parts):
                raise ValueError(f"{path}: data/{name} has obs and actions of different lengths")
            demos.append(Demo(name, np.concatenate(parts, axis=1), actions))
    return demos


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
        """Gather windows ``index [B]`` -> ``obs [B, n_obs_steps, obs_dim]``, ``action [B, horizon, A]``."""
        frames = self._start[index, None] + self._steps  # [B, horizon]
        # Clamping into the episode repeats its first / last frame: DP's edge padding.
        frames = torch.maximum(torch.minimum(frames, self._last[index, None]), self._first[index, None])
        return {"obs": self.obs[frames[:, : self.n_obs_steps]], "action": self.actions[frames]}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.windows(torch.tensor([i]))
        return {k: v[0] for k, v in batch.items()}

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
