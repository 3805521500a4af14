"""Observation histories the bench feeds the policy: from a dataset, env resets or random draws."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional

import numpy as np
from omegaconf import DictConfig

from parapolicy.configs import REPO_ROOT



def resolve_path(path: str) -> Path:
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.exists():
            return candidate
    return Path(path)


def load_observations(cfg: DictConfig, policy, notes: list, source: Optional[str] = None) -> tuple[Any, str]:
    """``[n_obs, n_obs_steps, obs_dim]`` raw observation histories and where they came from
    (``cfg.obs_source`` unless ``source`` is given)."""
    import torch

    pc = policy.config
    n = int(cfg.n_obs)
    if n < 1:
        raise ValueError(f"n_obs must be >= 1, got {cfg.n_obs}")
    source = str(source or cfg.obs_source)
    if source not in ("auto", "dataset", "env", "random"):
        raise ValueError(f"obs_source must be auto, dataset, env or random, got {source!r}")
    dataset = resolve_path(str(cfg.dataset)) if cfg.dataset else None
    if source == "auto":
        if dataset is not None and dataset.is_file():
            source = "dataset"
        else:
            # find_spec, not import: importing robosuite here would log its start-up lines before
            # RobosuiteEnv quiets them (every line then printed twice, once in the table's stream)
            source = "env" if importlib.util.find_spec("robosuite") is not None else "random"
            notes.append(f"obs_source auto: dataset {cfg.dataset} not found, using {source}")

    if source == "dataset":
        from parapolicy.policy import SequenceDataset

        if dataset is None or not dataset.is_file():
            raise FileNotFoundError(f"obs_source=dataset: {cfg.dataset} not found")
        data = SequenceDataset.from_hdf5(dataset, pc.obs_keys, pc.horizon, pc.n_obs_steps, pc.n_action_steps)
        index = torch.linspace(0, len(data) - 1, n).round().long()  # spread over the whole file
        return data.windows(index)["obs"].float(), f"dataset {dataset}"
    if source == "env":
        from parapolicy.envs import make_env

        env = make_env(str(cfg.env.name))
        try:
            histories = []
            for i in range(n):
                obs, _ = env.reset(seed=int(cfg.seed) + i)
                histories.append(np.stack([obs] * pc.n_obs_steps))  # as act() does on its first call
        finally:
            env.close()
        obs = torch.from_numpy(np.stack(histories)).float()
        if obs.shape[-1] != pc.obs_dim:
            raise ValueError(f"env {cfg.env.name} gives obs_dim {obs.shape[-1]}, the policy expects {pc.obs_dim}")
        return obs, f"env {cfg.env.name} resets (seeds {cfg.seed}..{int(cfg.seed) + n - 1})"
    gen = torch.Generator().manual_seed(int(cfg.seed))
    low, high = policy.normalizer.obs.min.cpu(), policy.normalizer.obs.max.cpu()
    obs = low + torch.rand((n, pc.n_obs_steps, pc.obs_dim), generator=gen) * (high - low)
    return obs, "random (uniform over the normaliser's range)"

