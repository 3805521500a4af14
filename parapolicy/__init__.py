"""parapolicy: Diffusion Policy with parallel (Picard / Parareal / Anderson) sampling.

    import parapolicy

    policy = parapolicy.load_policy("square", sampler="paraddpm")       # a shipped policy, by name
    with parapolicy.AsyncPolicy(policy, control_hz=20) as robot:       # a loop that never waits for it
        ...

Importing the package is cheap: the policy (torch + diffusers) and the environments (robosuite) load
only when used, so `parapolicy.samplers` can be used without a simulator installed.
"""

__version__ = "0.1.0"
__all__ = ["AsyncPolicy", "load_policy"]


def load_policy(*args, **kwargs):
    """Load a trained Diffusion Policy; see `parapolicy.policy.load_policy`."""
    from parapolicy.policy import load_policy as _load_policy

    return _load_policy(*args, **kwargs)


def __getattr__(name: str):
    # parapolicy.AsyncPolicy without importing torch at `import parapolicy`
    if name == "AsyncPolicy":
        from parapolicy.realtime.async_policy import AsyncPolicy

        return AsyncPolicy
    raise AttributeError(f"module 'parapolicy' has no attribute {name!r}")
