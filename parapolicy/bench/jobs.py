"""What the bench times: one ``Job`` per sampler configuration and fast-path mode, with its sequential twin.

A parallel sampler is always timed beside the sequential sampler it must reproduce (paraddpm -> ddpm,
paraddim -> ddim, srds / parataa -> the solver they build on), with the same schedule length, so that
every speedup compares like with like. ``build_jobs`` expands the ``samplers`` and ``windows`` sweeps
of the config into jobs, each holding a shallow policy copy with its sampler and fast path.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

PHASES = ("samplers", "windows")
FAST_SUFFIX = "+fast"


@dataclass
class Job:
    """One sampler configuration to time in one fast-path mode: ``label`` is unique within a phase."""

    label: str
    name: str
    steps: int
    options: dict
    twin: Optional[str] = None  # label of the sequential twin job in the same mode, if any
    window: Optional[int] = None  # for the window sweep
    policy: Any = None  # a shallow policy copy with this sampler (and this mode's fast path)
    default_steps: Optional[int] = None  # the schedule length of the sampler's config file
    fast: str = "off"  # fast-path mode: "off" (plain path) or "on"
    base: str = ""  # the label without the mode suffix (same for both modes of one sampler)
    twin_base: Optional[str] = None
    bucket_calls: dict = field(default_factory=dict)  # fast path: denoiser calls per bucket, all timed calls
    warmup_s: float = 0.0  # fast-path warm-up this job paid (shapes warmed by earlier jobs are free)
    requested: str = ""  # the name it was asked for by (a conf/sampler file or sampler name)

    def describe(self) -> dict:
        return {"label": self.label, "base_label": self.base, "sampler": self.name, "steps": self.steps,
                "num_inference_steps": self.steps, "fast_path": self.fast, "options": self.options,
                "twin": self.twin}


def with_sampler(policy, name: str, steps: int, **options):
    """A shallow copy of ``policy`` (same network, same fast path) with another sampler."""
    other = copy.copy(policy)
    other.set_sampler(name, steps, **options)
    return other


def step_label(label: str, steps: int, default_steps: Optional[int]) -> str:
    """``ddim`` -> ``ddim-100`` when the schedule length differs from the config file's."""
    return label if default_steps is None or int(steps) == int(default_steps) else f"{label}-{int(steps)}"


def twin_name(name: str, cfg_twins: dict, sampler=None) -> Optional[str]:
    """The registered sequential sampler that parallel sampler ``name`` must reproduce, or None.

    ``cfg_twins[name]`` if given; else a ``base_sampler`` / ``base`` / ``solver`` attribute of the
    sampler naming a registered sequential sampler; else the first registered sequential class in the
    sampler's class hierarchy (ParaDDPMSampler -> DDPMSampler -> "ddpm").
    """
    from parapolicy.samplers import SAMPLERS

    if name in cfg_twins:
        return str(cfg_twins[name])
    cls = SAMPLERS[name]
    if not cls.is_parallel:
        return None
    sequential = {c: n for n, c in SAMPLERS.items() if not c.is_parallel}
    for attr in ("base_sampler", "base", "solver"):
        value = getattr(sampler, attr, None)
        if isinstance(value, str) and value in SAMPLERS and not SAMPLERS[value].is_parallel:
            return value
    for klass in cls.__mro__[1:]:
        if klass in sequential:
            return sequential[klass]
    return None


def expand_sampler_names(names: list[str], notes: list) -> list[tuple[str, str]]:
    """(label, registered sampler name) pairs for the requested names, in order, without repeats.

    A name with a ``conf/sampler/<name>.yaml`` runs the sampler that file names (``srds`` ->
    ``parasrdsddpm``), labelled by the file's name; ``all`` means every such file. Else a registered
    name runs with default options; else it stands for the registered names that contain it; with
    none, it is skipped with a note.
    """
    from parapolicy.configs import available_samplers, sampler_config
    from parapolicy.samplers import SAMPLERS

    configs = available_samplers()
    out: list[tuple[str, str]] = []
    for name in names:
        if name == "all":
            matches = [(c, str(sampler_config(c).name)) for c in configs]
        elif name in configs:
            matches = [(name, str(sampler_config(name).name))]
        elif name in SAMPLERS:
            matches = [(name, name)]
        else:
            matches = [(n, n) for n in sorted(SAMPLERS) if name in n]
            if matches:
                notes.append(f"{name}: neither a conf/sampler file nor a registered name, running the "
                             f"registered {', '.join(n for n, _ in matches)}")
        for label, sampler in matches:
            if sampler not in SAMPLERS:
                notes.append(f"{label}: sampler {sampler!r} is not registered in parapolicy.samplers.SAMPLERS, skipped")
            elif label not in [lbl for lbl, _ in out]:
                out.append((label, sampler))
        if not matches:
            notes.append(f"{name}: not registered in parapolicy.samplers.SAMPLERS, skipped")
    return out


def config_steps(label: str, name: str, default_steps: int) -> int:
    """The schedule length a sampler has by default: its conf/sampler file's (if that file names it),
    else the checkpoint's."""
    from parapolicy.configs import available_samplers, sampler_config, sampler_kwargs

    if label in available_samplers():
        yaml_name, steps, _ = sampler_kwargs(sampler_config(label))
        if yaml_name == name and steps is not None:
            return int(steps)
    return int(default_steps)


def config_options(name: str) -> dict:
    """The options of ``conf/sampler/<name>.yaml`` (nulls dropped), or {} without such a file."""
    from parapolicy.configs import available_samplers, sampler_config, sampler_kwargs

    return sampler_kwargs(sampler_config(name))[2] if name in available_samplers() else {}


def sampler_settings(label: str, name: str, cfg: DictConfig, default_steps: int, notes: list) -> tuple[int, dict]:
    """(steps, options) for sampler ``name`` requested as ``label``: ``conf/sampler/<label>.yaml`` if
    it names that sampler (else defaults), the steps override, then ``sampler_options[label]``."""
    from parapolicy.configs import available_samplers, sampler_config, sampler_kwargs

    found = False
    if label in available_samplers():
        yaml_name, steps, options = sampler_kwargs(sampler_config(label))
        found = yaml_name == name
        steps = default_steps if steps is None else steps
    if not found:
        steps, options = default_steps, {}
    if cfg.num_inference_steps is not None:
        steps = int(cfg.num_inference_steps)
    if not found:
        notes.append(f"{label}: no conf/sampler file for {name}, default options, {steps} steps")
    overrides = cfg.sampler_options.get(label) if cfg.sampler_options else None
    if overrides:
        options.update(OmegaConf.to_container(overrides, resolve=True))
    return steps, options


def fast_modes(cfg: DictConfig, device) -> list[str]:
    """The fast-path modes to run: ``both`` -> [off, on]; ``auto`` -> on for CUDA, off on CPU; then one
    mode per entry of ``fast_path_backends`` (``backend_mode``)."""
    mode = str(cfg.fast_path).lower()
    if mode == "both":
        modes = ["off", "on"]
    elif mode in ("auto", "none", "null"):
        modes = ["on"] if mode == "auto" and device.type == "cuda" else ["off"]
    elif mode in ("on", "true"):
        modes = ["on"]
    elif mode in ("off", "false"):
        modes = ["off"]
    else:
        raise ValueError(f"fast_path must be both, auto, on or off, got {cfg.fast_path!r}")
    for entry in cfg.get("fast_path_backends") or []:
        name = backend_mode(entry)
        if name not in modes:
            modes.append(name)
    return modes


def backend_mode(entry) -> str:
    """The mode name of one ``fast_path_backends`` entry: a backend (``openvino``) or a list of them,
    the fastest per shape (``[eager, trace]`` -> ``eager-trace``: the fast path before OpenVINO and ONNX
    Runtime)."""
    from parapolicy.policy.accel import CPU_BACKENDS

    names = [str(entry)] if isinstance(entry, str) else [str(n) for n in entry]
    bad = [n for n in names if n not in CPU_BACKENDS]
    if bad or not names:
        raise ValueError(f"fast_path_backends entries must be backends from {list(CPU_BACKENDS)} or lists "
                         f"of them, got {entry!r}")
    return "-".join(names)


def mode_backend(mode: str):
    """A FastPath ``backend`` option for a mode: None (its own options) for "on", else the backend(s)."""
    if mode == "on":
        return None
    names = mode.split("-")
    return names[0] if len(names) == 1 else names


def mode_suffix(mode: str) -> str:
    return FAST_SUFFIX if mode == "on" else f"+{mode}"


def build_jobs(cfg: DictConfig, policy, notes: list, modes: tuple = ("off",), fast_policy=None) -> dict[str, list[Job]]:
    """The jobs of the ``samplers`` and ``windows`` phases (twins included), policies built, for every
    fast-path mode in ``modes`` ("off": ``policy``; "on": ``fast_policy``, the same network with a
    fast path; its jobs are labelled ``+fast``; a backend mode (``fast_modes``): ``fast_policy[mode]``
    when ``fast_policy`` is a dict of policies by mode, labelled ``+<mode>``)."""
    from parapolicy.samplers import SAMPLERS

    twins_cfg = OmegaConf.to_container(cfg.twins, resolve=True) if cfg.twins else {}
    phases: dict[str, list[Job]] = {"samplers": [], "windows": []}
    default = policy.num_inference_steps

    def add(phase: str, job: Job) -> Job:
        labels = {other.base for other in phases[phase]}  # unique within a phase
        base, i = job.label, 2
        while job.label in labels:
            job.label = f"{base}#{i}"
            i += 1
        job.base = job.label
        job.policy = with_sampler(policy, job.name, job.steps, **job.options)  # fails early on bad options
        job.policy.fast_path = None  # mode "off": the plain path, also on CUDA
        phases[phase].append(job)
        return job

    def add_twin(phase: str, job: Job) -> None:
        key = job.requested or job.label
        chosen = {job.name: twins_cfg[key]} if key in twins_cfg else twins_cfg  # by requested label or name
        twin = twin_name(job.name, chosen, job.policy.sampler)
        if twin is None:
            if SAMPLERS[job.name].is_parallel:
                notes.append(f"{job.label}: no sequential twin known (set +twins.{job.name}=<sampler>)")
            return
        if twin not in SAMPLERS:
            notes.append(f"{job.label}: twin {twin!r} is not a registered sampler")
            return
        accepted = set(SAMPLERS[twin].option_names())
        options = {k: v for k, v in job.options.items() if k in accepted}
        for other in phases[phase]:
            if (other.name, other.steps, other.options) == (twin, job.steps, options):
                job.twin = other.label
                return
        twin_default = config_steps(twin, twin, default)
        label = step_label(twin, job.steps, twin_default)
        # a twin whose timestep spacing differs from its config file's says so (ddim-leading)
        checkpoint_spacing = policy.scheduler_config.get("timestep_spacing", "leading")
        spacing = options.get("timestep_spacing") or checkpoint_spacing
        own = config_options(twin).get("timestep_spacing") or checkpoint_spacing
        if spacing != own:
            label = f"{label}-{spacing}"
        job.twin = add(phase, Job(label, twin, job.steps, options, default_steps=twin_default)).label
        notes.append(f"{phase}: added {job.twin} ({job.steps} steps) as the sequential twin of {job.label}")

    requested = []
    for entry in [str(n) for n in cfg.samplers]:
        # "ddim@10": that sampler at 10 steps (label ddim-10), as the eval's baseline=[ddim@10] runs it
        base, at, steps_text = entry.partition("@")
        if at and not (steps_text.isdigit() and int(steps_text) >= 1):
            raise ValueError(f"samplers: {entry!r} must be <name>@<positive number of steps>")
        for label, name in expand_sampler_names([base], notes):
            steps, options = sampler_settings(label, name, cfg, default, notes)
            steps = int(steps_text) if at else steps
            if any((job.name, job.steps, job.options) == (name, steps, options) for job in requested):
                continue  # listed twice
            own = config_steps(label, name, default)
            requested.append(add("samplers", Job(step_label(label, steps, own), name, steps, options,
                                                 default_steps=own, requested=label)))
    for job in requested:
        add_twin("samplers", job)

    windows = [int(w) for w in (cfg.windows or [])]
    tolerances = [float(t) for t in (cfg.get("window_tolerances") or [])]
    if windows:
        found = expand_sampler_names([str(cfg.window_sampler)], [])[:1]
        if not found or "window" not in SAMPLERS[found[0][1]].option_names():
            notes.append(f"window sweep skipped: {cfg.window_sampler!r} is not a registered sampler with a window option")
        else:
            label, name = found[0]
            steps, options = sampler_settings(label, name, cfg, default, notes)
            own = config_steps(label, name, default)
            swept = []
            for tol in tolerances or [None]:
                for w in windows:
                    opts = {**options, "window": w, **({} if tol is None else {"tolerance": tol})}
                    tag = f"{step_label(label, steps, own)}-w{w}" + ("" if tol is None else f"-tol{tol:g}")
                    swept.append(add("windows", Job(tag, name, steps, opts, window=w, default_steps=own,
                                                    requested=label)))
            for job in swept:
                add_twin("windows", job)

    # Every job once per mode: the plain path first, then the fast path (its own policy copy).
    for phase, jobs in phases.items():
        out = []
        for mode in modes:
            for job in jobs:
                if mode == "off":
                    out.append(job)
                    continue
                mode_policy = fast_policy.get(mode) if isinstance(fast_policy, dict) else fast_policy
                if mode_policy is None:
                    raise ValueError(f"fast mode {mode!r} needs fast_policy")
                suffix = mode_suffix(mode)
                twin = None if job.twin is None else job.twin + suffix
                out.append(Job(job.label + suffix, job.name, job.steps, dict(job.options), twin, job.window,
                               with_sampler(mode_policy, job.name, job.steps, **job.options), job.default_steps,
                               mode, job.base, job.twin))
        for job in out:
            job.twin_base = job.twin_base if job.fast != "off" else job.twin
        if "off" not in modes:  # jobs of the plain path were only templates
            out = [job for job in out if job.fast != "off"]
        phases[phase] = out
    return phases

