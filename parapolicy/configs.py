"""Lookups in ``conf/`` shared by the eval, bench and server (checkpoint folders: ``parapolicy.policy.checkpoint.resolve_checkpoint``).

``conf/`` ships as the package ``parapolicy.conf``, so these work from an installed wheel as from a checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
# the keys of a sampler config that are not options of the sampler's constructor
SAMPLER_KEYS = ("name", "num_inference_steps")


def available_samplers() -> list[str]:
    """The sampler config files, ``conf/sampler/<name>.yaml``, by name."""
    folder = resources.files("parapolicy.conf") / "sampler"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def sampler_config(name: str) -> DictConfig:
    """The config for ``baseline=<name>``: ``conf/sampler/<name>.yaml``, else a registered sampler
    name with its default options (e.g. ``parasrdsddim``, whose config file is ``srds.yaml``)."""
    from parapolicy.samplers import SAMPLERS

    if name in available_samplers():
        return OmegaConf.load(str(resources.files("parapolicy.conf") / "sampler" / f"{name}.yaml"))
    if name in SAMPLERS:
        return OmegaConf.create({"name": name, "num_inference_steps": None})  # steps: the sampler's
    raise ValueError(f"unknown baseline sampler {name!r}; configs: {', '.join(available_samplers())}; "
                     f"registered samplers: {', '.join(sorted(SAMPLERS))}")


def sampler_kwargs(cfg: DictConfig) -> tuple[str, int | None, dict]:
    """(name, num_inference_steps, options) from a sampler config; null options mean 'default'."""
    options = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
               if k not in SAMPLER_KEYS and v is not None}
    steps = cfg.get("num_inference_steps")
    return str(cfg.name), int(steps) if steps is not None else None, options
