"""Which denoising network a DiffusionPolicy builds: its config's ``network`` ({} or ``{"class":
"ConditionalUnet1D"}``: the U-Net, sized by the config's ``down_dims`` ...; ``{"class":
"TransformerForDiffusion", ...}``: Diffusion Policy's transformer, options below).

Every network keeps one interface, ``model(sample [B, H, D], timestep [B], global_cond [B, G]) -> [B, H,
D]``, so samplers, the fast path and the server never ask which one they run. D is ``sample_dim``: the
action dimension, plus the observation features for a transformer without ``obs_as_cond`` (DP's
inpainting variant, see ``parapolicy.policy.transformer``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

UNET = "ConditionalUnet1D"
TRANSFORMER = "TransformerForDiffusion"

# The transformer's options and defaults (DP's low-dim transformer config).
TRANSFORMER_DEFAULTS: dict[str, Any] = {
    "n_layer": 8,
    "n_head": 4,
    "n_emb": 256,
    "p_drop_emb": 0.0,
    "p_drop_attn": 0.3,
    "causal_attn": True,
    "time_as_cond": True,
    "obs_as_cond": True,  # False: observations in-painted into the sampled sequence (DP's obs_as_cond=False)
    "n_cond_layers": 0,  # 0: an MLP over the condition tokens; > 0: a transformer encoder of that depth
    "horizon": None,  # positional embeddings (None: the policy's horizon; longer is allowed without causal_attn)
}


def network_class(config: Any) -> str:
    return str(dict(config.network).get("class", UNET))


def transformer_options(config: Any) -> dict[str, Any]:
    """The transformer's options with defaults filled in (``horizon`` resolved)."""
    options = {**TRANSFORMER_DEFAULTS, **{k: v for k, v in dict(config.network).items() if k != "class"}}
    if options["horizon"] is None:
        options["horizon"] = config.horizon
    return options


def sample_dim(config: Any) -> int:
    """Channels of the sequence the sampler denoises: actions, plus the observation features of an
    inpainting transformer."""
    if network_class(config) == TRANSFORMER and not transformer_options(config)["obs_as_cond"]:
        return config.action_dim + config.feature_dim
    return config.action_dim


def check_network(config: Any) -> None:
    """Refuse, by name, a ``network`` entry that cannot be built (called from the config's __post_init__)."""
    name = network_class(config)
    if name == UNET:
        if config.pred_action_steps_only:
            raise ValueError("pred_action_steps_only is a transformer option (DP's U-Net policy plans the horizon)")
        return
    if name != TRANSFORMER:
        raise ValueError(f"network class {name!r} is not one of {UNET}, {TRANSFORMER}")
    unknown = sorted(set(config.network) - set(TRANSFORMER_DEFAULTS) - {"class"})
    if unknown:
        raise ValueError(f"unknown {TRANSFORMER} options {unknown} (known: {sorted(TRANSFORMER_DEFAULTS)})")
    o = transformer_options(config)
    for key in ("n_layer", "n_head", "n_emb", "n_cond_layers", "horizon"):
        if isinstance(o[key], bool) or not isinstance(o[key], int) or o[key] < (0 if key == "n_cond_layers" else 1):
            raise ValueError(f"{TRANSFORMER} option {key} must be a positive integer, got {o[key]!r}")
    for key in ("causal_attn", "time_as_cond", "obs_as_cond"):
        if not isinstance(o[key], bool):
            raise ValueError(f"{TRANSFORMER} option {key} must be true or false, got {o[key]!r}")
    if o["n_emb"] % o["n_head"] or o["n_emb"] % 2:
        raise ValueError(f"n_emb {o['n_emb']} must be even and divisible by n_head {o['n_head']}")
    if o["obs_as_cond"] and not o["time_as_cond"]:
        raise ValueError("obs_as_cond needs time_as_cond (DP's encoder-only variant has no observation tokens)")
    if o["horizon"] < config.horizon or (o["causal_attn"] and o["horizon"] != config.horizon):
        raise ValueError(f"the transformer's horizon {o['horizon']} must be the policy's {config.horizon} "
                         f"(or, without causal_attn, longer)")
    if config.pred_action_steps_only and not o["obs_as_cond"]:
        raise ValueError("pred_action_steps_only needs obs_as_cond (as in Diffusion Policy)")
    if getattr(config, "max_delay", 0):
        raise ValueError(f"delay conditioning (max_delay > 0) is a U-Net option; {TRANSFORMER} does not take it")


def network_kwargs(config: Any) -> dict[str, Any]:
    """The constructor arguments of the config's network."""
    if network_class(config) == UNET:
        return config.network_kwargs()
    o = transformer_options(config)
    obs_as_cond = o.pop("obs_as_cond")
    width = sample_dim(config)
    return dict(input_dim=width, output_dim=width, n_obs_steps=config.n_obs_steps,
                cond_dim=config.feature_dim if obs_as_cond else 0,
                inpaint_dim=0 if obs_as_cond else config.feature_dim, **o)


def build_network(config: Any) -> nn.Module:
    """The denoising network ``config.network`` names (random weights)."""
    if network_class(config) == UNET:
        from parapolicy.policy.unet import ConditionalUnet1D

        return ConditionalUnet1D(**config.network_kwargs())
    from parapolicy.policy.transformer import TransformerForDiffusion

    return TransformerForDiffusion(**network_kwargs(config))


def network_description(config: Any) -> dict[str, Any]:
    """config.json's ``network`` section: the class and its constructor arguments (for readers; the
    policy is rebuilt from its ``policy`` section)."""
    return {"class": network_class(config), **network_kwargs(config)}
