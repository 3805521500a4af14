"""What an eval runs: the sampler's run and its baselines (``RunSpec``), their labels and schedule lengths.

``plan_runs`` reads only the checkpoint's ``config.json``, so a bad ``baseline`` entry fails before any
weights load or simulator starts; ``build_runs`` then makes one policy per run on shared weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from parapolicy.configs import available_samplers, sampler_config, sampler_kwargs


def check_episodes(cfg: DictConfig) -> None:
    """Fail on a bad env name, episode range, ``n_envs`` or ``max_episode_steps`` (ValueError, one line)."""
    from parapolicy.envs.robosuite_env import get_task

    get_task(cfg.env.name)
    n_episodes, first = int(cfg.n_episodes), cfg.get("first_episode", 0)
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first < n_episodes:
        raise ValueError(f"first_episode must be an integer in [0, n_episodes) = [0, {n_episodes}), got {first!r}")
    if int(cfg.n_envs) < 1:
        raise ValueError(f"n_envs must be >= 1, got {cfg.n_envs}")
    if cfg.max_episode_steps is not None and int(cfg.max_episode_steps) < 1:
        raise ValueError(f"max_episode_steps must be >= 1, got {cfg.max_episode_steps}")


def baseline_names(value) -> list:
    """``baseline``: one entry (a sampler name, ``name@steps`` or a dict), a list of them, or null."""
    if value in (None, "null", "none"):
        return []
    if isinstance(value, (str, dict, DictConfig)):
        return [value]
    return list(value)


def run_label(name: str, options: dict, steps: int | None = None) -> str:
    """``name``, ``name-<steps>`` when the schedule length is shown, ``+warm`` for warm starts."""
    label = name if steps is None else f"{name}-{steps}"
    return f"{label}+warm" if options.get("warm_start") else label


@dataclasses.dataclass
class RunSpec:
    """One run of an eval (the sampler or a baseline): what it samples with and how it is labelled.

    ``steps`` is the schedule length it runs; ``label`` shows it (``ddim-100``) whenever it differs from
    the run's config file (``conf/sampler/<name>.yaml``) or from the sampler's. ``legacy_label`` is the
    label earlier versions gave the same run (steps never shown), so ``resume=true`` reads their logs.
    """

    label: str
    name: str
    steps: int
    options: dict
    role: str  # "sampler" | "baseline"
    legacy_label: str | None = None
    timestep_spacing: str | None = None  # the spacing in use, once the sampler is built


def parse_baseline(entry, num_train_timesteps: int) -> tuple[DictConfig, int | None]:
    """One ``baseline`` entry -> (its sampler config, its own schedule length or None).

    ``"ddim"``: the config with the sampler's schedule length (like for like); ``"ddim@15"``: 15 steps;
    ``{name: ddim, num_inference_steps: 15, eta: 0.5}``: the config with these values on top (no
    ``num_inference_steps``: the sampler's). Raises ValueError naming the entry on a bad step count.
    """
    if isinstance(entry, (dict, DictConfig)):
        entry = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else dict(entry)
        if "name" not in entry:
            raise ValueError(f"baseline {entry!r}: a dict entry needs a 'name'")
        b_cfg = OmegaConf.merge(sampler_config(str(entry["name"])), entry)
        steps = entry.get("num_inference_steps")
        text = f"baseline {entry!r}: num_inference_steps"
    else:
        name, _, steps = str(entry).partition("@")
        b_cfg = sampler_config(name)
        steps = steps if "@" in str(entry) else None
        text = f"baseline {str(entry)!r}: the steps after '@'"
    if steps is None:
        return b_cfg, None
    return b_cfg, check_steps(text, steps, num_train_timesteps)


def check_steps(text: str, value, num_train_timesteps: int) -> int:
    """A schedule length: an integer in [1, num_train_timesteps], else ValueError starting with ``text``."""
    try:
        steps = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        steps = None
    if steps is None or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"{text} must be an integer in [1, {num_train_timesteps}] (the checkpoint's "
                         f"num_train_timesteps), got {value!r}")
    return steps


def config_steps(name: str) -> int | None:
    """``num_inference_steps`` of ``conf/sampler/<name>.yaml`` (None: no such file, or null there)."""
    if name not in available_samplers():
        return None
    return sampler_kwargs(sampler_config(name))[1]


def _sampler_choice(cfg: DictConfig) -> str:
    """The ``sampler=<file>`` config the run was started with (Hydra's choice), else the sampler's name."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("sampler")
        if choice:
            return str(choice)
    return str(cfg.sampler.name)


def _spacing(options: dict) -> str | None:
    return options.get("timestep_spacing") or (options.get("scheduler_kwargs") or {}).get("timestep_spacing")


def plan_runs(cfg: DictConfig, checkpoint: Path) -> list[RunSpec]:
    """The sampler's run, then one per ``baseline`` entry, with labels and schedule lengths (the
    checkpoint's ``config.json`` gives the defaults and the bound num_train_timesteps). Reads no weights.

    A baseline inherits the sampler's ``timestep_spacing`` unless it sets one, so a like-for-like
    comparison compares the same schedule.
    """
    from parapolicy.policy.checkpoint import read_config

    saved = read_config(checkpoint)
    num_train = int(saved["scheduler"]["num_train_timesteps"])
    saved_steps = int((saved.get("sampler") or {}).get("num_inference_steps") or saved["policy"]["num_inference_steps"])
    name, steps, options = sampler_kwargs(cfg.sampler)
    if steps is not None:
        steps = check_steps("sampler.num_inference_steps", steps, num_train)
    steps = steps or saved_steps
    default = config_steps(_sampler_choice(cfg)) or saved_steps
    specs = [RunSpec(run_label(name, options, None if steps == default else steps), name, steps, options,
                     "sampler", legacy_label=run_label(name, options))]
    spacing = _spacing(options)
    for entry in baseline_names(cfg.baseline):
        b_cfg, own_steps = parse_baseline(entry, num_train)
        b_name, _, b_options = sampler_kwargs(b_cfg)
        b_steps = steps if own_steps is None else own_steps
        if spacing and not _spacing(b_options):
            b_options["timestep_spacing"] = spacing
        source = str(entry["name"]) if isinstance(entry, (dict, DictConfig)) else str(entry).partition("@")[0]
        b_default = config_steps(source)  # the steps of the config file the entry names, if any
        shown = b_steps != steps or (b_default is not None and b_steps != b_default)
        legacy = run_label(b_name, b_options) if b_steps == steps else None  # earlier versions: the sampler's steps
        label = run_label(b_name, b_options, b_steps if shown else None)
        taken = {spec.label for spec in specs}
        if label in taken:  # the same sampler twice (e.g. sampler=ddim baseline=ddim)
            label, i = f"{label}-baseline", 2
            while label in taken:
                label, i = f"{label.rsplit('-baseline', 1)[0]}-baseline{i}", i + 1
        if legacy is not None and legacy in {spec.legacy_label for spec in specs}:
            legacy = f"{legacy}-baseline"
        specs.append(RunSpec(label, b_name, b_steps, b_options, "baseline", legacy))
    return specs


def relabel_legacy(episodes: list[dict], specs: list[RunSpec]) -> list[dict]:
    """Log lines written before labels showed steps, renamed to today's labels (``resume=true`` on an
    older run directory then continues it instead of running everything again)."""
    labels = {spec.label for spec in specs}
    rename = {spec.legacy_label: spec.label for spec in specs
              if spec.legacy_label and spec.legacy_label != spec.label and spec.legacy_label not in labels}
    return [{**ep, "run": rename[ep["run"]]} if ep.get("run") in rename else ep for ep in episodes]


def build_runs(policy, specs: list[RunSpec]) -> dict:
    """``{label: policy}``: the sampler's policy first, then each baseline on the same weights."""
    from parapolicy.realtime.runner import with_sampler

    runs = {specs[0].label: policy}
    for spec in specs[1:]:
        runs[spec.label] = with_sampler(policy, spec.name, spec.steps, **spec.options)
    for spec in specs:
        if runs[spec.label].sampler.num_inference_steps != spec.steps:  # plan and build must agree
            raise RuntimeError(f"{spec.label}: planned {spec.steps} steps, built {runs[spec.label].sampler!r}")
        spec.timestep_spacing = runs[spec.label].sampler.timestep_spacing
    return runs
