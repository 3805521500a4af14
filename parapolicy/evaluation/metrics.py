"""Summaries of closed-loop runs: success with Wilson intervals, latency percentiles, tables, plots."""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (sensible at 0% and 100%, unlike Wald)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends at 0% and 100%
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def latency_stats(latencies_ms: Sequence[float]) -> dict[str, float]:
    values = np.asarray(latencies_ms, dtype=np.float64)
    if values.size == 0:
        return {"mean": float("nan"), "p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"mean": float(values.mean()), "p50": float(p50), "p95": float(p95), "p99": float(p99)}


def summarize_run(episodes: Iterable[Mapping]) -> dict:
    """Summary of one sampler's episodes (the ``episodes.jsonl`` lines of that run).

    Latency, rounds and evaluations are per policy call (one call plans ``n_action_steps`` actions for
    every env in the batch); ``control_hz`` is executed env steps per second of loop wall time (policy
    and simulator together).
    """
    episodes = list(episodes)
    n = len(episodes)
    successes = sum(bool(ep["success"]) for ep in episodes)
    calls = [call for ep in episodes for call in ep["calls"]]
    steps = sum(int(ep["length"]) for ep in episodes)
    wall = sum(float(ep["wall_s"]) for ep in episodes)
    summary = {
        "success_rate": successes / n if n else float("nan"),
        "success_ci95": list(wilson_interval(successes, n)),
        "n_episodes": n,
        "n_success": successes,
        "n_errors": sum(1 for ep in episodes if ep.get("error")),
        "latency_ms": latency_stats([c["latency_ms"] for c in calls]),
        "rounds_mean": float(np.mean([c["rounds"] for c in calls])) if calls else float("nan"),
        "model_evals_mean": float(np.mean([c["model_evals"] for c in calls])) if calls else float("nan"),
        "n_calls": len(calls),
        "unconverged_calls": sum(1 for c in calls if c.get("converged") is False),
        "control_hz": steps / wall if wall > 0 else float("nan"),
        "episode_length_mean": steps / n if n else float("nan"),
    }
    if episodes and all("task_time_s" in ep for ep in episodes):  # robot time per episode (any timing)
        summary["task_time_s"] = float(np.mean([ep["task_time_s"] for ep in episodes]))
    timed = [ep for ep in episodes if "stall_steps" in ep]  # real-time runs (timing=async / hold)
    if timed:
        delays = [c["delay_steps"] for c in calls if "delay_steps" in c and not c.get("blocking")]
        jumps = [ep["max_switch_jump"] for ep in timed]
        summary.update(
            delay_steps=float(np.mean(delays)) if delays else 0.0,
            stall_steps=float(np.mean([ep["stall_steps"] for ep in timed])),
            hold_steps=float(np.mean([ep["hold_steps"] for ep in timed])),
            task_time_s=float(np.mean([ep["task_time_s"] for ep in timed])),
            task_time_s_success=float(np.mean([ep["task_time_s"] for ep in timed if ep["success"]]))
            if any(ep["success"] for ep in timed) else float("nan"),
            max_switch_jump_mean=float(np.mean(jumps)),
        )
    encode = [c["encode_ms"] for c in calls if "encode_ms" in c]
    if encode:  # image policies: the encoder's share of each call (it runs once, before sampling)
        summary["encode_ms"] = latency_stats(encode)
    shadow = [c for c in calls if "shadow_latency_ms" in c]
    if shadow:
        deviation = np.asarray([c["shadow_deviation"] for c in shadow])
        summary["shadow"] = {
            "baseline_latency_ms": latency_stats([c["shadow_latency_ms"] for c in shadow]),
            "deviation_max": float(deviation.max()),
            "deviation_mean": float(deviation.mean()),
        }
    return summary


def format_table(runs: Mapping[str, Mapping], speedup_p50: float | None = None) -> str:
    """A fixed-width table of run summaries, one row per sampler (``steps``: its schedule length)."""
    header = f"{'sampler':<22} {'steps':>5} {'success':>8} {'95% CI':>15} {'p50 ms':>9} {'p95 ms':>9} " \
             f"{'mean ms':>9} {'rounds':>7} {'evals':>7} {'ctrl Hz':>8}"
    lines = [header, "-" * len(header)]
    for name, run in runs.items():
        lo, hi = run["success_ci95"]
        lat = run["latency_ms"]
        steps = run.get("steps") or "-"  # the schedule length (summaries before it was recorded: -)
        lines.append(
            f"{name:<22} {steps:>5} {run['success_rate']:>8.2f} {f'[{lo:.2f}, {hi:.2f}]':>15} {lat['p50']:>9.1f} "
            f"{lat['p95']:>9.1f} {lat['mean']:>9.1f} {run['rounds_mean']:>7.1f} {run['model_evals_mean']:>7.1f} "
            f"{run['control_hz']:>8.1f}"
        )
    for name, run in runs.items():
        if "encode_ms" in run:
            lines.append(f"{name}: image encoder p50 {run['encode_ms']['p50']:.1f} ms of the p50 call's "
                         f"{run['latency_ms']['p50']:.1f} ms (once per call, before sampling)")
    if speedup_p50 is not None:
        lines.append(f"p50 latency speedup over baseline: {speedup_p50:.2f}x")
    timed = {name: run for name, run in runs.items() if "stall_steps" in run}
    if timed:  # real-time runs: what latency did to the task
        header = f"{'sampler':<22} {'timing':>6} {'latency':>10} {'transition':>12} {'delay':>6} {'stalls':>7} " \
                 f"{'holds':>6} {'task s':>7} {'task s ok':>9}"
        lines += ["", header, "-" * len(header)]
        for name, run in timed.items():
            latency = str(run.get("latency", "?"))
            latency = latency if len(latency) <= 10 else "profile"
            lines.append(f"{name:<22} {run.get('timing', '?'):>6} {latency:>10} {run.get('transition', '?'):>12} "
                         f"{run['delay_steps']:>6.2f} {run['stall_steps']:>7.1f} {run['hold_steps']:>6.1f} "
                         f"{run['task_time_s']:>7.2f} {run['task_time_s_success']:>9.2f}")
    return "\n".join(lines)


def plot_latency(latencies: Mapping[str, Sequence[float]], path) -> None:
    """Histogram and CDF of per-call latency, one curve per sampler, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hist_ax, cdf_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for name, values in latencies.items():
        values = np.sort(np.asarray(values, dtype=np.float64))
        if values.size == 0:
            continue
        hist_ax.hist(values, bins=40, alpha=0.55, label=name)
        cdf_ax.plot(values, np.arange(1, values.size + 1) / values.size, label=name)
    hist_ax.set(xlabel="policy call latency [ms]", ylabel="calls", title="latency histogram")
    cdf_ax.set(xlabel="policy call latency [ms]", ylabel="fraction of calls", title="latency CDF")
    for ax in (hist_ax, cdf_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
