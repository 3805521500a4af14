"""Pickle-free checkpoint I/O.

A checkpoint is a folder::

    model.safetensors   model.* (network weights, the EMA copy) + normalizer.{obs,action}.{min,max}
    config.json         policy config, network kwargs, diffusers scheduler config, default sampler,
                        env name, training provenance

Loading validates everything up front and fails with a message naming the file and the problem.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch

from parapolicy.policy.configuration import DiffusionPolicyConfig
from parapolicy.policy.diffusion_policy import DiffusionPolicy

FORMAT = "parapolicy.diffusion_policy"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REQUIRED_CONFIG_FIELDS = ("format", "format_version", "policy", "scheduler")
REQUIRED_POLICY_FIELDS = ("obs_dim", "action_dim", "obs_keys", "horizon", "n_obs_steps", "n_action_steps")

# <repo>/checkpoints: the repository root is the parent of the parapolicy package directory.
REPO_ROOT = Path(__file__).resolve().parents[2]
IN_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file()  # a source tree (editable install), not a wheel


def _shipped_checkpoints_dir() -> Path:
    """``checkpoints/`` at the repository's top level, installed as the package ``parapolicy.checkpoints``."""
    try:
        return Path(str(resources.files("parapolicy.checkpoints")))
    except ModuleNotFoundError:  # the source tree on sys.path without an install
        return REPO_ROOT / "checkpoints"


CHECKPOINTS_DIR = _shipped_checkpoints_dir()


def git_commit(cwd: Path = REPO_ROOT) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(**extra: Any) -> dict[str, Any]:
    """Training provenance common to every checkpoint (date, torch version, git commit) + ``extra``."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        **extra,
    }


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    # Write-then-rename: an interrupted save never leaves a half-written checkpoint behind.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


def load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning a corrupted / truncated file into a clear ValueError."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path.name} not found in {path.parent}")
    try:
        return load(path.read_bytes())
    except Exception as err:  # safetensors raises SafetensorError / OSError with terse messages
        raise ValueError(f"{what}: {path.name} is corrupted or truncated ({err})") from err


def save_checkpoint(policy: DiffusionPolicy, folder: str | Path, training: Mapping[str, Any] | None = None) -> Path:
    """Write ``policy`` (pass the EMA copy when training) to ``folder``; returns the folder.

    ``training``: provenance such as dataset path / sha256, iterations, final loss.
    """
    from parapolicy.policy.networks import network_description

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = policy.config
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "env": cfg.env,
        "policy": cfg.to_dict(),
        "network": network_description(cfg),
        "scheduler": {"class": type(policy.noise_scheduler).__name__, **policy.scheduler_config},
        "sampler": {"name": cfg.sampler, "num_inference_steps": cfg.num_inference_steps, **cfg.sampler_options},
        "num_parameters": sum(p.numel() for p in policy.model.parameters()),
        # Date / torch version / git commit are always recorded; `training` adds or overrides.
        "training": {**provenance(), **(training or {})},
    }
    save_safetensors(policy.state_dict(), folder / WEIGHTS_FILE, metadata={"format": FORMAT})
    _atomic_write_bytes(folder / CONFIG_FILE, (json.dumps(config, indent=2, default=str) + "\n").encode())
    return folder


def save_converted(policy: DiffusionPolicy, folder: str | Path, training: Mapping[str, Any]) -> Path:
    """``save_checkpoint`` for importers: a save that fails part-way removes what it wrote, so a refused or
    interrupted conversion never leaves a half checkpoint that ``load_policy`` could pick up."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return save_checkpoint(policy, folder, training=training)
    except BaseException:
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            (folder / name).unlink(missing_ok=True)
        raise


def read_config(folder: str | Path) -> dict[str, Any]:
    """Read and validate ``config.json`` of a checkpoint folder."""
    folder = Path(folder)
    where = f"checkpoint {folder}"
    if not folder.is_dir():
        raise FileNotFoundError(f"{where}: folder not found")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{where}: {CONFIG_FILE} not found")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: {CONFIG_FILE} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{where}: {CONFIG_FILE} must hold a JSON object")
    missing = [k for k in REQUIRED_CONFIG_FIELDS if k not in config]
    if missing:
        raise ValueError(f"{where}: {CONFIG_FILE} lacks required fields {missing}")
    if config["format"] != FORMAT:
        raise ValueError(f"{where}: format {config['format']!r} is not {FORMAT!r}")
    if int(config["format_version"]) > FORMAT_VERSION:
        raise ValueError(f"{where}: format_version {config['format_version']} is newer than supported {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_POLICY_FIELDS if k not in config["policy"]]
    if missing:
        raise ValueError(f"{where}: {CONFIG_FILE} 'policy' lacks required fields {missing}")
    return config


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> DiffusionPolicy:
    """Rebuild the policy from ``folder`` and load its weights after checking every key and shape."""
    folder = Path(folder)
    where = f"checkpoint {folder}"
    config = read_config(folder)
    try:
        policy_config = DiffusionPolicyConfig.from_dict(config["policy"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: invalid 'policy' config ({err})") from err
    scheduler_config = {k: v for k, v in config["scheduler"].items() if k != "class"}
    policy = DiffusionPolicy(policy_config, scheduler_config=scheduler_config)

    tensors = load_safetensors(folder / WEIGHTS_FILE, where)
    # Shipped weights may be stored in half precision (scripts/half_checkpoint.py, to keep what travels
    # small); the policy always runs on their float32 upcast.
    tensors = {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in tensors.items()}
    expected = policy.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{where}: missing keys {_preview(missing)} in {WEIGHTS_FILE}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{where}: unexpected keys {_preview(unexpected)} in {WEIGHTS_FILE}")
    for key, ref in expected.items():
        if tuple(tensors[key].shape) != tuple(ref.shape):
            raise ValueError(
                f"{where}: shape mismatch for {key}: file has {list(tensors[key].shape)}, "
                f"config expects {list(ref.shape)}"
            )
        if not torch.isfinite(tensors[key]).all():
            raise ValueError(f"{where}: {key} contains NaN or inf")
    policy.load_state_dict(tensors, strict=True)
    policy.training_info = dict(config.get("training", {}))
    return policy.to(device).eval()


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """The checkpoint folder (one holding ``config.json``) that ``name_or_path`` names: a folder as given
    (relative to the working directory), else relative to the source checkout, else a shipped policy by
    name: ``"square"`` or ``"checkpoints/square"`` -> the shipped ``checkpoints/square`` (installed with the
    package as ``parapolicy.checkpoints``, so this works from any directory and from a wheel)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    candidates = [REPO_ROOT / path] if IN_CHECKOUT and not path.is_absolute() else []
    shipped_name = path.parts[-1] if len(path.parts) == 2 and path.parts[0] == "checkpoints" else None
    if len(path.parts) == 1 and not str(name_or_path).startswith("."):
        shipped_name = str(path)
    if shipped_name is not None:
        candidates.append(CHECKPOINTS_DIR / shipped_name)
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    if shipped_name is not None:
        raise FileNotFoundError(
            f"checkpoint {str(name_or_path)!r}: neither a folder nor a name under {CHECKPOINTS_DIR} "
            f"(available: {shipped_checkpoints()}); train one with `python -m parapolicy.train env=...` "
            f"or pass checkpoint=<folder>")
    raise FileNotFoundError(f"checkpoint {path}: folder not found (looked in "
                            f"{', '.join(str(c) for c in [path, *candidates])})")


def shipped_checkpoints() -> list[str]:
    """The names of the shipped policies (``checkpoints/<name>/config.json``)."""
    return sorted(p.name for p in CHECKPOINTS_DIR.glob("*") if (p / "config.json").is_file())


def load_policy(
    name_or_path: str | Path,
    sampler: str | None = None,
    device: str | torch.device = "cpu",
    fast_path: Any = "auto",
    **sampler_options: Any,
) -> DiffusionPolicy:
    """Load a shipped policy ready for ``act()`` / ``predict_action()``.

    ``sampler`` picks a sampler by name (default: the checkpoint's, ddpm); ``sampler_options`` such as
    ``num_inference_steps``, ``window``, ``tolerance`` go to ``make_sampler``. ``fast_path``: "auto"
    (CUDA graphs on CUDA, plain path on CPU), "on" (also on CPU: the fastest backend per shape,
    ``parapolicy.policy.accel``) or "off".
    """
    policy = load_checkpoint(resolve_checkpoint(name_or_path), device=device)
    policy.enable_fast_path(fast_path)
    if sampler is not None or sampler_options:
        steps = sampler_options.pop("num_inference_steps", None)
        if sampler is None or sampler == policy.sampler_name:
            # Same sampler: the given options refine the checkpoint's defaults.
            sampler, sampler_options = policy.sampler_name, {**policy.sampler_options, **sampler_options}
        policy.set_sampler(sampler, steps, **sampler_options)
    return policy
