"""Collect scripted-expert demonstrations into a robomimic HDF5 file (low-dim, or with camera frames).

    python -m parapolicy.collect env=square n_demos=200 out=data/square.hdf5 seed=0
    python -m parapolicy.collect env=lift_image n_demos=100      # + obs/agentview_image, obs/robot0_eye_in_hand_image

Attempt ``i`` resets the environment with seed ``seed + i``; only successful episodes are kept, until
``n_demos`` are collected or ``max_attempts`` run out. The file is written to a temporary name beside
``out`` and renamed at the end, so an interrupted run never leaves a corrupt dataset.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from parapolicy.envs.robosuite_env import get_task


def check_output_path(out: str | os.PathLike) -> Path:
    """Validate ``out`` before any simulator starts; returns it as a Path."""
    out = Path(out)
    if out.suffix not in (".hdf5", ".h5"):
        raise ValueError(f"out={str(out)!r}: expected a .hdf5 file path")
    if out.exists() and out.is_dir():
        raise ValueError(f"out={str(out)!r} is a directory, expected a .hdf5 file path")
    parent = out.parent if str(out.parent) else Path(".")
    for ancestor in [parent, *parent.parents]:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ValueError(f"out={str(out)!r}: {str(ancestor)!r} is a file, not a directory")
            if not os.access(ancestor, os.W_OK):
                raise ValueError(f"out={str(out)!r}: directory {str(ancestor)!r} is not writable")
            break
    return out


def _episode_obs(raw_obs: list[dict], keys: list[str]) -> dict[str, np.ndarray]:
    """Stack per-step robosuite observations; robosuite's ``object-state`` is stored as ``object``.
    Camera frames (``<camera>_image``) stay uint8 ``[T, H, W, 3]``, upright (robomimic's image layout);
    everything else becomes float64."""
    stacked = {}
    for key in keys:
        name = "object" if key == "object-state" else key
        values = np.stack([np.asarray(step[key]) for step in raw_obs])
        stacked[name] = values if key.endswith("_image") else values.astype(np.float64)
    return stacked


def _is_recorded(key: str, value) -> bool:
    """Float observables, and camera frames."""
    value = np.asarray(value)
    return value.dtype.kind == "f" or (key.endswith("_image") and value.dtype == np.uint8)


def collect_demos(task: str, n_demos: int, out: str | os.PathLike, seed: int = 0, noise_std: float = 0.1,
                  max_attempts: int | None = None, progress: bool = True, time_limit_min: float | None = None) -> dict:
    """Run the scripted expert until ``n_demos`` successes; write them to ``out``. Returns counts.

    ``time_limit_min``: stop starting new attempts after this many minutes and write what was collected
    (camera tasks render every step, so a budget in time is often the natural one).
    """
    import h5py
    from tqdm import tqdm

    from parapolicy.envs.experts import make_expert, rollout
    from parapolicy.envs.robosuite_env import make_env

    spec = get_task(task)
    if n_demos < 1:
        raise ValueError(f"n_demos must be >= 1, got {n_demos}")
    max_attempts = int(max_attempts or 2 * n_demos)
    if max_attempts < n_demos:
        raise ValueError(f"max_attempts={max_attempts} is below n_demos={n_demos}")
    out = check_output_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")

    env = make_env(task)
    expert = make_expert(task, env)
    n_success = n_attempts = total = 0
    lengths, started = [], time.perf_counter()
    try:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            bar = tqdm(total=n_demos, desc=f"collect {task}", unit="demo", disable=not progress)
            deadline = started + 60.0 * time_limit_min if time_limit_min else float("inf")
            while n_success < n_demos and n_attempts < max_attempts and time.perf_counter() < deadline:
                episode_seed = seed + n_attempts
                n_attempts += 1
                ep = rollout(env, expert, episode_seed, noise_std=noise_std, record=True)
                if not ep["success"]:
                    bar.set_postfix(success=f"{n_success}/{n_attempts}")
                    continue
                demo = data.create_group(f"demo_{n_success}")
                obs_keys = [k for k, v in ep["raw_obs"][0].items() if _is_recorded(k, v)]
                for key, value in _episode_obs(ep["raw_obs"], obs_keys).items():
                    if value.dtype == np.uint8:  # frames: chunked per step, gzip (~3x smaller, still h5py-readable)
                        demo.create_dataset(f"obs/{key}", data=value, chunks=(1, *value.shape[1:]),
                                            compression="gzip", compression_opts=4)
                    else:
                        demo.create_dataset(f"obs/{key}", data=value)
                demo.create_dataset("actions", data=np.stack(ep["actions"]).astype(np.float64))
                demo.create_dataset("states", data=np.stack(ep["states"]))
                demo.create_dataset("rewards", data=np.asarray(ep["rewards"], dtype=np.float64))
                demo.create_dataset("dones", data=np.asarray(ep["dones"], dtype=np.int64))
                demo.attrs["num_samples"] = len(ep["actions"])
                demo.attrs["seed"] = episode_seed
                n_success += 1
                total += len(ep["actions"])
                lengths.append(len(ep["actions"]))
                bar.update(1)
                bar.set_postfix(success=f"{n_success}/{n_attempts}")
            bar.close()
            data.attrs["total"] = total
            data.attrs["env_args"] = env.env_args()
            data.attrs["n_attempts"] = n_attempts
            data.attrs["n_success"] = n_success
            data.attrs["seed"] = seed
            data.attrs["noise_std"] = noise_std
            data.attrs["parapolicy"] = json.dumps({
                "task": task, "obs_keys": list(spec.obs_keys), "obs_mode": env.obs_mode,
                "image_keys": list(env.image_keys),
                "actions": "expert labels; executed actions had N(0, noise_std) added to the arm dims (DART)",
            })
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    elapsed = time.perf_counter() - started
    return {"n_success": n_success, "n_attempts": n_attempts, "total_steps": total,
            "mean_length": float(np.mean(lengths)) if lengths else 0.0,
            "seconds_per_episode": elapsed / max(n_attempts, 1), "out": str(out)}


@hydra.main(version_base=None, config_path="pkg://parapolicy.conf", config_name="collect")
def main(cfg: DictConfig) -> None:
    stats = collect_demos(cfg.env.name, int(cfg.n_demos), cfg.out, seed=int(cfg.seed),
                          noise_std=float(cfg.noise_std), max_attempts=cfg.max_attempts,
                          time_limit_min=cfg.get("time_limit_min"))
    print(f"wrote {stats['out']}: {stats['total_steps']} steps, mean length {stats['mean_length']:.0f}, "
          f"{stats['seconds_per_episode']:.2f} s/episode")
    print(f"collected {stats['n_success']}/{stats['n_attempts']} successful episodes")


if __name__ == "__main__":
    main()
