"""parapolicy: Diffusion Policy with parallel (Picard / Parareal / Anderson) sampling.

Importing the package is cheap: the policy (torch + diffusers) and the environments (robosuite) load
only when used, so `parapolicy.samplers` can be used without a simulator installed.
"""

__version__ = "0.1.0"


def load_policy(*args, **kwargs):
    """Load a trained Diffusion Policy; see `parapolicy.policy.load_policy`."""
    from parapolicy.policy import load_policy as _load_policy

    return _load_policy(*args, **kwargs)
