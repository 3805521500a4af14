"""The eval's real-time options (``timing``, ``latency``, ``transition``, ``execution_horizon``), checked
once before any simulator starts and handed to every ``PolicyRunner`` (``parapolicy.realtime.runner``).

    python -m parapolicy.eval timing=async latency=200 transition=bid_prefix
    python -m parapolicy.eval -m timing=async latency=0,50,100,200,300      # a latency sweep
    python -m parapolicy.eval timing=async latency=profile:outputs/gpu_check/latency_profile.json
"""

from __future__ import annotations

from omegaconf import DictConfig

from parapolicy.realtime.latency import LatencyModel
from parapolicy.realtime.transitions import Transition

TIMINGS = ("sync", "async", "hold")


def timing_options(cfg: DictConfig) -> dict:
    """``{timing, latency, transition, execution_horizon}`` from the eval config; ValueError naming the
    bad value (and FileNotFoundError for a missing profile) before anything runs."""
    timing = str(cfg.get("timing") or "sync")
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {', '.join(TIMINGS)}, got {timing!r}")
    latency = cfg.get("latency", "measured")
    latency = "measured" if latency is None else str(latency)
    transition = str(cfg.get("transition") or "naive")
    horizon = cfg.get("execution_horizon")
    if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1):
        raise ValueError(f"execution_horizon must be an integer >= 1 or null, got {horizon!r}")
    if timing == "sync":
        if latency != "measured" or horizon is not None:
            raise ValueError("latency and execution_horizon apply to timing=async or timing=hold (timing=sync lets "
                             "the simulator wait for every plan); add timing=async")
        transition = "naive"  # the config's default transition has nothing to do in sync
    elif timing == "hold":
        transition = "naive"  # a held robot runs every chunk from its start
    Transition.parse(transition)
    model = LatencyModel.parse(latency) if not latency.startswith("profile:") else None
    if model is None:  # a profile: the file must exist and hold latencies; the run is chosen per label
        from parapolicy.realtime.latency import read_profile

        read_profile(latency[len("profile:"):].partition("#")[0])
    return {"timing": timing, "latency": latency, "transition": transition, "execution_horizon": horizon}


def describe(options: dict, label: str, sampler_name: str | None = None, config=None) -> dict:
    """What summary.json records of a run's real-time options (the profile run it replays, if any, and the
    transition ``auto`` chose for the policy of ``config``)."""
    if options["timing"] == "sync":
        return {"timing": "sync"}
    latency = LatencyModel.parse(options["latency"], label, sampler_name).describe()
    transition = options["transition"]
    if config is not None:
        transition = Transition.parse(transition, config).name
    return {"timing": options["timing"], "latency": latency, "transition": transition,
            "execution_horizon": options["execution_horizon"]}
