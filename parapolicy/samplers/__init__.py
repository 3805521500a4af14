"""Samplers for Diffusion Policy: sequential diffusers solvers and their parallel (Picard) twins.

    sampler = make_sampler("paraddpm", checkpoint_scheduler_config, 100, window=16, tolerance=0.1)
    out = sampler.sample(denoise, x_T, generator=g)   # out.sample, out.rounds, out.model_evals, ...

See ``base.py`` for the conventions (shapes, noise) every sampler shares.
"""

from __future__ import annotations

from parapolicy.samplers.base import Denoiser, SampleOutput, Sampler
from parapolicy.samplers.ddim import DDIMSampler
from parapolicy.samplers.ddpm import DDPMSampler
from parapolicy.samplers.dpmsolver import DPMSolverSampler
from parapolicy.samplers.parataa import ParaTAADDIMSampler, ParaTAADDPMSampler, ParaTAASampler
from parapolicy.samplers.picard import ParaDDIMSampler, ParaDDPMSampler, ParaDPMSolverSampler, PicardSampler
from parapolicy.samplers.srds import SRDSDDIMSampler, SRDSDDPMSampler, SRDSSampler

SAMPLERS: dict[str, type[Sampler]] = {}


def register_sampler(cls: type[Sampler]) -> type[Sampler]:
    """Add a sampler class to ``SAMPLERS`` under ``cls.name`` (usable as a class decorator)."""
    if cls.name in SAMPLERS and SAMPLERS[cls.name] is not cls:
        raise ValueError(f"a sampler named {cls.name!r} is already registered: {SAMPLERS[cls.name].__name__}")
    SAMPLERS[cls.name] = cls
    return cls


for _cls in (DDPMSampler, DDIMSampler, DPMSolverSampler, ParaDDPMSampler, ParaDDIMSampler, ParaDPMSolverSampler):
    register_sampler(_cls)
for _cls in (SRDSDDPMSampler, SRDSDDIMSampler, ParaTAADDPMSampler, ParaTAADDIMSampler):
    register_sampler(_cls)


def make_sampler(name: str, scheduler_config, num_inference_steps: int, **options) -> Sampler:
    """Build sampler ``name`` from a diffusers scheduler config (e.g. a checkpoint's DDPMScheduler config).

    options: per sampler, see ``SAMPLERS[name].option_names()``, e.g. window / tolerance / max_rounds /
    deadline_ms for the parallel samplers, eta for DDIM, solver_order for DPM-Solver, and
    scheduler_kwargs (config overrides) for all. Raises ValueError on an unknown name or option or a
    bad value.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(sorted(SAMPLERS))}")
    cls = SAMPLERS[name]
    accepted = cls.option_names()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"sampler {name!r} does not take option(s) {unknown}; it takes {accepted}")
    return cls(scheduler_config, num_inference_steps, **options)


__all__ = [
    "SAMPLERS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSampler",
    "Denoiser",
    "ParaDDIMSampler",
    "ParaDDPMSampler",
    "ParaDPMSolverSampler",
    "ParaTAADDIMSampler",
    "ParaTAADDPMSampler",
    "ParaTAASampler",
    "PicardSampler",
    "SRDSDDIMSampler",
    "SRDSDDPMSampler",
    "SRDSSampler",
    "SampleOutput",
    "Sampler",
    "make_sampler",
    "register_sampler",
]
