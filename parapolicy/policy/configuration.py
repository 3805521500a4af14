"""Configuration of a Diffusion Policy: everything needed to rebuild the network and the sampler.

Kept separate from the modelling code (LeRobot's configuration / modelling split) so that a
checkpoint's ``config.json`` can be read and validated without building a network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from parapolicy.policy.action_space import check_action_space


@dataclass
class DiffusionPolicyConfig:
    # Data interface.
    obs_dim: int
    action_dim: int = 7
    obs_keys: list[str] = field(default_factory=list)  # concatenation order of robosuite obs keys
    env: str | None = None
    # Camera inputs (image policies): robosuite observation names (``agentview_image``, ...), each frame
    # uint8 ``image_shape`` [3, H, W]; ``vision`` holds parapolicy.policy.vision.ImageObsEncoder's
    # arguments (backbone, backbone_kwargs, resize_shape, crop_shape, num_kp, feature_dim). Its output,
    # per observation step, is the U-Net's global conditioning.
    image_keys: list[str] = field(default_factory=list)
    image_shape: list[int] = field(default_factory=lambda: [3, 84, 84])
    vision: dict[str, Any] = field(default_factory=dict)
    # What an action means (parapolicy.policy.action_space): "delta", robosuite's 7-dim OSC_POSE delta
    # command, or "absolute_rot6d", DP's abs_action (position, 6D rotation, gripper: 10 per arm), which
    # act() turns into robosuite's absolute OSC_POSE command for an env with control="absolute".
    action_space: str = "delta"
    # Temporal structure (Diffusion Policy's defaults): predict `horizon` actions from
    # `n_obs_steps` observations, execute `n_action_steps` of them starting at `action_start`.
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    # DP's `oa_step_convention`: True (the default, DP's shipped configs) executes from index
    # n_obs_steps - 1, False from n_obs_steps. `n_latency_steps` planned actions are skipped on top
    # (DP's runner drops them). Both default to today's behaviour, so older config.json files load.
    oa_step_convention: bool = True
    n_latency_steps: int = 0
    # ConditionalUnet1D.
    down_dims: list[int] = field(default_factory=lambda: [64, 128, 256])
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 128
    # The denoising network: {} is the ConditionalUnet1D sized above; {"class": "TransformerForDiffusion",
    # ...} is Diffusion Policy's transformer (its options: parapolicy.policy.networks).
    network: dict[str, Any] = field(default_factory=dict)
    # DP's pred_action_steps_only (transformer only): the network plans just the actions it returns
    # (horizon = n_action_steps + n_latency_steps), so execution starts after the latency steps.
    pred_action_steps_only: bool = False
    # DDPM training noise schedule (diffusers DDPMScheduler arguments).
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    # Default sampler used at inference (see parapolicy.samplers.make_sampler).
    sampler: str = "ddpm"
    num_inference_steps: int = 100
    sampler_options: dict[str, Any] = field(default_factory=dict)
    # Trained for delay (``transition=trained``): > 0 when the network also sees the actions the robot
    # commits to before the chunk can take over (positions ``[0, action_start + d)``, d <= max_delay)
    # as clean values with a known-position mask in its global conditioning. 0: an ordinary policy.
    max_delay: int = 0
    # How the committed positions appear in the sample the network denoises: "noised" to each step's level
    # (RePaint, as an ordinary policy was trained) or "clean" at every step (training-time RTC).
    committed_in_sample: str = "noised"

    def __post_init__(self) -> None:
        self.obs_keys = list(self.obs_keys)
        self.image_keys = list(self.image_keys)
        self.image_shape = [int(v) for v in self.image_shape]
        self.vision = dict(self.vision)
        if self.image_keys and (len(self.image_shape) != 3 or self.image_shape[0] != 3):
            raise ValueError(f"image_shape must be [3, H, W], got {self.image_shape}")
        check_action_space(self.action_space, self.action_dim)
        self.down_dims = [int(d) for d in self.down_dims]
        self.network = dict(self.network)
        self.sampler_options = dict(self.sampler_options)
        if self.n_obs_steps < 1 or self.n_action_steps < 1:
            raise ValueError("n_obs_steps and n_action_steps must be >= 1")
        if not isinstance(self.oa_step_convention, bool):
            raise ValueError(f"oa_step_convention must be true or false, got {self.oa_step_convention!r}")
        if self.n_latency_steps < 0:
            raise ValueError(f"n_latency_steps must be >= 0, got {self.n_latency_steps}")
        if self.action_start + self.n_action_steps > self.horizon:
            raise ValueError(
                f"horizon {self.horizon} too short to execute {self.n_action_steps} actions "
                f"starting at index {self.action_start}"
            )
        levels = len(self.down_dims) - 1
        if self.uses_unet and self.horizon % (2**levels):
            raise ValueError(f"horizon {self.horizon} must be divisible by 2**{levels} for down_dims {self.down_dims}")
        if isinstance(self.max_delay, bool) or not isinstance(self.max_delay, int) or self.max_delay < 0:
            raise ValueError(f"max_delay must be an integer >= 0, got {self.max_delay!r}")
        if self.committed_in_sample not in ("noised", "clean"):
            raise ValueError(f"committed_in_sample must be 'noised' or 'clean', got {self.committed_in_sample!r}")
        if self.max_delay and self.action_start + 1 > self.horizon - 1:
            raise ValueError(f"horizon {self.horizon} leaves no position to plan after the committed ones")
        if self.uses_unet and any(d % self.n_groups for d in self.down_dims):
            raise ValueError(f"every down_dims entry must be divisible by n_groups={self.n_groups}")
        from parapolicy.policy.networks import check_network

        check_network(self)

    @property
    def action_start(self) -> int:
        """Index of the first executed action in the predicted sequence: DP's ``start`` (n_obs_steps - 1
        with ``oa_step_convention``, else n_obs_steps) plus the ``n_latency_steps`` its runner skips."""
        if self.pred_action_steps_only:  # the chunk holds only the latency steps and the executed ones
            return self.n_latency_steps
        return self.n_obs_steps - (1 if self.oa_step_convention else 0) + self.n_latency_steps

    @property
    def uses_unet(self) -> bool:
        return self.network.get("class", "ConditionalUnet1D") == "ConditionalUnet1D"

    @property
    def sample_dim(self) -> int:
        """Channels of the sampled sequence: ``action_dim`` (plus the observation features of DP's
        inpainting transformer, see parapolicy.policy.networks)."""
        from parapolicy.policy.networks import sample_dim

        return sample_dim(self)

    @property
    def feature_dim(self) -> int:
        """Conditioning features per observation step: the cameras' features, then the low-dim vector."""
        return len(self.image_keys) * int(self.vision.get("feature_dim", 64)) + self.obs_dim

    @property
    def obs_cond_dim(self) -> int:
        """The observation part of the global conditioning: ``feature_dim`` per observation step."""
        return self.feature_dim * self.n_obs_steps

    @property
    def delay_conditioned(self) -> bool:
        return self.max_delay > 0

    @property
    def known_positions(self) -> int:
        """How many leading chunk positions a delay-conditioned network can be told (0 otherwise):
        ``action_start + max_delay``, leaving at least one position to plan."""
        if not self.delay_conditioned:
            return 0
        return min(self.action_start + self.max_delay, self.horizon - 1)

    @property
    def known_cond_dim(self) -> int:
        """Columns of the known-actions conditioning: ``known_positions`` actions, then their mask."""
        return self.known_positions * (self.action_dim + 1)

    @property
    def global_cond_dim(self) -> int:
        return self.obs_cond_dim + self.known_cond_dim

    def network_kwargs(self) -> dict[str, Any]:
        return dict(
            input_dim=self.action_dim,
            global_cond_dim=self.global_cond_dim,
            diffusion_step_embed_dim=self.diffusion_step_embed_dim,
            down_dims=list(self.down_dims),
            kernel_size=self.kernel_size,
            n_groups=self.n_groups,
        )

    def scheduler_kwargs(self) -> dict[str, Any]:
        return dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            clip_sample=self.clip_sample,
            prediction_type=self.prediction_type,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiffusionPolicyConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown policy config fields {unknown}")
        return cls(**data)
