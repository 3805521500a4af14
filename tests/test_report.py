"""parapolicy.report plots against whatever the sweep varied: tolerance, steps or window (one line per
sampler and value of the other varied options), not always against tolerance."""

from __future__ import annotations

import json
from pathlib import Path

from parapolicy.evaluation.sweeps import collect_rows, plot_rows, plot_series


def write_summary(folder: Path, steps: int, tolerance: float, window: int | None = None, name: str = "paraddpm"):
    folder.mkdir(parents=True)
    label = f"{name}-{steps}"
    run = {"success_rate": 0.5, "success_ci95": [0.2, 0.8], "n_episodes": 4, "latency_ms": {"p50": 10.0 + steps},
           "rounds_mean": 3.0, "model_evals_mean": 30.0}
    summary = {"env": "square", "sampler_label": label, "speedup_p50": 100.0 / steps + tolerance,
               "sampler": {"name": name, "num_inference_steps": steps, "tolerance": tolerance, "window": window},
               "runs": {label: {**run, "steps": steps, "role": "sampler"},
                        f"ddpm-{steps}": {**run, "steps": steps, "role": "baseline"}}}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_a_steps_sweep_is_plotted_against_steps(tmp_path):
    for k, steps in enumerate([6, 10, 20]):  # -m sampler.num_inference_steps=6,10,20
        write_summary(tmp_path / f"{k}_paraddpm", steps, tolerance=0.1)
    rows = collect_rows(tmp_path)
    (key, label, log), series = plot_series(rows)
    assert key == "num_inference_steps" and not log
    assert list(series) == ["paraddpm"] and [r["num_inference_steps"] for r in series["paraddpm"]] == [6, 10, 20]
    plot_rows(rows, tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 0


def test_a_tolerance_sweep_at_two_step_counts_gives_a_line_per_step_count(tmp_path):
    k = 0
    for steps in (10, 20):
        for tolerance in (0.01, 0.1, 1.0):
            write_summary(tmp_path / f"{k}", steps, tolerance)
            k += 1
    (key, _, log), series = plot_series(collect_rows(tmp_path))
    assert key == "tolerance" and log
    assert sorted(series) == ["paraddpm (denoising steps 10)", "paraddpm (denoising steps 20)"]
    assert all([r["tolerance"] for r in points] == [0.01, 0.1, 1.0] for points in series.values())


def test_a_window_sweep_and_a_single_run(tmp_path):
    for k, window in enumerate([2, 4, 8, 16]):
        write_summary(tmp_path / "windows" / f"{k}", 10, 0.1, window=window)
    (key, _, _), series = plot_series(collect_rows(tmp_path / "windows"))
    assert key == "window" and [r["window"] for r in series["paraddpm (10 steps)"]] == [2, 4, 8, 16]
    write_summary(tmp_path / "one", 10, 0.1)
    (key, _, _), series = plot_series(collect_rows(tmp_path / "one"))
    assert key == "tolerance" and len(series) == 1  # nothing varied: the tolerance axis, one point
