"""Import Diffusion Policy's transformer policies ("DP-T"): ``DiffusionTransformerLowdimPolicy`` (the hybrid
image one, ``DiffusionTransformerHybridImagePolicy``, is refused by name for now).

Their network is ``TransformerForDiffusion``; parapolicy's :class:`~parapolicy.policy.transformer.
TransformerForDiffusion` has the same state-dict names, so the weights load as they are (DP's empty
``_dummy_variable`` parameter is dropped). Sizes come from the weights (``input_emb``, ``pos_emb``,
``cond_obs_emb``, the layer counts; ``time_as_cond`` from ``cond_pos_emb``, ``causal_attn`` from the
``mask`` buffer, which must be DP's mask), the head count from ``policy.model.n_head`` (``policy.n_head``
for the hybrid policy): the only size the weights do not fix.

Both DP-T policies execute from ``n_obs_steps - 1`` (no ``oa_step_convention`` option). Supported:
``obs_as_cond`` true (observation tokens) and false (observations in-painted into the sampled
sequence: the network's input is ``action_dim + obs_dim`` wide), ``pred_action_steps_only``,
``n_cond_layers`` 0 (MLP) and > 0 (encoder), ``time_as_cond`` false (encoder only), DDPM / DDIM as for
the U-Net. Refused by name: a policy/model ``obs_as_cond`` mismatch, ``pred_action_steps_only`` with a
causal mask longer than the planned steps (DP itself cannot sample that), unknown policy options
(DP passes them to ``scheduler.step``), and absolute actions outside robomimic's one-arm tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from parapolicy.importers.diffusion_policy import (
    FORMAT,
    DPCheckpoint,
    UnsupportedCheckpointError,
    _affine,
    _excerpt,
    _int,
    _our_env,
    dp_affine_to_minmax,
    load_network_weights,
    read_action_space,
    read_scheduler,
)
from parapolicy.policy.configuration import DiffusionPolicyConfig
from parapolicy.policy.transformer import DP_BUFFERS

LOWDIM_TRANSFORMER_POLICY = "DiffusionTransformerLowdimPolicy"
HYBRID_TRANSFORMER_POLICY = "DiffusionTransformerHybridImagePolicy"
TRANSFORMER_POLICIES = (LOWDIM_TRANSFORMER_POLICY, HYBRID_TRANSFORMER_POLICY)
_LOWDIM_POLICY_KEYS = {
    "_target_", "model", "noise_scheduler", "horizon", "obs_dim", "action_dim", "n_action_steps", "n_obs_steps",
    "num_inference_steps", "obs_as_cond", "pred_action_steps_only",
}


def policy_name(ckpt: DPCheckpoint) -> str:
    return str(ckpt.get("policy._target_", "") or "").rsplit(".", 1)[-1]


def is_transformer_checkpoint(ckpt: DPCheckpoint, sd: Mapping[str, torch.Tensor]) -> bool:
    """A DP-T workspace: named so, or carrying TransformerForDiffusion weights."""
    return "transformer" in policy_name(ckpt).lower() or any(
        k.startswith(("model.decoder.layers.", "model.encoder.layers.", "model.input_emb.")) for k in sd)


def _shape(sd: Mapping[str, torch.Tensor], key: str, what: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"{what}: missing weight {key}")
    return tuple(sd[key].shape)


def _layers(sd: Mapping[str, torch.Tensor], prefix: str, what: str) -> int:
    found = sorted({int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)})
    if found != list(range(len(found))):
        raise ValueError(f"{what}: {prefix}* layers {found} are not contiguous")
    return len(found)


def transformer_from_weights(ckpt: DPCheckpoint, sd: Mapping[str, torch.Tensor], what: str,
                             n_head_key: str) -> dict[str, Any]:
    """The TransformerForDiffusion options and sizes in ``sd`` (``model.*``): ``network`` (our config's
    entry), ``input_dim``, ``output_dim``, ``cond_dim`` and ``cond_tokens``."""
    n_emb, input_dim = _shape(sd, "model.input_emb.weight", what)
    output_dim = _shape(sd, "model.head.weight", what)[0]
    tokens = _shape(sd, "model.pos_emb", what)[1]
    time_as_cond = "model.cond_pos_emb" in sd
    cond_dim = _shape(sd, "model.cond_obs_emb.weight", what)[1] if "model.cond_obs_emb.weight" in sd else 0
    cond_tokens = _shape(sd, "model.cond_pos_emb", what)[1] if time_as_cond else 0
    if time_as_cond:
        n_layer = _layers(sd, "model.decoder.layers.", what)
        n_cond_layers = _layers(sd, "model.encoder.layers.", what)
        if not n_cond_layers and "model.encoder.0.weight" not in sd:
            raise ValueError(f"{what}: neither a condition encoder (model.encoder.layers.*) nor its MLP (model.encoder.0.*)")
    else:
        n_layer, n_cond_layers = _layers(sd, "model.encoder.layers.", what), 0
        if any(k.startswith("model.decoder.") for k in sd):
            raise ValueError(f"{what}: decoder weights without cond_pos_emb (time_as_cond=False has no decoder)")
    if n_layer < 1:
        raise ValueError(f"{what}: no transformer layers (model.decoder.layers.* / model.encoder.layers.*)")
    n_head = ckpt.get(n_head_key)
    n_head = _int(n_head, n_head_key, what)
    if n_head < 1 or n_emb % n_head:
        raise ValueError(f"{what}: {n_head_key}={n_head} does not divide n_emb={n_emb}")
    horizon = tokens - (0 if time_as_cond else 1)
    causal = "model.mask" in sd
    if "model.memory_mask" in sd and not (causal and cond_dim):
        raise ValueError(f"{what}: a memory_mask without causal attention over observation tokens")
    model_cfg = ckpt.get("policy.model") if isinstance(ckpt.get("policy.model"), Mapping) else {}
    if model_cfg.get("causal_attn") is not None and model_cfg.get("causal_attn") is not causal:
        raise ValueError(f"{what}: policy.model.causal_attn={model_cfg.get('causal_attn')} but the weights "
                         f"{'carry' if causal else 'lack'} DP's causal mask")
    drops = {k: float(v) for k, v in ((k, ckpt.get(f"{n_head_key.rsplit('.', 1)[0]}.{k}")) for k in ("p_drop_emb", "p_drop_attn"))
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    network = dict({"class": "TransformerForDiffusion", "n_layer": n_layer, "n_head": n_head, "n_emb": n_emb,
                    "causal_attn": causal, "time_as_cond": time_as_cond, "obs_as_cond": cond_dim > 0,
                    "n_cond_layers": n_cond_layers, "horizon": horizon}, **drops)
    return dict(network=network, input_dim=input_dim, output_dim=output_dim, cond_dim=cond_dim, cond_tokens=cond_tokens)


def _check_obs_as_cond(ckpt: DPCheckpoint, net: Mapping[str, Any], what: str) -> None:
    said = ckpt.get("policy.obs_as_cond", ckpt.get("obs_as_cond"))
    has = net["network"]["obs_as_cond"]
    if isinstance(said, bool) and said != has:
        # DP's network derives obs_as_cond from cond_dim > 0 and ignores the argument; a policy that disagrees
        # with its network feeds the observations twice or never
        raise UnsupportedCheckpointError(
            f"{what}: policy.obs_as_cond={said} but the network has {'' if has else 'no '}observation tokens "
            f"(cond_dim={net['cond_dim']}); DP would {'in-paint and condition at once' if has else 'drop the observations'}")


def _temporal(ckpt: DPCheckpoint, net: Mapping[str, Any], what: str) -> dict[str, Any]:
    """horizon / steps / latency of our config for a DP-T policy (see module docstring)."""
    get = ckpt.get
    n_obs_steps = _int(get("policy.n_obs_steps", get("n_obs_steps")), "n_obs_steps", what)
    horizon = _int(get("policy.horizon", get("horizon")), "horizon", what)
    latency = _int(get("n_latency_steps", 0) or 0, "n_latency_steps", what)
    # the policy plans policy.n_action_steps from n_obs_steps - 1 (or, pred_action_steps_only, exactly those);
    # DP's runner drops the first n_latency_steps of them
    policy_n_action = _int(get("policy.n_action_steps", get("n_action_steps")), "policy.n_action_steps", what)
    n_action = policy_n_action - latency
    if n_action < 1:
        raise ValueError(f"{what}: policy.n_action_steps={policy_n_action} leaves nothing after n_latency_steps={latency}")
    network = net["network"]
    if network["horizon"] != horizon:
        raise ValueError(f"{what}: pos_emb holds {network['horizon']} action tokens, the config's horizon is {horizon}")
    if net["cond_dim"] and net["cond_tokens"] != 1 + n_obs_steps:
        raise ValueError(f"{what}: cond_pos_emb holds {net['cond_tokens']} tokens, expected 1 + n_obs_steps = {1 + n_obs_steps}")
    only = get("policy.pred_action_steps_only", get("pred_action_steps_only", False))
    if not isinstance(only, bool):
        raise ValueError(f"{what}: pred_action_steps_only={only!r} is not true / false")
    if only:
        if not network["obs_as_cond"]:
            raise UnsupportedCheckpointError(f"{what}: pred_action_steps_only without obs_as_cond (DP asserts against it)")
        if network["causal_attn"] and horizon != policy_n_action:
            raise UnsupportedCheckpointError(
                f"{what}: pred_action_steps_only with causal attention over {horizon} tokens but {policy_n_action} "
                f"planned steps: DP's own predict_action cannot run it (its mask is {horizon} x {horizon})")
        horizon = policy_n_action
    elif n_obs_steps - 1 + policy_n_action > horizon:
        raise ValueError(f"{what}: horizon {horizon} too short to execute {policy_n_action} actions from step {n_obs_steps - 1}")
    return dict(horizon=horizon, n_obs_steps=n_obs_steps, n_action_steps=n_action, n_latency_steps=latency,
                oa_step_convention=True, pred_action_steps_only=only)


def _load_transformer(policy: Any, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """``model.*`` into ``policy.model``: every key and shape checked, DP's masks must be ours exactly."""
    state = {k[len("model."):]: v for k, v in sd.items()
             if k.startswith("model.") and not (k == "model._dummy_variable" and v.numel() == 0)}
    for key in DP_BUFFERS:  # DP saves its causal masks; ours are rebuilt from the options: they must agree
        ours, theirs = getattr(policy.model, key), state.pop(key, None)
        if (ours is None) != (theirs is None):
            raise UnsupportedCheckpointError(f"{what}: model.{key} is {'missing' if theirs is None else 'unexpected'} "
                                             f"for causal_attn={policy.config.network['causal_attn']}")
        if ours is not None and (theirs.shape != ours.shape or not torch.equal(theirs.float(), ours)):
            raise UnsupportedCheckpointError(f"{what}: model.{key} is not Diffusion Policy's causal mask")
    load_network_weights(policy, state, what, "transformer", "TransformerForDiffusion")


def _provenance(ckpt: DPCheckpoint, source: Path, weights_key: str, policy_class: str, **extra: Any) -> dict[str, Any]:
    excerpt_keys = ("name", "_target_", "task_name", "horizon", "n_obs_steps", "n_action_steps", "n_latency_steps",
                    "obs_as_cond", "pred_action_steps_only", "policy", "training.use_ema", "training.seed")
    excerpt = {k: _excerpt(ckpt.get(k) if "." in k else ckpt.cfg.get(k)) for k in excerpt_keys}
    return {
        "converted_from": {
            "format": FORMAT, "source": source.name, "sha256": ckpt.sha256, "weights": weights_key,
            "policy_class": policy_class, **extra,
            **{k: v for k, v in ckpt.pickles.items() if k in ("global_step", "epoch")},
            "dp_config": {k: v for k, v in excerpt.items() if v is not None},
        },
        "converter": "parapolicy.convert",
    }


def _scheduler_fields(scheduler: Mapping[str, Any]) -> dict[str, Any]:
    return dict(num_train_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
                beta_schedule=str(scheduler.get("beta_schedule", "linear")),
                clip_sample=bool(scheduler.get("clip_sample", True)),
                prediction_type=str(scheduler.get("prediction_type", "epsilon")))


def convert_dp_transformer_checkpoint(ckpt: DPCheckpoint, sd: Mapping[str, torch.Tensor], weights_key: str,
                                      source: Path, out: Path) -> Path:
    """A DP-T workspace (low-dim or hybrid image) -> a parapolicy checkpoint folder (see module doc)."""
    what = f"Diffusion Policy checkpoint {source.name}"
    name = policy_name(ckpt)
    if name and name not in TRANSFORMER_POLICIES:
        raise UnsupportedCheckpointError(f"{what}: transformer policy class {name} is not supported; only "
                                         f"{', '.join(TRANSFORMER_POLICIES)} are")
    if "model.input_emb.weight" not in sd:
        found = "ConditionalUnet1D weights (model.down_modules.*)" if any(k.startswith("model.down_modules.") for k in sd) \
            else "no TransformerForDiffusion weights"
        raise UnsupportedCheckpointError(f"{what}: a transformer policy ({name or 'unnamed'}) with {found}: its "
                                         f"network is not DP's TransformerForDiffusion (model.input_emb.* missing)")
    if name == HYBRID_TRANSFORMER_POLICY or any(k.startswith("obs_encoder.") for k in sd):
        raise UnsupportedCheckpointError(f"{what}: the hybrid image transformer ({HYBRID_TRANSFORMER_POLICY}) is not "
                                         f"supported yet; the low-dim one ({LOWDIM_TRANSFORMER_POLICY}) is")
    return _convert_lowdim(ckpt, sd, weights_key, source, out, what)


def _convert_lowdim(ckpt: DPCheckpoint, sd: Mapping[str, torch.Tensor], weights_key: str, source: Path, out: Path,
                    what: str) -> Path:
    from parapolicy.policy.checkpoint import save_converted
    from parapolicy.policy.diffusion_policy import DiffusionPolicy

    get = ckpt.get
    extra = sorted(set(get("policy", {})) - _LOWDIM_POLICY_KEYS)
    if extra:  # DP passes unknown policy keys to scheduler.step(**kwargs): we cannot honour them
        raise UnsupportedCheckpointError(f"{what}: policy options {extra} (passed to scheduler.step) are not supported")
    net = transformer_from_weights(ckpt, sd, what, "policy.model.n_head")
    _check_obs_as_cond(ckpt, net, what)
    obs_dim = _affine_dim(sd, "obs", what)
    action_dim = _affine_dim(sd, "action", what)
    width = action_dim + (0 if net["network"]["obs_as_cond"] else obs_dim)
    if net["input_dim"] != width or net["output_dim"] != width:
        raise ValueError(f"{what}: the transformer maps {net['input_dim']} -> {net['output_dim']} channels; the "
                         f"normalisers give action_dim {action_dim}" + ("" if net["network"]["obs_as_cond"] else f" + obs_dim {obs_dim}"))
    if net["cond_dim"] and net["cond_dim"] != obs_dim:
        raise ValueError(f"{what}: observation tokens of {net['cond_dim']} features, the obs normaliser has {obs_dim}")
    for key, value in (("obs_dim", get("policy.obs_dim", get("obs_dim"))), ("action_dim", get("policy.action_dim", get("action_dim")))):
        expected = obs_dim if key == "obs_dim" else action_dim
        if isinstance(value, int) and value != expected:
            raise ValueError(f"{what}: config says {key}={value}, the normalisers give {expected}")
    temporal = _temporal(ckpt, net, what)
    sampler, steps, scheduler = read_scheduler(ckpt, what)
    obs_keys = [str(k) for k in (get("task.obs_keys", get("task.env_runner.obs_keys", [])) or [])]
    action_space = read_action_space(ckpt, action_dim, what)
    config = DiffusionPolicyConfig(
        obs_dim=obs_dim, action_dim=action_dim, action_space=action_space, obs_keys=obs_keys,
        env=_our_env(get("task.task_name", get("task_name")), obs_dim, obs_keys, action_space),
        network=net["network"], **temporal, **_scheduler_fields(scheduler), sampler=sampler, num_inference_steps=steps)
    policy = DiffusionPolicy(config, scheduler_config=scheduler)
    _load_transformer(policy, sd, what)
    for key, dim in (("obs", obs_dim), ("action", action_dim)):
        scale, offset = _affine(sd, key, dim, what)
        getattr(policy.normalizer, key).set_stats(*dp_affine_to_minmax(scale, offset, f"{what}: normalizer {key}"))
    return save_converted(policy, out, _provenance(ckpt, source, weights_key, LOWDIM_TRANSFORMER_POLICY))


def _affine_dim(sd: Mapping[str, torch.Tensor], key: str, what: str) -> int:
    scale = sd.get(f"normalizer.params_dict.{key}.scale")
    if scale is None:
        raise ValueError(f"{what}: normaliser normalizer.params_dict.{key}.scale not found in the state dict")
    return int(scale.numel())
