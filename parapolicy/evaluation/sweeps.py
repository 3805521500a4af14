"""Eval summaries (e.g. of a Hydra multirun) gathered into rows, a table and a plot; used by
``python -m parapolicy.report``.

One row per (run directory, run) of every ``summary.json`` below a folder, with its schedule length
(``steps``) and timestep spacing; the plot shows p50 speedup over the baseline and success rate
against whatever the sweep varied (``sweep_axis``: tolerance, steps or window), one line per sampler and
value of the other varied options; real-time sweeps over latency get their own plot (``plot_realtime``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def run_steps(run: dict, summary: dict, is_sampler: bool) -> int | None:
    """A run's schedule length: recorded per run since labels show steps; in older summaries the
    baselines ran the sampler's steps, which its config gives (null there: the checkpoint's, unknown)."""
    if run.get("steps") is not None:
        return int(run["steps"])
    steps = (summary.get("sampler") or {}).get("num_inference_steps")
    return None if steps is None else int(steps)


def collect_rows(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.rglob("summary.json")):
        summary = json.loads(path.read_text())
        sampler_cfg = summary.get("sampler") or {}
        for label, run in summary["runs"].items():
            role = run.get("role") or ("sampler" if label == summary.get("sampler_label", sampler_cfg.get("name"))
                                       else "baseline")
            is_sampler = role == "sampler"
            rows.append({
                "dir": str(path.parent.relative_to(folder)) or ".",
                "env": summary.get("env"),
                "sampler": label,
                "sampler_name": sampler_cfg.get("name") if is_sampler else label,
                "role": role,
                "num_inference_steps": run_steps(run, summary, is_sampler),
                "timestep_spacing": run.get("timestep_spacing"),
                "tolerance": sampler_cfg.get("tolerance") if is_sampler else None,
                "window": sampler_cfg.get("window") if is_sampler else None,
                "warm_start": sampler_cfg.get("warm_start") if is_sampler else None,
                "success_rate": run["success_rate"],
                "success_ci95": run["success_ci95"],
                "n_episodes": run["n_episodes"],
                "latency_p50_ms": run["latency_ms"]["p50"],
                "rounds_mean": run["rounds_mean"],
                "model_evals_mean": run["model_evals_mean"],
                "speedup_p50": summary.get("speedup_p50") if is_sampler else None,
                # real time (timing=async / hold): what latency did to the task
                "timing": run.get("timing", "sync"),
                "latency": run.get("latency"),
                "transition": run.get("transition"),
                "delay_steps": run.get("delay_steps"),
                "stall_steps": run.get("stall_steps"),
                "task_time_s": run.get("task_time_s"),
            })
    return rows


def format_rows(rows: list[dict]) -> str:
    header = (f"{'sampler':<18} {'role':<9} {'steps':>5} {'spacing':>8} {'tol':>7} {'warm':>5} {'success':>8} {'95% CI':>15} "
              f"{'p50 ms':>9} {'rounds':>7} {'evals':>7} {'speedup':>8}  dir")
    lines = [header, "-" * len(header)]
    for r in rows:
        lo, hi = r["success_ci95"]
        tol = "-" if r["tolerance"] is None else f"{r['tolerance']:g}"
        warm = "-" if r["warm_start"] is None else ("yes" if r["warm_start"] else "no")
        speed = "-" if r["speedup_p50"] is None else f"{r['speedup_p50']:.2f}x"
        lines.append(f"{r['sampler']:<18} {r['role']:<9} {r['num_inference_steps'] or '-':>5} {r['timestep_spacing'] or '-':>8} {tol:>7} {warm:>5} "
                     f"{r['success_rate']:>8.2f} {f'[{lo:.2f}, {hi:.2f}]':>15} {r['latency_p50_ms']:>9.1f} "
                     f"{r['rounds_mean']:>7.1f} {r['model_evals_mean']:>7.1f} {speed:>8}  {r['dir']}")
    return "\n".join(lines)


# what a sampler sweep may vary: (row key, axis label, log scale)
SWEEP_AXES = (("tolerance", "tolerance", True), ("num_inference_steps", "denoising steps", False),
              ("window", "window", False))


def varied_axes(rows: list[dict]) -> list[tuple[str, str, bool]]:
    """The ``SWEEP_AXES`` that take more than one value among the sampler runs."""
    samplers = [r for r in rows if r["role"] == "sampler"]
    return [axis for axis in SWEEP_AXES if len({r[axis[0]] for r in samplers if r[axis[0]] is not None}) > 1]


def sweep_axis(rows: list[dict]) -> tuple[str, str, bool]:
    """The option the plot puts on its x axis: the one that varies most (ties: tolerance, steps, window),
    else tolerance when runs have one, else steps."""
    varied = varied_axes(rows)
    if varied:
        samplers = [r for r in rows if r["role"] == "sampler"]
        return max(varied, key=lambda axis: len({r[axis[0]] for r in samplers if r[axis[0]] is not None}))
    if any(r["role"] == "sampler" and r["tolerance"] is not None for r in rows):
        return SWEEP_AXES[0]
    return SWEEP_AXES[1]


def plot_series(rows: list[dict]) -> tuple[tuple[str, str, bool], dict[str, list[dict]]]:
    """(x axis, {line name: sampler rows sorted along it}): one line per sampler and value of the other
    varied options, so that every line varies only along the axis."""
    axis = sweep_axis(rows)
    others = [a for a in varied_axes(rows) if a != axis]
    series = defaultdict(list)
    for r in rows:
        if r["role"] != "sampler" or r[axis[0]] is None:
            continue
        name = str(r.get("sampler_name") or r["sampler"])
        fixed = [f"{label} {r[key]:g}" for key, label, _ in others if r[key] is not None]
        if axis[0] != "num_inference_steps" and r["num_inference_steps"] is not None and \
                not any(key == "num_inference_steps" for key, _, _ in others):
            fixed.append(f"{r['num_inference_steps']} steps")  # in the legend, whether or not the label shows it
        series[name + (f" ({', '.join(fixed)})" if fixed else "")].append(r)
    for points in series.values():
        points.sort(key=lambda r: r[axis[0]])
    return axis, dict(series)


def plot_rows(rows: list[dict], path: Path) -> None:
    """p50 speedup and success against the swept option (``sweep_axis``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (key, label, log), series = plot_series(rows)
    fig, (speed_ax, success_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in series.items():
        x = [r[key] for r in points]
        if any(r["speedup_p50"] is not None for r in points):
            speed_ax.plot(x, [r["speedup_p50"] or float("nan") for r in points], "o-", label=name)
        rate = [r["success_rate"] for r in points]
        err = [[r["success_rate"] - r["success_ci95"][0] for r in points],
               [r["success_ci95"][1] - r["success_rate"] for r in points]]
        success_ax.errorbar(x, rate, yerr=err, fmt="o-", capsize=3, label=name)
    for ax, title, ylabel in ((speed_ax, f"p50 latency speedup vs {label}", "speedup over baseline"),
                              (success_ax, f"success vs {label} (95% Wilson)", "success rate")):
        ax.set(xscale="log" if log else "linear", xlabel=label, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fixed_latency_ms(row: dict) -> float | None:
    """The fixed latency of a real-time row in ms (None for measured or replayed latencies)."""
    try:
        return float(row["latency"])
    except (TypeError, ValueError, KeyError):
        return None


def realtime_series(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """Real-time rows with a fixed latency: ``{env: {series: rows by latency}}``, one series per
    (sampler, timing, transition)."""
    series: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("timing", "sync") != "sync" and fixed_latency_ms(r) is not None:
            name = f"{r['sampler']} {r['timing']}" + (f" {r['transition']}" if r["timing"] == "async" else "")
            series[str(r["env"])][name].append(r)
    for by_name in series.values():
        for points in by_name.values():
            points.sort(key=fixed_latency_ms)
    return {env: dict(by_name) for env, by_name in series.items()}


def format_realtime_rows(rows: list[dict]) -> str:
    """Real-time rows (timing async / hold, and sync rows of the same env) by env, timing, transition and
    latency: success, mean delay, stalls and task time."""
    timed = [r for r in rows if r.get("timing", "sync") != "sync" or r.get("task_time_s") is not None]
    if not timed:
        return ""
    header = (f"{'env':<8} {'sampler':<14} {'timing':>6} {'transition':>11} {'latency':>9} {'delay':>6} "
              f"{'success':>8} {'95% CI':>15} {'stalls':>7} {'task s':>7}  dir")
    lines = [header, "-" * len(header)]
    order = lambda r: (str(r["env"]), r["sampler"], r["timing"], str(r["transition"]), fixed_latency_ms(r) or 0.0)
    for r in sorted(timed, key=order):
        lo, hi = r["success_ci95"]
        latency = r["latency"] or "-" if fixed_latency_ms(r) is None else f"{fixed_latency_ms(r):g} ms"
        transition = r["transition"] if r["timing"] == "async" else "-"
        lines.append(f"{str(r['env']):<8} {r['sampler']:<14} {r['timing']:>6} {str(transition):>11} "
                     f"{str(latency)[:9]:>9} {r['delay_steps'] or 0:>6.2f} {r['success_rate']:>8.2f} "
                     f"{f'[{lo:.2f}, {hi:.2f}]':>15} {r['stall_steps'] or 0:>7.1f} {r['task_time_s']:>7.2f}  {r['dir']}")
    return "\n".join(lines)


def plot_realtime(rows: list[dict], path: Path) -> bool:
    """Success and mean task time against latency (a ``-m latency=...`` sweep), one row of plots per env;
    False if there are no such rows."""
    series = realtime_series(rows)
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(series), 2, figsize=(11, 4 * len(series)), squeeze=False)
    for (env, by_name), (success_ax, time_ax) in zip(sorted(series.items()), axes):
        for name, points in by_name.items():
            latency = [fixed_latency_ms(r) for r in points]
            rate = [r["success_rate"] for r in points]
            err = [[r["success_rate"] - r["success_ci95"][0] for r in points],
                   [r["success_ci95"][1] - r["success_rate"] for r in points]]
            success_ax.errorbar(latency, rate, yerr=err, fmt="o-", capsize=3, label=name)
            time_ax.plot(latency, [r["task_time_s"] for r in points], "o-", label=name)
        success_ax.set(xlabel="policy latency [ms]", ylabel="success rate", title=f"{env}: success vs latency (95% Wilson)")
        time_ax.set(xlabel="policy latency [ms]", ylabel="mean task time [s]", title=f"{env}: task time vs latency")
        for ax in (success_ax, time_ax):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
