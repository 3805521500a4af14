"""Networks the bench can time besides the checkpoint's: Diffusion Policy's own sizes, with random weights.

The shipped policies use a 4.6M-parameter U-Net (down_dims 64/128/256), small enough that a call is
mostly Python and kernel-launch overhead. Diffusion Policy's published networks are 14x and 55x
larger, where a denoiser call is compute- or memory-bound and a Picard round of K stacked timesteps
costs a different multiple of one step. ``network=dp_lowdim`` / ``network=dp_image`` (or
``denoiser.networks``) build them at those sizes; weights are random (seeded), since latency does not
depend on their values, but the number of Picard rounds a parallel sampler needs does: read rounds and
deviations of these rows as those of an untrained network.

- ``dp_lowdim``: DP's low-dim default (``diffusion_unet_lowdim``): down_dims 256/512/1024,
  diffusion_step_embed_dim 256, kernel 5, 8 groups, with the checkpoint's obs and action dims
  (Square: 23-dim obs x 2 steps, 7-dim actions: 65,878,279 parameters) and its normaliser, so the
  checkpoint's observations feed it.
- ``dp_image``: DP's hybrid image policy (``diffusion_unet_hybrid_image``, Square): the U-Net has
  down_dims 512/1024/2048, diffusion_step_embed_dim 128, 10-dim absolute actions and, per observation
  step, 137 conditioning features: robomimic's encoder (``parapolicy.policy.vision``: ResNet-18 trunk
  with GroupNorm, SpatialSoftmax with 32 keypoints, Linear to 64) on two 84x84 cameras (agentview,
  eye in hand) centre-cropped to 76x76, then 9 low-dim features (eef pos 3, quat 4, gripper 2):
  255,612,042 U-Net parameters plus the encoder's. The bench feeds it random uint8 frames; rows carry
  ``encode_ms`` (the encoder, once per call) beside the call's latency.
- ``dp_transformer``: DP's low-dim transformer (DP-T, ``diffusion_transformer_lowdim``): 8 causal
  decoder layers, n_emb 256, 4 heads, one condition token for the timestep and one per observation
  step, an MLP condition encoder; with Square's dims and horizon 16 it attends over 16 action tokens
  and 3 condition tokens: 8,968,455 parameters. A Picard round stacks K x B sequences of those tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class NetworkSpec:
    """A U-Net size; ``None`` fields take the checkpoint's value."""

    down_dims: tuple[int, ...]
    diffusion_step_embed_dim: int
    kernel_size: int = 5
    n_groups: int = 8
    action_dim: Optional[int] = None
    obs_dim: Optional[int] = None  # low-dim features per observation step
    image_keys: tuple[str, ...] = ()  # cameras (robosuite names), each uint8 image_shape
    image_shape: tuple[int, int, int] = (3, 84, 84)
    vision: Optional[dict] = None  # ImageObsEncoder arguments (parapolicy.policy.vision)
    network: Optional[dict] = None  # the config's ``network`` entry (None: the U-Net of the sizes above)
    num_parameters: Optional[int] = None  # of the denoiser, with the stated dims, checked by the tests
    description: str = ""


DP_NETWORKS = {
    "dp_lowdim": NetworkSpec(
        down_dims=(256, 512, 1024), diffusion_step_embed_dim=256, num_parameters=65_878_279,
        description="Diffusion Policy's low-dim U-Net (256/512/1024, step embedding 256), random weights"),
    "dp_image": NetworkSpec(
        down_dims=(512, 1024, 2048), diffusion_step_embed_dim=128, action_dim=10, obs_dim=9,
        image_keys=("agentview_image", "robot0_eye_in_hand_image"),
        vision={"backbone": "resnet18", "crop_shape": [76, 76], "num_kp": 32, "feature_dim": 64},
        num_parameters=255_612_042,
        description="Diffusion Policy's hybrid image policy: U-Net 512/1024/2048, step embedding 128, 10-dim "
                    "actions, conditioned on robomimic's ResNet-18/GroupNorm + SpatialSoftmax encoder of two "
                    "84x84 cameras (64 features each) + 9 low-dim features per step; random weights"),
    "dp_transformer": NetworkSpec(
        down_dims=(256, 512, 1024), diffusion_step_embed_dim=256, num_parameters=8_968_455,
        network={"class": "TransformerForDiffusion", "n_layer": 8, "n_head": 4, "n_emb": 256, "p_drop_attn": 0.3,
                 "causal_attn": True, "time_as_cond": True, "obs_as_cond": True, "n_cond_layers": 0},
        description="Diffusion Policy's low-dim transformer (DP-T): 8 causal decoder layers, n_emb 256, 4 heads, "
                    "time and observation condition tokens, MLP condition encoder; random weights"),
}
NETWORKS = (CHECKPOINT, *DP_NETWORKS)


def network_names(names: Any) -> list[str]:
    """Validated network names, in order, without repeats."""
    out = []
    for name in [names] if isinstance(names, str) else list(names or []):
        name = str(name)
        if name not in NETWORKS:
            raise ValueError(f"unknown network {name!r}: choose from {', '.join(NETWORKS)}")
        if name not in out:
            out.append(name)
    return out


def network_config(spec: NetworkSpec, base):
    """The ``DiffusionPolicyConfig`` of ``spec`` on top of ``base`` (the checkpoint's config)."""
    from parapolicy.policy import DiffusionPolicyConfig

    obs_dim = spec.obs_dim or base.obs_dim
    return DiffusionPolicyConfig.from_dict({
        **base.to_dict(),
        "down_dims": list(spec.down_dims),
        "diffusion_step_embed_dim": spec.diffusion_step_embed_dim,
        "kernel_size": spec.kernel_size,
        "n_groups": spec.n_groups,
        "action_dim": spec.action_dim or base.action_dim,
        "obs_dim": obs_dim,
        "obs_keys": base.obs_keys if obs_dim == base.obs_dim else [],  # features, not robosuite keys
        "image_keys": list(spec.image_keys),
        "image_shape": list(spec.image_shape),
        "vision": dict(spec.vision or {}),
        "network": dict(spec.network or {}),
    })


def build_network(name: str, policy, seed: int = 0, spec: Optional[NetworkSpec] = None):
    """A ``DiffusionPolicy`` of network ``name`` on ``policy``'s device, in eval mode, with the
    checkpoint's horizon, observation steps, scheduler and sampler; ``"checkpoint"`` returns
    ``policy`` itself. Same obs dims: the checkpoint's normaliser; other obs dims: the identity one
    (features in [-1, 1]). ``spec`` builds another size under ``name``."""
    import torch

    from parapolicy.policy import DiffusionPolicy

    if name == CHECKPOINT and spec is None:
        return policy
    config = network_config(spec or DP_NETWORKS[name], policy.config)
    base = policy.config
    torch.manual_seed(int(seed))
    net = DiffusionPolicy(config, scheduler_config=policy.scheduler_config)
    if config.obs_dim == base.obs_dim:
        net.normalizer.obs.load_state_dict(policy.normalizer.obs.state_dict())
    if config.action_dim == base.action_dim:
        net.normalizer.action.load_state_dict(policy.normalizer.action.state_dict())
    net.set_sampler(policy.sampler_name, policy.num_inference_steps, **policy.sampler_options)
    net.fast_path = policy.fast_path
    return net.to(policy.device).eval()


def num_parameters(policy) -> int:
    """The denoising network's parameters (what every sampler step runs)."""
    return sum(p.numel() for p in policy.model.parameters())


def encoder_parameters(policy) -> int:
    """The observation encoder's parameters (image policies; 0 without one)."""
    encoder = getattr(policy, "obs_encoder", None)
    return 0 if encoder is None else sum(p.numel() for p in encoder.parameters())


def random_images(policy, n: int, seed: int = 0) -> Optional[dict]:
    """``{camera: uint8 [n, n_obs_steps, 3, H, W]}`` drawn at random for an image policy, else None."""
    import torch

    cfg = policy.config
    if not cfg.image_keys:
        return None
    gen = torch.Generator().manual_seed(int(seed))
    return {key: torch.randint(0, 256, (n, cfg.n_obs_steps, *cfg.image_shape), generator=gen, dtype=torch.uint8)
            for key in cfg.image_keys}
