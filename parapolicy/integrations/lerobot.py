"""Accelerate a LeRobot ``DiffusionPolicy`` in place: its own U-Net, its own scheduler, a parallel sampler.

    from parapolicy.integrations.lerobot import accelerate, restore
    accelerate(policy, sampler="paraddpm", window=16, tolerance=0.1)   # policy: lerobot DiffusionPolicy
    action = policy.select_action(batch)                               # unchanged API, queues, processors
    policy.last_info        # {"sampler", "rounds", "model_evals", "converged", "num_inference_steps"}
    restore(policy)         # back to LeRobot's own loop

Only ``DiffusionModel.conditional_sample(batch_size, global_cond=None, generator=None, noise=None)`` is
replaced, on that instance. The replacement reads what LeRobot's loop reads: ``self.unet(x, t[B],
global_cond=...)``, ``self.noise_scheduler`` (its diffusers config; DDPM -> the ddpm family of samplers,
DDIM -> the ddim family), ``self.num_inference_steps``, ``self.config.horizon`` and
``self.config.action_feature.shape``. The K trajectory points a parallel sampler evaluates at once are
stacked into the U-Net's batch (row k * B + b has timestep t[k]). Randomness follows the stock loop:
x_T is ``noise`` or one ``torch.randn`` from ``generator`` (same shape, dtype, device), then one draw per
step whose timestep is > 0 (where diffusers' ``DDPMScheduler.step`` draws; DDIM with eta 0 draws none),
so ``sampler="ddpm"`` reproduces LeRobot's own loop for the same generator state.

Duck-typed: lerobot is never imported (it pins torch and Python versions this package does not).
A compiled U-Net (``compile_model=True``) recompiles once per stacked batch size.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch

_PATCH_FLAG = "_parapolicy_accelerated"
_FAMILIES = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}
_PREFIX_ATTR = "_parapolicy_prefix"  # (values [B, L, A], weights [B, L]) for the next conditional_sample


def find_diffusion_model(policy: Any) -> Any:
    """The object whose ``conditional_sample`` runs the loop: ``policy.diffusion`` (a LeRobot
    ``DiffusionPolicy``) or ``policy`` itself (a ``DiffusionModel``)."""
    candidates = [getattr(policy, "diffusion", None), policy]
    for model in candidates:
        if model is not None and all(hasattr(model, a) for a in ("conditional_sample", "unet", "noise_scheduler")):
            return model
    missing = [a for a in ("conditional_sample", "unet", "noise_scheduler") if not hasattr(policy, a)]
    raise ValueError(
        f"{type(policy).__name__} is neither a LeRobot DiffusionPolicy (no .diffusion) nor a DiffusionModel "
        f"(missing {missing})")


def scheduler_family(scheduler: Any) -> str:
    """``"ddpm"`` or ``"ddim"`` from a diffusers scheduler object (its class name / config ``_class_name``)."""
    name = type(scheduler).__name__
    if name not in _FAMILIES:
        name = str(getattr(scheduler, "config", {}).get("_class_name", name))
    if name not in _FAMILIES:
        raise ValueError(f"noise scheduler {name} is not supported; LeRobot's DDPMScheduler / DDIMScheduler are")
    return _FAMILIES[name]


def sampler_for_family(sampler: str, family: str) -> str:
    """Map a sampler name onto the scheduler's family: ``paraddpm`` on a DDIM policy -> ``paraddim``."""
    from parapolicy.samplers import SAMPLERS

    for suffix in ("ddpm", "ddim"):
        if sampler.endswith(suffix):
            name = sampler[: -len(suffix)] + family
            if name in SAMPLERS:
                return name
    raise ValueError(
        f"sampler {sampler!r} has no {family} variant; use one of "
        f"{sorted(n for n in SAMPLERS if n.endswith(('ddpm', 'ddim')))}")


def _public(config: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _stock_noise_draws(timesteps: torch.Tensor, shape: tuple[int, ...], generator, device, dtype) -> torch.Tensor:
    """``[N, *shape]``: one Gaussian per step with t > 0, drawn in step order as diffusers'
    ``randn_tensor`` draws them in ``DDPMScheduler.step`` (on the generator's CPU device when it differs)."""
    rand_device = device
    if generator is not None and generator.device.type != torch.device(device).type:
        rand_device = generator.device
    noise = torch.zeros((len(timesteps), *shape), device=device, dtype=dtype)
    for i, t in enumerate(timesteps.tolist()):
        if t > 0:
            noise[i] = torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)
    return noise


def make_unet_denoiser(unet: Callable, global_cond: torch.Tensor | None, batch: int) -> Callable:
    """``denoise(x [K, B, H, A], t [K]) -> [K, B, H, A]`` over LeRobot's ``unet(x, t[B], global_cond=...)``."""
    cache: dict[int, torch.Tensor | None] = {}

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        k = x.shape[0]
        if k not in cache:
            cache[k] = None if global_cond is None else global_cond.repeat(k, *([1] * (global_cond.ndim - 1)))
        t = torch.as_tensor(t, device=x.device).reshape(-1).to(torch.long)
        if t.numel() == 1 and k > 1:
            t = t.expand(k)
        out = unet(x.reshape(k * batch, *x.shape[2:]), t.repeat_interleave(batch), global_cond=cache[k])
        return out.reshape(x.shape)

    return denoise


def _sample_fn(name: str, scheduler_config: dict, options: dict, built: dict[int, Any], info_attr: str,
               targets: Callable[[Any], list]) -> Callable:
    """The replacement ``conditional_sample(self, batch_size, global_cond=None, generator=None, noise=None)``:
    sampler ``name`` (built once per ``num_inference_steps`` into ``built``) over the model's own U-Net.
    A prefix set by ``rtc_chunk`` on the model (``_PREFIX_ATTR``) is imposed (``PrefixConstraint``)."""
    from parapolicy.samplers import make_sampler
    from parapolicy.samplers.constraints import PrefixConstraint

    def conditional_sample(self, batch_size: int, global_cond=None, generator=None, noise=None) -> torch.Tensor:
        param = next(iter(self.parameters()))
        device, dtype = param.device, param.dtype
        shape = (batch_size, self.config.horizon, self.config.action_feature.shape[0])
        x_T = noise if noise is not None else torch.randn(size=shape, dtype=dtype, device=device, generator=generator)
        steps = int(self.num_inference_steps)
        if steps not in built:
            built[steps] = make_sampler(name, scheduler_config, steps, **options)
        solver = built[steps]
        step_noise = None
        if solver.is_stochastic:
            step_noise = _stock_noise_draws(solver.timesteps, tuple(x_T.shape), generator, x_T.device, x_T.dtype)
        denoise = make_unet_denoiser(self.unet, global_cond, x_T.shape[0])
        constraint = None
        prefix = self.__dict__.get(_PREFIX_ATTR)
        if prefix is not None:
            values, weights = prefix
            eta = torch.randn(values.shape, dtype=x_T.dtype, device=x_T.device, generator=generator)  # one per call
            constraint = PrefixConstraint(values.to(x_T), weights.to(x_T), eta, self.noise_scheduler.alphas_cumprod)
            denoise = constraint.wrap(denoise)
        out = solver.sample(denoise, x_T, noise=step_noise)
        sample = out.sample if constraint is None else constraint.finish(out.sample)
        info = {"sampler": name, "num_inference_steps": steps, "rounds": out.rounds,
                "model_evals": out.model_evals, "converged": bool(out.converged)}
        for target in targets(self):
            object.__setattr__(target, info_attr, info)
        return sample.to(x_T.dtype)

    return conditional_sample


def accelerate(policy: Any, sampler: str = "paraddpm", *, info_attr: str = "last_info", **options: Any) -> Any:
    """Replace ``conditional_sample`` of ``policy`` (LeRobot ``DiffusionPolicy`` or ``DiffusionModel``) with
    parapolicy sampler ``sampler`` (mapped onto the scheduler's family); ``options`` go to ``make_sampler``
    (``window``, ``tolerance``, ``max_rounds``, ``deadline_ms``, ...). The last call's rounds / model_evals /
    converged land in ``policy.<info_attr>`` (and on the DiffusionModel). Returns ``policy``.
    Calling it again swaps the sampler; ``restore(policy)`` puts LeRobot's loop back.
    """
    from parapolicy.samplers import make_sampler

    model = find_diffusion_model(policy)
    if getattr(model, _PATCH_FLAG, None) is not None:
        restore(policy)
    family = scheduler_family(model.noise_scheduler)
    name = sampler_for_family(sampler, family)
    scheduler_config = _public(model.noise_scheduler.config)
    make_sampler(name, scheduler_config, int(model.num_inference_steps), **options)  # fail here on a bad option
    targets = [policy] if policy is model else [policy, model]
    conditional_sample = _sample_fn(name, scheduler_config, options, {}, info_attr, lambda _: targets)

    previous = model.__dict__.get("conditional_sample")  # an instance-level override someone set before us
    object.__setattr__(model, _PATCH_FLAG, {"previous": previous, "sampler": name, "info_attr": info_attr})
    object.__setattr__(model, "conditional_sample", types.MethodType(conditional_sample, model))
    return policy


def restore(policy: Any) -> Any:
    """Undo ``accelerate``: the instance gets its class's ``conditional_sample`` (or what it had) back."""
    model = find_diffusion_model(policy)
    state = model.__dict__.pop(_PATCH_FLAG, None)
    if state is None:
        raise ValueError(f"{type(policy).__name__} is not accelerated (accelerate() was not called on it)")
    model.__dict__.pop("conditional_sample", None)
    if state["previous"] is not None:
        object.__setattr__(model, "conditional_sample", state["previous"])
    return policy


def is_accelerated(policy: Any) -> bool:
    return getattr(find_diffusion_model(policy), _PATCH_FLAG, None) is not None


# ------------------------------------------------------------------ class-level: every DiffusionPolicy
# The LeRobot plugin (lerobot_plugin/, distribution ``lerobot_policy_parapolicy``) acts on the classes, not on
# an instance: LeRobot commands build their policies themselves, some through a ``get_policy_class`` they bound
# before plugins load, so only the class itself reaches all of them.

_CLASS_FLAG = "_parapolicy_installed"  # on the policy class: {"originals": ..., "sampler": ..., "options": ...}
_SESSION_ATTR = "_parapolicy_session"  # on a DiffusionModel instance: its sampler, built on first use
_HISTORY_ATTR = "_parapolicy_rtc_history"  # on a DiffusionPolicy instance: the RTC engine's frames
SAMPLER_CHOICES = ("paraddpm", "paraddim", "srds", "parataa", "ddpm", "ddim", "off")
_ALIASES = {"srds": "parasrdsddpm", "parataa": "parataaddpm"}  # family-less names, mapped like paraddpm


def settings_from_env(environ: Any = None) -> tuple[str | None, dict[str, Any]]:
    """``(sampler, options)`` from ``PARAPOLICY_SAMPLER`` (one of ``SAMPLER_CHOICES``, default paraddpm;
    ``off``: None), ``PARAPOLICY_WINDOW`` (int), ``PARAPOLICY_TOLERANCE`` (float) and
    ``PARAPOLICY_MAX_ROUNDS`` (int). Raises ValueError naming the variable on a bad value."""
    import os

    env = os.environ if environ is None else environ
    sampler = env.get("PARAPOLICY_SAMPLER", "paraddpm").strip().lower() or "paraddpm"
    if sampler not in SAMPLER_CHOICES:
        raise ValueError(f"PARAPOLICY_SAMPLER={sampler!r}: use one of {', '.join(SAMPLER_CHOICES)}")
    if sampler == "off":
        return None, {}
    options: dict[str, Any] = {}
    for var, key, kind in (("PARAPOLICY_WINDOW", "window", int), ("PARAPOLICY_TOLERANCE", "tolerance", float),
                           ("PARAPOLICY_MAX_ROUNDS", "max_rounds", int)):
        raw = env.get(var, "").strip()
        if not raw:
            continue
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value > 0:
            raise ValueError(f"{var}={raw!r} must be > 0")
        options[key] = value
    if sampler in ("ddpm", "ddim") and options:
        raise ValueError(f"PARAPOLICY_SAMPLER={sampler} is sequential: it takes no {sorted(options)}")
    return _ALIASES.get(sampler, sampler), options


def install(policy_class: type, sampler: str = "paraddpm", model_class: type | None = None, **options: Any) -> str:
    """Accelerate every instance of LeRobot's ``DiffusionPolicy`` (``policy_class``), also those already built.

    - ``model_class.conditional_sample`` (``DiffusionModel``, found in ``policy_class``'s module unless given)
      runs parapolicy sampler ``sampler`` (mapped onto each model's scheduler family; ``options`` as for
      ``accelerate``) on models in eval mode. A model in training mode runs LeRobot's own loop, and
      ``compute_loss`` / ``forward`` are not touched, so training is never changed.
    - ``policy_class.predict_action_chunk`` also takes LeRobot's RTC arguments (``inference_delay``,
      ``prev_chunk_left_over``; see ``rtc_chunk``), and ``supports_rtc()`` answers True; a call without them
      is LeRobot's own. ``reset()`` also forgets the RTC observation history.
    Returns one line saying what was swapped (the plugin logs it). ``uninstall`` puts the originals back.
    """
    from parapolicy.samplers import SAMPLERS

    if model_class is None:
        import sys

        model_class = getattr(sys.modules[policy_class.__module__], "DiffusionModel", None)
        if model_class is None:
            raise ValueError(f"no DiffusionModel class next to {policy_class.__module__}.{policy_class.__name__}")
    if policy_class.__dict__.get(_CLASS_FLAG) is not None:
        uninstall(policy_class)
    for family in ("ddpm", "ddim"):  # a bad name or option fails here, not in the middle of a rollout
        name = sampler_for_family(sampler, family)
        unknown = sorted(set(options) - set(SAMPLERS[name].option_names()))
        if unknown:
            raise ValueError(f"sampler {name!r} does not take option(s) {unknown}")
    originals = {
        "conditional_sample": model_class.__dict__["conditional_sample"],
        "predict_action_chunk": policy_class.__dict__["predict_action_chunk"],
        "reset": policy_class.__dict__["reset"],
        "supports_rtc": policy_class.__dict__.get("supports_rtc"),
        "model_class": model_class,
    }
    stock_sample, stock_predict, stock_reset = (originals[k] for k in ("conditional_sample", "predict_action_chunk", "reset"))
    options = dict(options)
    generation = object()  # a model's sampler built under an earlier install() is rebuilt

    def conditional_sample(self, batch_size: int, global_cond=None, generator=None, noise=None):
        if self.training:
            return stock_sample(self, batch_size, global_cond=global_cond, generator=generator, noise=noise)
        built, session = self.__dict__.get(_SESSION_ATTR, (None, None))
        if built is not generation:
            name = sampler_for_family(sampler, scheduler_family(self.noise_scheduler))
            fn = _sample_fn(name, _public(self.noise_scheduler.config), options, {}, "last_info", lambda m: [m])
            session = types.MethodType(fn, self)
            object.__setattr__(self, _SESSION_ATTR, (generation, session))
        return session(batch_size, global_cond=global_cond, generator=generator, noise=noise)

    def predict_action_chunk(self, batch, noise=None, inference_delay=None, prev_chunk_left_over=None, **kwargs):
        if inference_delay is None and prev_chunk_left_over is None:
            return stock_predict(self, batch, noise=noise, **kwargs)
        return rtc_chunk(self, batch, inference_delay, prev_chunk_left_over, noise=noise)

    def reset(self, *args, **kwargs):
        self.__dict__.pop(_HISTORY_ATTR, None)
        return stock_reset(self, *args, **kwargs)

    def supports_rtc(self) -> bool:
        return True

    for fn, like in ((conditional_sample, stock_sample), (predict_action_chunk, stock_predict), (reset, stock_reset)):
        fn.__doc__, fn.__wrapped_by_parapolicy__ = like.__doc__, like
    model_class.conditional_sample = conditional_sample
    policy_class.predict_action_chunk = predict_action_chunk
    policy_class.reset = reset
    policy_class.supports_rtc = supports_rtc
    setattr(policy_class, _CLASS_FLAG, {"originals": originals, "sampler": sampler, "options": options})
    knobs = ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "defaults"
    return (f"parapolicy: {model_class.__module__}.{model_class.__name__}.conditional_sample -> {sampler} "
            f"({knobs}; DDIM models get the ddim variant; training mode keeps LeRobot's loop); "
            f"{policy_class.__name__}.predict_action_chunk takes RTC's inference_delay / prev_chunk_left_over")


def uninstall(policy_class: type) -> None:
    """Undo ``install``: the classes get LeRobot's methods back; models forget their built samplers."""
    state = policy_class.__dict__.get(_CLASS_FLAG)
    if state is None:
        raise ValueError(f"{policy_class.__name__} is not installed (install() was not called on it)")
    originals = state["originals"]
    model_class = originals["model_class"]
    model_class.conditional_sample = originals["conditional_sample"]
    policy_class.predict_action_chunk = originals["predict_action_chunk"]
    policy_class.reset = originals["reset"]
    if originals["supports_rtc"] is None:
        del policy_class.supports_rtc
    else:
        policy_class.supports_rtc = originals["supports_rtc"]
    delattr(policy_class, _CLASS_FLAG)


def installed(policy_class: type) -> dict[str, Any] | None:
    """``{"sampler", "options"}`` when ``install`` acted on ``policy_class``, else None."""
    state = policy_class.__dict__.get(_CLASS_FLAG)
    return None if state is None else {"sampler": state["sampler"], "options": dict(state["options"])}


# ------------------------------------------------------------------ real-time chunking (lerobot-rollout)
def rtc_prefix(prev_chunk_left_over: torch.Tensor | None, inference_delay: int | None, batch: int,
               n_obs_steps: int, chunk_length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """LeRobot's RTC arguments -> the prefix over the U-Net's horizon, or None when nothing is known.

    ``prev_chunk_left_over`` ``[T, A]`` or ``[B, T, A]``: the previous chunk's actions not yet executed, in the
    policy's normalised units, zero-padded to the execution horizon; row i is the action at the new chunk's
    position i. ``inference_delay`` d: the robot executes rows 0 .. d-1 while this chunk is planned, so they are
    known exactly. LeRobot's chunk is the horizon's slice from ``n_obs_steps - 1``, so the prefix covers
    horizon positions ``[0, n_obs_steps - 1 + d)``: weight 0 (the model's own values) before the chunk's
    start, weight 1 on the d executed actions. Returns ``(values [B, L, A], weights [B, L])``.
    """
    if prev_chunk_left_over is None or inference_delay is None:
        return None
    prev = torch.as_tensor(prev_chunk_left_over)
    if prev.ndim == 2:
        prev = prev.unsqueeze(0).expand(batch, -1, -1)
    if prev.ndim != 3 or prev.shape[0] != batch:
        raise ValueError(f"prev_chunk_left_over must be [T, A] or [B={batch}, T, A], got {list(prev.shape)}")
    delay = int(inference_delay)
    if delay < 0:
        raise ValueError(f"inference_delay must be >= 0, got {delay}")
    delay = min(delay, prev.shape[1], chunk_length)
    if delay == 0:
        return None
    start = n_obs_steps - 1
    values = torch.zeros((batch, start + delay, prev.shape[2]), dtype=prev.dtype, device=prev.device)
    values[:, start:] = prev[:, :delay]
    weights = torch.zeros((batch, start + delay), dtype=prev.dtype, device=prev.device)
    weights[:, start:] = 1.0
    return values, weights


def stack_history(policy: Any, frame: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add one frame to ``policy``'s own RTC history (a ``FrameHistory``, forgotten by ``reset()``) ->
    ``generate_actions``'s batch ``[B, n_obs_steps, ...]`` (see ``lerobot_async.FrameHistory``)."""
    from parapolicy.integrations.lerobot_async import FrameHistory

    history = policy.__dict__.get(_HISTORY_ATTR)
    if history is None:
        history = FrameHistory(policy.config)
        object.__setattr__(policy, _HISTORY_ATTR, history)
    return history.push(frame)


@torch.no_grad()
def rtc_chunk(policy: Any, frame: dict[str, torch.Tensor], inference_delay: int | None,
              prev_chunk_left_over: torch.Tensor | None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One RTC call of ``predict_action_chunk``: ``frame`` (one preprocessed observation) joins the policy's own
    history, and the chunk ``[B, n_action_steps, A]`` (normalised) is sampled with the executed prefix
    (``rtc_prefix``) imposed by ``PrefixConstraint`` at every model evaluation: a fixed map of the point and its
    timestep, so Picard, SRDS and ParaTAA converge to what the sequential sampler gives with the same prefix."""
    model = find_diffusion_model(policy)
    batch = stack_history(policy, frame)
    config = policy.config
    b = next(iter(batch.values())).shape[0]
    prefix = rtc_prefix(prev_chunk_left_over, inference_delay, b, int(config.n_obs_steps), int(config.n_action_steps))
    if prefix is not None:
        device = next(iter(model.parameters())).device
        object.__setattr__(model, _PREFIX_ATTR, tuple(p.to(device) for p in prefix))
    try:
        return model.generate_actions(batch, noise=noise)
    finally:
        model.__dict__.pop(_PREFIX_ATTR, None)
