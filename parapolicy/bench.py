"""Latency benchmark: every sampler against its sequential twin, with the fast path off and on.

    python -m parapolicy.bench                                      # quick: ddpm vs paraddpm (~1.5 min on an idle 2-core CPU)
    python -m parapolicy.bench preset=full                          # every sampler, batch 1 and 8, full-size U-Net
    python -m parapolicy.bench 'samplers=[ddpm,paraddpm]' 'batch_sizes=[1]' 'windows=[]' fast_path=off
    python -m parapolicy.bench device=cuda fast_path=on '+fast_path_options.dtype=bfloat16'

Phases (each with warm-up calls first, then ``repetitions`` timed calls that go round-robin over the
samplers, so that machine drift hits all of them alike):

1. ``samplers``: each requested sampler (options from ``conf/sampler/<name>.yaml``) at every batch size,
   timing ``policy.predict_action`` (what a control loop pays). A parallel sampler's sequential twin
   (paraddpm -> ddpm, paraddim -> ddim, srds / parataa -> the solver they build on) is run with the
   same schedule length. With ``fast_path=both`` (the default) every sampler runs twice, on the plain
   path (eager PyTorch) and on the fast path (``parapolicy.accel``: on CPU the fastest backend per
   shape, picked and warmed up before timing; label ``+fast``). ``speedup`` is the same-mode twin's p50
   over the sampler's p50 (eager vs eager, fast vs fast); ``speedup_vs_fastest_twin`` divides by the
   *fastest* variant of the twin instead, and ``headline`` holds, per parallel sampler, its fastest
   variant over the fastest twin: the honest figure. Call r of every sampler uses the same observations
   and the same noise (seed + r), so ``deviation_vs_twin`` (max |action difference|) is the parallel
   sampler's own error and ``deviation_vs_eager`` the fast path's.
2. ``windows``: the window sampler (paraddpm) at each window size (and tolerance, ``window_tolerances``),
   batch 1, with its twin, in every fast-path mode.
3. ``denoiser``: one bare ``denoise`` call with K stacked timesteps for K in ``denoiser.k`` (network
   rows = K * batch), for the checkpoint's network (and Diffusion Policy's full-size U-Net, down_dims
   256/512/1024, random weights, with ``denoiser.full_size``), in every mode: how much a Picard round
   costs over a sequential step. From it, every sampler / window row gets ``predicted_ms``, the
   rounds x per-call-cost model (``predict_latency``), next to what was measured.

Labels carry the schedule length when it differs from the sampler's config file (``ddim-100``).
Writes ``bench.json``, ``latency_vs_batch.png``, ``latency_vs_window.png``, ``denoiser_vs_k.png`` to
Hydra's run dir (``outputs/bench/<env>/<date>``) or ``out=<folder>``, and prints tables. On CUDA,
every timer brackets the call with ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import copy
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
PHASES = ("samplers", "windows")
FAST_SUFFIX = "+fast"


# ------------------------------------------------------------------------------------------ jobs
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
    from parapolicy.eval import available_samplers, sampler_config
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
    from parapolicy.eval import available_samplers, sampler_config, sampler_kwargs

    if label in available_samplers():
        yaml_name, steps, _ = sampler_kwargs(sampler_config(label))
        if yaml_name == name and steps is not None:
            return int(steps)
    return int(default_steps)


def config_options(name: str) -> dict:
    """The options of ``conf/sampler/<name>.yaml`` (nulls dropped), or {} without such a file."""
    from parapolicy.eval import available_samplers, sampler_config, sampler_kwargs

    return sampler_kwargs(sampler_config(name))[2] if name in available_samplers() else {}


def sampler_settings(label: str, name: str, cfg: DictConfig, default_steps: int, notes: list) -> tuple[int, dict]:
    """(steps, options) for sampler ``name`` requested as ``label``: ``conf/sampler/<label>.yaml`` if
    it names that sampler (else defaults), the steps override, then ``sampler_options[label]``."""
    from parapolicy.eval import available_samplers, sampler_config, sampler_kwargs

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
    """The fast-path modes to run: ``both`` -> [off, on]; ``auto`` -> on for CUDA, off on CPU."""
    mode = str(cfg.fast_path).lower()
    if mode == "both":
        return ["off", "on"]
    if mode in ("auto", "none", "null"):
        return ["on"] if mode == "auto" and device.type == "cuda" else ["off"]
    if mode in ("on", "true"):
        return ["on"]
    if mode in ("off", "false"):
        return ["off"]
    raise ValueError(f"fast_path must be both, auto, on or off, got {cfg.fast_path!r}")


def build_jobs(cfg: DictConfig, policy, notes: list, modes: tuple = ("off",), fast_policy=None) -> dict[str, list[Job]]:
    """The jobs of the ``samplers`` and ``windows`` phases (twins included), policies built, for every
    fast-path mode in ``modes`` ("off": ``policy``; "on": ``fast_policy``, the same network with a
    fast path; its jobs are labelled ``+fast``)."""
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
    for label, name in expand_sampler_names([str(n) for n in cfg.samplers], notes):
        steps, options = sampler_settings(label, name, cfg, default, notes)
        own = config_steps(label, name, default)
        requested.append(add("samplers", Job(step_label(label, steps, own), name, steps, options, default_steps=own,
                                             requested=label)))
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
                if fast_policy is None:
                    raise ValueError("fast mode 'on' needs fast_policy")
                twin = None if job.twin is None else job.twin + FAST_SUFFIX
                out.append(Job(job.label + FAST_SUFFIX, job.name, job.steps, dict(job.options), twin, job.window,
                               with_sampler(fast_policy, job.name, job.steps, **job.options), job.default_steps,
                               "on", job.base, job.twin))
        for job in out:
            job.twin_base = job.twin_base if job.fast == "on" else job.twin
        if "off" not in modes:  # jobs of the plain path were only templates
            out = [job for job in out if job.fast == "on"]
        phases[phase] = out
    return phases


# ------------------------------------------------------------------------------------------ observations
def resolve_path(path: str) -> Path:
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.exists():
            return candidate
    return Path(path)


def load_observations(cfg: DictConfig, policy, notes: list) -> tuple[Any, str]:
    """``[n_obs, n_obs_steps, obs_dim]`` raw observation histories and where they came from."""
    import torch

    pc = policy.config
    n = int(cfg.n_obs)
    if n < 1:
        raise ValueError(f"n_obs must be >= 1, got {cfg.n_obs}")
    source = str(cfg.obs_source)
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


# ------------------------------------------------------------------------------------------ timing
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stats(values_ms) -> dict:
    values = np.asarray(values_ms, dtype=np.float64)
    if values.size == 0:
        return {"p50": float("nan"), "p95": float("nan"), "mean": float("nan"), "min": float("nan"), "n": 0}
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": float(p50), "p95": float(p95), "mean": float(values.mean()), "min": float(values.min()),
            "n": int(values.size)}


@dataclass
class Record:
    latency_ms: list = field(default_factory=list)
    rounds: list = field(default_factory=list)
    model_evals: list = field(default_factory=list)
    converged: list = field(default_factory=list)
    deviation: list = field(default_factory=list)
    deviation_eager: list = field(default_factory=list)


def _fast_path_of(job: Job):
    from parapolicy.accel import FastPath

    fast = job.policy.fast_path
    return fast if isinstance(fast, FastPath) else None


def warm_up_jobs(jobs: list[Job], batch: int) -> None:
    """Fast-path warm-up (CPU: backend choice per shape) for every fast job, before any timed call;
    each job records the seconds it paid (a shape another job warmed costs nothing)."""
    from parapolicy.accel import warm_up

    for job in jobs:
        if _fast_path_of(job) is not None:
            job.warmup_s += warm_up(job.policy, batch).get("warmup_s", 0.0)


def time_phase(jobs: list[Job], obs_pool, batch: int, cfg: DictConfig, device, bar=None) -> dict[str, Record]:
    """Warm-up, then ``repetitions`` rounds; each round calls every job once, starting one job later
    than the previous round. Call r gets observations r*batch.. and noise seed + r for every job."""
    import torch

    records = {job.label: Record() for job in jobs}
    n_obs = obs_pool.shape[0]
    for job in jobs:
        job.bucket_calls = {}

    def call(job: Job, r: int):
        index = [(r * batch + i) % n_obs for i in range(batch)]
        obs = obs_pool[index]
        gen = torch.Generator(device=device).manual_seed(int(cfg.seed) + r)
        _sync(device)
        start = time.perf_counter()
        out = job.policy.predict_action(obs, generator=gen)
        _sync(device)
        return (time.perf_counter() - start) * 1e3, out

    warm_up_jobs(jobs, batch)
    for job in jobs:
        for w in range(int(cfg.warmup)):
            call(job, w)
    for r in range(int(cfg.repetitions)):
        actions = {}
        shift = r % len(jobs)
        for job in jobs[shift:] + jobs[:shift]:
            fast = _fast_path_of(job)
            before = dict(fast.stats.per_bucket) if fast is not None else {}
            ms, out = call(job, r)
            if fast is not None:  # the shared fast path's calls per bucket during this call
                for bucket, n in fast.stats.per_bucket.items():
                    if n - before.get(bucket, 0):
                        job.bucket_calls[bucket] = job.bucket_calls.get(bucket, 0) + n - before.get(bucket, 0)
            rec = records[job.label]
            rec.latency_ms.append(ms)
            rec.rounds.append(_as_float(out["rounds"]))
            rec.model_evals.append(_as_float(out["model_evals"]))
            converged = out["converged"]
            rec.converged.append(bool(converged.all()) if torch.is_tensor(converged) else bool(converged))
            actions[job.label] = out["action_pred"].float().cpu()
            if bar is not None:
                bar.update(1)
        for job in jobs:
            if job.twin is not None:
                records[job.label].deviation.append(float((actions[job.label] - actions[job.twin]).abs().max()))
            if job.fast == "on" and job.base in actions:  # the same sampler on the plain path, same call
                records[job.label].deviation_eager.append(float((actions[job.label] - actions[job.base]).abs().max()))
    return records


def _as_float(value) -> float:
    import torch

    if torch.is_tensor(value):
        value = value.float().max()
    return float(value) if value is not None else float("nan")


def summarize_phase(phase: str, jobs: list[Job], batch: int, records: dict[str, Record]) -> list[dict]:
    """One row per job; ``speedup`` against the same-mode twin, ``speedup_vs_fastest_twin`` against the
    fastest mode of the twin (the honest figure)."""
    p50 = {job.label: stats(records[job.label].latency_ms)["p50"] for job in jobs}
    variants: dict[str, list[str]] = {}  # base label -> labels of its modes
    for job in jobs:
        variants.setdefault(job.base, []).append(job.label)
    rows = []
    for job in jobs:
        rec = records[job.label]
        latency = stats(rec.latency_ms)
        n = max(len(rec.latency_ms), 1)
        row = {"phase": phase, **job.describe(), "batch": batch, "window": job.window,
               "latency_ms": latency, "per_sample_ms_p50": latency["p50"] / batch,
               "rounds_mean": float(np.mean(rec.rounds)), "model_evals_mean": float(np.mean(rec.model_evals)),
               "converged_fraction": float(np.mean(rec.converged)), "speedup": None, "twin_p50_ms": None,
               "fastest_twin": None, "fastest_twin_p50_ms": None, "speedup_vs_fastest_twin": None,
               "deviation_vs_twin": None, "deviation_vs_eager": None,
               "fast_path_warmup_s": job.warmup_s if job.fast == "on" else None,
               "calls_per_bucket": {str(k): v / n for k, v in sorted(job.bucket_calls.items())} or None,
               "latencies_ms": [round(v, 4) for v in rec.latency_ms]}
        if job.twin is not None:
            row["twin_p50_ms"] = p50[job.twin]
            row["speedup"] = p50[job.twin] / latency["p50"]
            row["deviation_vs_twin"] = {"max": max(rec.deviation), "p50": float(np.median(rec.deviation))}
            fastest = min(variants.get(job.twin_base, [job.twin]), key=lambda lbl: p50[lbl])
            row["fastest_twin"], row["fastest_twin_p50_ms"] = fastest, p50[fastest]
            row["speedup_vs_fastest_twin"] = p50[fastest] / latency["p50"]
        if rec.deviation_eager:
            row["deviation_vs_eager"] = {"max": max(rec.deviation_eager), "p50": float(np.median(rec.deviation_eager))}
        rows.append(row)
    return rows


def headline(rows: list[dict]) -> list[dict]:
    """Per parallel sampler and batch: its fastest mode over its twin's fastest mode (the honest
    speedup), next to eager over eager."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["phase"], row["base_label"], row["batch"]), []).append(row)
    for (phase, base, batch), mine in groups.items():
        if mine[0]["twin"] is None:
            continue
        best = min(mine, key=lambda r: r["latency_ms"]["p50"])
        eager = next((r for r in mine if r["fast_path"] == "off"), None)
        out.append({"phase": phase, "sampler": base, "steps": best["steps"], "batch": batch,
                    "window": best["window"], "best": best["label"], "best_p50_ms": best["latency_ms"]["p50"],
                    "fastest_twin": best["fastest_twin"], "fastest_twin_p50_ms": best["fastest_twin_p50_ms"],
                    "speedup": best["speedup_vs_fastest_twin"],
                    "predicted_speedup": best.get("predicted_speedup_vs_fastest_twin"),
                    "eager_speedup": eager["speedup"] if eager else None})
    return out


def denoiser_networks(cfg: DictConfig, policy) -> list[tuple[str, Any]]:
    """(name, policy) pairs whose networks the denoiser sweep times: the checkpoint's, and the
    full-size one (random weights, same obs/action dims, horizon and normaliser)."""
    from parapolicy.policy import DiffusionPolicy, DiffusionPolicyConfig

    networks = [("checkpoint", policy)]
    if cfg.denoiser.full_size:
        full_cfg = DiffusionPolicyConfig.from_dict({
            **policy.config.to_dict(),
            "down_dims": [int(d) for d in cfg.denoiser.full_size_down_dims],
            "diffusion_step_embed_dim": int(cfg.denoiser.full_size_step_embed_dim)})
        import torch

        torch.manual_seed(int(cfg.seed))
        full = DiffusionPolicy(full_cfg, scheduler_config=policy.scheduler_config).to(policy.device).eval()
        full.normalizer.load_state_dict(policy.normalizer.state_dict())
        networks.append(("full_size", full))
    return networks


def time_denoiser(cfg: DictConfig, networks: list, obs_pool, device, fast_options: Optional[dict], notes: list,
                  bar=None, modes: tuple = ("off",)) -> list[dict]:
    """Bare ``denoise`` calls: K stacked timesteps x batch observation histories, per network
    (``denoiser_networks``) and fast-path mode, round-robin over K and modes (one bucket per K on
    the fast path, warmed up before timing)."""
    import torch

    from parapolicy.accel import FastPath

    dcfg = cfg.denoiser
    ks = sorted({int(k) for k in dcfg.k})
    if not ks or ks[0] < 1:
        raise ValueError(f"denoiser.k must hold positive integers, got {list(dcfg.k)}")
    rows_out = []
    for net_name, net in networks:
        pc = net.config
        n_params = sum(p.numel() for p in net.model.parameters())
        fast = FastPath(**{**(fast_options or {}), "buckets": ks}) if "on" in modes else None
        for batch in [int(b) for b in dcfg.batch_sizes]:
            ok = [k for k in ks if k * batch <= int(dcfg.max_rows)]
            if len(ok) < len(ks):
                notes.append(f"denoiser {net_name}: K {[k for k in ks if k not in ok]} at batch {batch} "
                             f"skipped (more than max_rows={dcfg.max_rows} rows)")
            if not ok:
                continue
            index = [i % obs_pool.shape[0] for i in range(batch)]
            cond = net.normalizer.obs.normalize(obs_pool[index].to(device)).flatten(1)
            plain = net.make_denoise_fn(cond)
            denoisers = {}
            for mode in modes:
                if mode == "on":
                    fast.prepare(net.model, cond, (pc.horizon, pc.action_dim), None)
                    denoisers[mode] = fast.wrap(plain, cond, net.model, None)
                else:
                    denoisers[mode] = plain
            gen = torch.Generator().manual_seed(int(cfg.seed))
            steps = net.noise_scheduler.config.num_train_timesteps
            inputs = {k: (torch.randn((k, batch, pc.horizon, pc.action_dim), generator=gen).to(device),
                          torch.randint(steps, (k,), generator=gen).to(device)) for k in ok}
            cases = [(mode, k) for mode in modes for k in ok]
            times: dict[tuple, list] = {case: [] for case in cases}
            for mode, k in cases:
                for _ in range(int(dcfg.warmup)):
                    denoisers[mode](*inputs[k])
            _sync(device)
            for r in range(int(dcfg.repetitions)):
                shift = r % len(cases)
                for mode, k in cases[shift:] + cases[:shift]:
                    _sync(device)
                    start = time.perf_counter()
                    denoisers[mode](*inputs[k])
                    _sync(device)
                    times[mode, k].append((time.perf_counter() - start) * 1e3)
                    if bar is not None:
                        bar.update(1)
            for mode in modes:
                base = stats(times[mode, ok[0]])["p50"] / ok[0]  # per-eval time at the smallest K
                for k in ok:
                    latency = stats(times[mode, k])
                    backend = None
                    if mode == "on" and device.type == "cpu":
                        backend = fast.stats.backends.get(f"K{k}xB{batch}")
                    rows_out.append({
                        "network": net_name, "down_dims": list(pc.down_dims), "num_parameters": n_params,
                        "fast_path": mode, "backend": backend,
                        "batch": batch, "k": k, "rows": k * batch, "latency_ms": latency,
                        "per_eval_ms": latency["p50"] / k,
                        # how many times faster than k separate calls at the smallest K: k evals for the price of 1
                        "throughput_gain": base * k / latency["p50"],
                        "latencies_ms": [round(v, 4) for v in times[mode, k]]})
    return rows_out


def _curve(den_rows: list[dict], mode: str, batch: int) -> dict[int, float]:
    return {r["k"]: r["latency_ms"]["p50"] for r in den_rows
            if r["network"] == "checkpoint" and r["fast_path"] == mode and r["batch"] == batch}


def interpolate(curve: dict[int, float], k: float) -> Optional[float]:
    """Per-call ms at (possibly fractional) K, linear between the measured K (and beyond the ends)."""
    if not curve:
        return None
    ks = sorted(curve)
    if len(ks) == 1:
        return curve[ks[0]]
    if k in curve:
        return curve[k]
    lo = max([x for x in ks if x <= k], default=ks[0])
    hi = min([x for x in ks if x > lo], default=None)
    if hi is None or k < lo:
        lo, hi = (ks[-2], ks[-1]) if k > ks[-1] else (ks[0], ks[1])
    return curve[lo] + (curve[hi] - curve[lo]) * (k - lo) / (hi - lo)


def predict_latency(row: dict, den_rows: list[dict]) -> Optional[float]:
    """The rounds x per-call-cost model of one sampler row, from the bare-denoiser curve of the same
    mode and batch: on the fast path, sum over buckets of (calls per predict_action) x (the bucket's
    per-call ms: a graph backend runs the whole bucket); on the plain path, rounds x the per-call ms at
    the mean K (model evaluations per sample / rounds). What it leaves out (the sampler's own tensor
    work, normalisation) is ``measured - predicted``."""
    curve = _curve(den_rows, row["fast_path"], row["batch"])
    if not curve:
        return None
    if row["fast_path"] == "on" and row.get("calls_per_bucket"):
        parts = [n * interpolate(curve, int(b)) for b, n in row["calls_per_bucket"].items()]
        return float(sum(parts))
    rounds = row["rounds_mean"]
    if not rounds:
        return None
    return float(rounds * interpolate(curve, row["model_evals_mean"] / rounds))


def add_predictions(result: dict) -> None:
    """``predicted_ms`` and ``unexplained_ms`` (measured p50 - predicted) per row, and the model's
    ``predicted_speedup_vs_fastest_twin``: a ratio of two predictions from one curve, so a load level
    that differs between the sampler and denoiser phases cancels out of it."""
    for phase in PHASES:
        for row in result[phase]:
            predicted = predict_latency(row, result["denoiser"])
            row["predicted_ms"] = predicted
            row["unexplained_ms"] = None if predicted is None else row["latency_ms"]["p50"] - predicted
        by_label = {(row["label"], row["batch"]): row for row in result[phase]}
        for row in result[phase]:
            twin = by_label.get((row.get("fastest_twin"), row["batch"]))
            ok = twin is not None and row["predicted_ms"] and twin["predicted_ms"] and twin["batch"] == row["batch"]
            row["predicted_speedup_vs_fastest_twin"] = twin["predicted_ms"] / row["predicted_ms"] if ok else None


# ------------------------------------------------------------------------------------------ report
def format_table(rows: list[dict]) -> str:
    header = (f"{'sampler':<24} {'steps':>5} {'batch':>5} {'rounds':>7} {'evals':>7} {'p50 ms':>9} "
              f"{'p95 ms':>9} {'model ms':>9} {'twin':<16} {'speedup':>8} {'vs best':>8} {'max dev':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lat = row["latency_ms"]
        speedup = f"{row['speedup']:.2f}x" if row["speedup"] is not None else "-"
        honest = f"{row['speedup_vs_fastest_twin']:.2f}x" if row.get("speedup_vs_fastest_twin") else "-"
        dev = f"{row['deviation_vs_twin']['max']:.1e}" if row["deviation_vs_twin"] else "-"
        model = f"{row['predicted_ms']:.1f}" if row.get("predicted_ms") is not None else "-"
        lines.append(f"{row['label']:<24} {row['steps']:>5} {row['batch']:>5} "
                     f"{row['rounds_mean']:>7.1f} {row['model_evals_mean']:>7.1f} {lat['p50']:>9.2f} "
                     f"{lat['p95']:>9.2f} {model:>9} {row['twin'] or '-':<16} {speedup:>8} {honest:>8} {dev:>8}")
    return "\n".join(lines)


def format_headline(items: list[dict]) -> str:
    lines = []
    for h in items:
        where = f"window {h['window']}, " if h["window"] is not None else ""
        eager = f"{h['eager_speedup']:.2f}x" if h["eager_speedup"] is not None else "-"
        model = f"{h['predicted_speedup']:.2f}x" if h.get("predicted_speedup") else "-"
        lines.append(f"{h['sampler']} ({where}batch {h['batch']}): {h['best']} {h['best_p50_ms']:.1f} ms vs fastest "
                     f"twin {h['fastest_twin']} {h['fastest_twin_p50_ms']:.1f} ms: {h['speedup']:.2f}x "
                     f"(eager vs eager {eager}; model {model})")
    return "\n".join(lines)


def format_denoiser_table(rows: list[dict]) -> str:
    header = (f"{'network':<11} {'params':>9} {'fast':>4} {'backend':>8} {'batch':>5} {'K':>4} {'rows':>5} "
              f"{'p50 ms':>9} {'ms/eval':>9} {'gain':>7}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['network']:<11} {row['num_parameters'] / 1e6:>8.1f}M {row['fast_path']:>4} "
                     f"{row['backend'] or '-':>8} {row['batch']:>5} {row['k']:>4} "
                     f"{row['rows']:>5} {row['latency_ms']['p50']:>9.3f} {row['per_eval_ms']:>9.3f} "
                     f"{row['throughput_gain']:>6.2f}x")
    return "\n".join(lines)


def _log2_ticks(ax, values) -> None:
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set_xticks(list(values), [str(v) for v in values])


def make_plots(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sampler_rows = result["samplers"]
    if sampler_rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in dict.fromkeys(r["label"] for r in sampler_rows):
            mine = sorted((r for r in sampler_rows if r["label"] == label), key=lambda r: r["batch"])
            ax.plot([r["batch"] for r in mine], [r["latency_ms"]["p50"] for r in mine], marker="o", label=label)
        ax.set(xlabel="batch (observation histories per call)", ylabel="p50 latency per call [ms]",
               title="latency vs batch", yscale="log")
        _log2_ticks(ax, sorted({r["batch"] for r in sampler_rows}))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "latency_vs_batch.png", dpi=110)
        plt.close(fig)
        written.append("latency_vs_batch.png")

    window_rows = [r for r in result["windows"] if r["window"] is not None]
    if window_rows:
        window_rows.sort(key=lambda r: r["window"])
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in dict.fromkeys((r["fast_path"], (r["options"] or {}).get("tolerance")) for r in window_rows):
            mine = [r for r in window_rows if (r["fast_path"], (r["options"] or {}).get("tolerance")) == key]
            ax.plot([r["window"] for r in mine], [r["latency_ms"]["p50"] for r in mine], marker="o",
                    label=f"{mine[0]['sampler']}{' fast' if key[0] == 'on' else ''} tol {key[1]} p50")
        twins = {r["label"]: r for r in result["windows"]}
        for label in dict.fromkeys(r["twin"] for r in window_rows if r["twin"]):
            ax.axhline(twins[label]["latency_ms"]["p50"], color="gray",
                       linestyle="--" if twins[label]["fast_path"] == "off" else ":", label=f"{label} p50")
        first = (window_rows[0]["fast_path"], (window_rows[0]["options"] or {}).get("tolerance"))
        window_rows = [r for r in window_rows if (r["fast_path"], (r["options"] or {}).get("tolerance")) == first]
        ax2 = ax.twinx()
        ax2.plot([r["window"] for r in window_rows], [r["rounds_mean"] for r in window_rows], color="tab:green",
                 marker="x", linestyle=":", label="rounds")
        ax2.set_ylabel("rounds (sequential model calls)")
        ax.set(xlabel="window p", ylabel="p50 latency per call [ms]", title="latency vs Picard window (batch 1)")
        _log2_ticks(ax, [r["window"] for r in window_rows])
        ax.grid(alpha=0.3)
        lines, labels = ax.get_legend_handles_labels()
        lines2, labels2 = ax2.get_legend_handles_labels()
        ax.legend(lines + lines2, labels + labels2, fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "latency_vs_window.png", dpi=110)
        plt.close(fig)
        written.append("latency_vs_window.png")

    den = result["denoiser"]
    if den:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in dict.fromkeys((r["network"], r["batch"], r["fast_path"]) for r in den):
            mine = sorted((r for r in den if (r["network"], r["batch"], r["fast_path"]) == key), key=lambda r: r["k"])
            ax.plot([r["k"] for r in mine], [r["latency_ms"]["p50"] for r in mine], marker="o",
                    linestyle="-" if key[2] == "off" else "--",
                    label=f"{key[0]} ({mine[0]['num_parameters'] / 1e6:.1f}M), batch {key[1]}"
                          f"{', fast path' if key[2] == 'on' else ''}")
        ax.set(xlabel="K (stacked timesteps per call)", ylabel="p50 latency per denoise call [ms]",
               title="denoiser cost vs K", yscale="log")
        _log2_ticks(ax, sorted({r["k"] for r in den}))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "denoiser_vs_k.png", dpi=110)
        plt.close(fig)
        written.append("denoiser_vs_k.png")
    return written


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------------ main
def resolve_fast_path(cfg: DictConfig, device) -> Optional[dict]:
    """FastPath options of the fast mode (None when no mode runs the fast path)."""
    options = OmegaConf.to_container(cfg.fast_path_options, resolve=True) if cfg.fast_path_options else {}
    if "on" not in fast_modes(cfg, device):
        if options:
            raise ValueError("fast_path_options need fast_path=on or both (auto uses them only on CUDA)")
        return None
    return options


def run_bench(cfg: DictConfig, out_dir: Path) -> dict:
    import torch
    from tqdm import tqdm

    from parapolicy.accel import FastPath
    from parapolicy.eval import pick_device, resolve_checkpoint
    from parapolicy.policy import load_policy
    from parapolicy.policy.checkpoint import git_commit

    started = time.perf_counter()
    for key in ("repetitions", "warmup"):
        if int(cfg[key]) < (1 if key == "repetitions" else 0):
            raise ValueError(f"{key} must be >= {1 if key == 'repetitions' else 0}, got {cfg[key]}")
    batch_sizes = [int(b) for b in cfg.batch_sizes]
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch_sizes must be a non-empty list of positive integers, got {list(cfg.batch_sizes)}")
    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    device = pick_device(str(cfg.device))
    checkpoint = resolve_checkpoint(str(cfg.checkpoint))
    notes: list[str] = []
    modes = tuple(fast_modes(cfg, device))
    fast_options = resolve_fast_path(cfg, device)

    policy = load_policy(str(checkpoint), device=str(device), fast_path="off")
    fast_policy = None
    if "on" in modes:
        fast_policy = copy.copy(policy)  # same network; one fast path shared by every fast job
        fast_policy.fast_path = FastPath(**fast_options)
    obs_pool, obs_source = load_observations(cfg, policy, notes)
    obs_pool = obs_pool.to(device)
    phases = build_jobs(cfg, policy, notes, modes, fast_policy)
    networks = denoiser_networks(cfg, policy) if cfg.denoiser.k else []

    with torch.inference_mode():
        n_calls = len(phases["samplers"]) * len(batch_sizes) * int(cfg.repetitions) \
            + len(phases["windows"]) * int(cfg.repetitions)
        bar = tqdm(total=n_calls, desc="bench", unit="call", disable=not cfg.progress_bar)
        result: dict[str, Any] = {"samplers": [], "windows": [], "denoiser": []}
        try:
            if phases["samplers"]:
                for batch in batch_sizes:
                    bar.set_postfix(phase="samplers", batch=batch)
                    records = time_phase(phases["samplers"], obs_pool, batch, cfg, device, bar)
                    result["samplers"] += summarize_phase("samplers", phases["samplers"], batch, records)
            if phases["windows"]:
                bar.set_postfix(phase="windows", batch=1)
                records = time_phase(phases["windows"], obs_pool, 1, cfg, device, bar)
                result["windows"] += summarize_phase("windows", phases["windows"], 1, records)
        finally:
            bar.close()
        if networks:
            result["denoiser"] = time_denoiser(cfg, networks, obs_pool, device, fast_options, notes, modes=modes)
    add_predictions(result)
    result["headline"] = headline(result["samplers"]) + headline(result["windows"])

    fast = fast_policy.fast_path if fast_policy is not None else None
    result["meta"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m parapolicy.bench", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "checkpoint": str(checkpoint),
        "env": str(cfg.env.name),
        "preset": cfg.get("preset_name"),
        "obs_source": obs_source,
        "n_obs": int(cfg.n_obs),
        "seed": int(cfg.seed),
        "repetitions": int(cfg.repetitions),
        "warmup": int(cfg.warmup),
        "batch_sizes": batch_sizes,
        "fast_path_modes": list(modes),
        "fast_path": None if fast is None else {**fast.options(), "stats": fast.stats.as_dict()},
        "jobs": {phase: [job.describe() for job in jobs] for phase, jobs in phases.items()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    result["notes"] = notes
    out_dir.mkdir(parents=True, exist_ok=True)
    result["meta"]["duration_s"] = time.perf_counter() - started
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2))
    result["plots"] = make_plots(result, out_dir) if cfg.plots else []

    meta = result["meta"]
    warm = "" if fast is None else f" (warm-up {fast.stats.as_dict()['warmup_s_total']:.1f} s, backends " \
        f"{', '.join(f'{k}: {v}' for k, v in fast.stats.backends.items())})"
    print(f"\n{meta['env']} checkpoint {checkpoint}, {meta['device_name']}, observations: {obs_source}, "
          f"fast path: {'/'.join(modes)}{warm}, {meta['repetitions']} timed calls each, "
          f"{meta['duration_s']:.0f} s in all")
    if result["headline"]:
        print("\nspeedup over the fastest sequential twin (p50 latency per call):")
        print(format_headline(result["headline"]))
    if result["samplers"]:
        print("\nsamplers (speedup: vs the twin in the same mode; vs best: vs the twin's fastest mode; model: "
              "rounds x per-call ms from the denoiser curve):")
        print(format_table(result["samplers"]))
    if result["windows"]:
        print("\nwindow sweep (batch 1):")
        print(format_table(result["windows"]))
    if result["denoiser"]:
        print("\nbare denoiser, K stacked timesteps per call (gain: K evals vs K calls at the smallest K):")
        print(format_denoiser_table(result["denoiser"]))
    for note in notes + ([] if fast is None else [f"fast path: {n}" for n in fast.stats.notes]):
        print(f"note: {note}")
    print(f"results: {out_dir}")
    return result


@hydra.main(version_base=None, config_path="pkg://parapolicy.conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(cfg.out) if cfg.out else Path(HydraConfig.get().runtime.output_dir)
    run_bench(cfg, out_dir)


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()
