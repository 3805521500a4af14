"""Diffusion Policy (Chi et al.): network, normaliser, dataset, checkpoints and the control-loop API.

    from parapolicy.policy import load_policy
    policy = load_policy("square", sampler="ddpm")
    policy.reset(); action = policy.act(obs)
"""

from parapolicy.policy.checkpoint import load_checkpoint, load_policy, save_checkpoint
from parapolicy.policy.configuration import DiffusionPolicyConfig
from parapolicy.policy.dataset import SequenceDataset, load_demos
from parapolicy.policy.diffusion_policy import DiffusionPolicy
from parapolicy.policy.normalizer import MinMaxNormalizer, PolicyNormalizer
from parapolicy.policy.unet import ConditionalUnet1D

__all__ = [
    "ConditionalUnet1D",
    "DiffusionPolicy",
    "DiffusionPolicyConfig",
    "MinMaxNormalizer",
    "PolicyNormalizer",
    "SequenceDataset",
    "load_checkpoint",
    "load_demos",
    "load_policy",
    "save_checkpoint",
]
