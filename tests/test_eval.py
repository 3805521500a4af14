"""Closed-loop evaluation CLI on a tiny random Lift checkpoint (short episodes)."""

import json
import re
import subprocess
import sys

import pytest

from parapolicy.evaluation.metrics import summarize_run, wilson_interval

LIFT_KEYS = ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
FAST = ["env=lift", "sampler.num_inference_steps=8", "max_episode_steps=12", "progress_bar=false",
        "torch_threads=1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from parapolicy.policy import DiffusionPolicy, save_checkpoint
    from policy_synthetic import tiny_config

    torch.manual_seed(0)
    policy = DiffusionPolicy(tiny_config(obs_dim=19, obs_keys=LIFT_KEYS, env="lift"))
    policy.normalizer.obs.set_stats(-torch.ones(19), torch.ones(19) * 2)
    policy.normalizer.action.set_stats(-torch.ones(7), torch.ones(7))
    return save_checkpoint(policy, tmp_path_factory.mktemp("ckpt") / "lift")


def run_eval(*args, multirun=False, timeout=600):
    cmd = [sys.executable, "-m", "parapolicy.eval", *(["-m"] if multirun else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_wilson_interval_reference_values():
    lo, hi = wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    lo, hi = wilson_interval(50, 50)
    assert round(lo, 4) == 0.9287 and hi == 1.0


def test_summary_of_episodes():
    episodes = [
        {"success": True, "length": 10, "wall_s": 1.0, "calls": [{"latency_ms": 10.0, "rounds": 4, "model_evals": 20}]},
        {"success": False, "length": 30, "wall_s": 3.0, "error": "boom",
         "calls": [{"latency_ms": 30.0, "rounds": 6, "model_evals": 40, "converged": False}]},
    ]
    summary = summarize_run(episodes)
    assert summary["success_rate"] == 0.5 and summary["n_errors"] == 1
    assert summary["latency_ms"]["p50"] == 20.0 and summary["rounds_mean"] == 5.0
    assert summary["control_hz"] == 10.0 and summary["unconverged_calls"] == 1


def test_closed_loop_run_writes_summary_and_episodes(checkpoint, tmp_path):
    out = tmp_path / "run"
    proc = run_eval(*FAST, f"checkpoint={checkpoint}", "n_episodes=2", "shadow=true", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "p50 latency speedup over baseline" in proc.stdout and "paraddpm-8" in proc.stdout
    # robosuite's log lines: not in the table's stream (Hydra's root handler), start-up chatter dropped
    assert "robosuite" not in proc.stdout and "private macro file" not in proc.stderr

    # 8 steps, not the configs' 100: both labels show it
    episodes = read_lines(out / "episodes.jsonl")
    assert sorted((ep["run"], ep["episode"]) for ep in episodes) == [
        ("ddpm-8", 0), ("ddpm-8", 1), ("paraddpm-8", 0), ("paraddpm-8", 1)]
    for ep in episodes:
        assert ep["length"] == 12 and ep["seed"] == 100000 + ep["episode"]
        assert len(ep["calls"]) == 2  # 12 steps / 8 actions per call
        assert all(c["batch"] == 1 and c["latency_ms"] > 0 for c in ep["calls"])
    seq = [c for ep in episodes if ep["run"] == "ddpm-8" for c in ep["calls"]]
    par = [c for ep in episodes if ep["run"] == "paraddpm-8" for c in ep["calls"]]
    assert all(c["rounds"] == 8 and c["model_evals"] == 8 for c in seq)
    assert all(1 <= c["rounds"] <= 8 for c in par)
    assert all("shadow_deviation" in c and c["shadow_deviation"] >= 0 for c in par)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["env"] == "lift" and summary["baseline"] == "ddpm-8"
    assert set(summary["runs"]) == {"paraddpm-8", "ddpm-8"}
    for run in summary["runs"].values():
        assert run["n_episodes"] == 2 and set(run["latency_ms"]) == {"mean", "p50", "p95", "p99"}
        lo, hi = run["success_ci95"]
        assert 0.0 <= lo <= run["success_rate"] <= hi <= 1.0
        assert run["control_hz"] > 0
    assert summary["speedup_p50"] == pytest.approx(
        summary["runs"]["ddpm-8"]["latency_ms"]["p50"] / summary["runs"]["paraddpm-8"]["latency_ms"]["p50"])
    assert "shadow" in summary["runs"]["paraddpm-8"]
    assert (out / "latency.png").stat().st_size > 1000


def test_resume_continues_an_interrupted_run(checkpoint, tmp_path):
    out = tmp_path / "run"
    args = [*FAST, f"checkpoint={checkpoint}", "n_episodes=2", "baseline=null", f"hydra.run.dir={out}"]
    assert run_eval(*args).returncode == 0
    log = out / "episodes.jsonl"
    first = read_lines(log)[0]
    # an interruption: the second episode never finished and its line was cut mid-write
    log.write_text(json.dumps(first) + "\n" + '{"run": "paraddpm-8", "epis')
    proc = run_eval(*args, "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    episodes = read_lines(out / "episodes.jsonl")
    assert [ep["episode"] for ep in episodes] == [0, 1]
    assert episodes[0] == first  # kept, not re-run
    assert json.loads((out / "summary.json").read_text())["runs"]["paraddpm-8"]["n_episodes"] == 2


def test_run_split_by_first_episode_merges_into_one_summary(checkpoint, tmp_path):
    """Two processes each run part of the episodes; their logs concatenated and resumed give one summary
    without running anything again."""
    args = [*FAST, f"checkpoint={checkpoint}", "baseline=null"]
    head, tail, merged = tmp_path / "head", tmp_path / "tail", tmp_path / "merged"
    assert run_eval(*args, "n_episodes=1", f"hydra.run.dir={head}").returncode == 0
    proc = run_eval(*args, "first_episode=1", "n_episodes=2", f"hydra.run.dir={tail}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 episodes per sampler, seeds 100001..100001" in proc.stdout
    later = read_lines(tail / "episodes.jsonl")
    assert [(ep["episode"], ep["seed"]) for ep in later] == [(1, 100001)]

    merged.mkdir()
    lines = (head / "episodes.jsonl").read_text() + (tail / "episodes.jsonl").read_text()
    (merged / "episodes.jsonl").write_text(lines)
    proc = run_eval(*args, "n_episodes=2", "resume=true", f"hydra.run.dir={merged}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (merged / "episodes.jsonl").read_text() == lines  # nothing re-run
    summary = json.loads((merged / "summary.json").read_text())
    assert summary["first_episode"] == 0 and summary["runs"]["paraddpm-8"]["n_episodes"] == 2
    # a summary covers only its own range, even when the log holds more
    proc = run_eval(*args, "first_episode=1", "n_episodes=2", "resume=true", f"hydra.run.dir={merged}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((merged / "summary.json").read_text())["runs"]["paraddpm-8"]["n_episodes"] == 1


def test_multirun_over_two_samplers_and_report(checkpoint, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_eval(*FAST, f"checkpoint={checkpoint}", "n_episodes=1", "baseline=null", "sampler=ddpm,paraddpm",
                    f"hydra.sweep.dir={sweep}", multirun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    names = {next(iter(json.loads(p.read_text())["runs"])) for p in summaries}
    assert names == {"ddpm-8", "paraddpm-8"}

    report = subprocess.run([sys.executable, "-m", "parapolicy.report", str(sweep)], capture_output=True,
                            text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "ddpm-8" in report.stdout and "paraddpm-8" in report.stdout
    assert (sweep / "report.png").exists() and (sweep / "report.json").exists()


@pytest.mark.parametrize("override,message", [
    ("env=nope", "Could not find 'env/nope'"),
    ("sampler=nope", "Could not find 'sampler/nope'"),
    ("baseline=nope", "unknown baseline sampler 'nope'"),
    ("n_episodes=0", "n_episodes must be >= 1"),
    ("first_episode=10", "first_episode must be an integer in [0, n_episodes)"),
    ("checkpoint=/nonexistent/ckpt", "checkpoint /nonexistent/ckpt: folder not found"),
    ("baseline=ddim@1000", "must be an integer in [1, 100] (the checkpoint's num_train_timesteps), got '1000'"),
    ("sampler.timestep_spacing=trailling", "timestep_spacing must be one of leading, trailing, linspace"),
])
def test_bad_config_fails_before_any_env_starts(override, message, tmp_path):
    proc = run_eval("env=lift", "checkpoint=checkpoints/lift", override, f"hydra.run.dir={tmp_path}",
                    timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Loading controller configuration" not in proc.stderr  # robosuite never started


def test_baseline_by_registered_sampler_name():
    """A baseline may name a registered sampler without a config file (parasrdsddim lives in srds.yaml)."""
    from parapolicy.configs import sampler_config, sampler_kwargs

    name, steps, options = sampler_kwargs(sampler_config("parasrdsddim"))
    assert (name, steps, options) == ("parasrdsddim", None, {})
    name, steps, options = sampler_kwargs(sampler_config("srds"))  # the config file still wins
    assert name == "parasrdsddpm" and steps == 100 and options["tolerance"] == 0.1
    with pytest.raises(ValueError, match="registered samplers: .*parataaddim"):
        sampler_config("parafoo")


def plan(*overrides, checkpoint="checkpoints/lift"):
    """(label, steps, role) of every run an eval with these overrides would make (no simulator)."""
    from hydra import compose, initialize_config_module

    from parapolicy.policy.checkpoint import resolve_checkpoint
    from parapolicy.evaluation.runs import plan_runs

    with initialize_config_module("parapolicy.conf", version_base=None):
        cfg = compose("eval", overrides=["env=lift", *overrides])
    return [(spec.label, spec.steps, spec.role) for spec in plan_runs(cfg, resolve_checkpoint(checkpoint))]


def test_labels_show_steps_that_differ_from_the_config_or_the_sampler():
    """Bare baselines take the sampler's schedule length (labelled when their config file says
    otherwise); name@steps and dicts keep their own (labelled when it differs from the sampler's)."""
    assert plan() == [("paraddpm", 100, "sampler"), ("ddpm", 100, "baseline")]
    assert plan("sampler.warm_start=true", "baseline=[ddim,ddim@15,ddim@10,ddpm@100,ddpm]") == [
        ("paraddpm+warm", 100, "sampler"), ("ddim-100", 100, "baseline"), ("ddim-15", 15, "baseline"),
        ("ddim-10", 10, "baseline"), ("ddpm", 100, "baseline"), ("ddpm-baseline", 100, "baseline")]
    assert plan("sampler=paraddim", "baseline=[ddim,parataaddim,ddpm,ddim@15,{name:ddpm,num_inference_steps:100}]") == [
        ("paraddim", 15, "sampler"), ("ddim", 15, "baseline"), ("parataaddim", 15, "baseline"),
        ("ddpm-15", 15, "baseline"), ("ddim-baseline", 15, "baseline"), ("ddpm-100", 100, "baseline")]
    # the sampler's own steps changed from its config file's: labelled, and its bare baselines follow
    assert plan("sampler=paraddim", "sampler.num_inference_steps=10", "baseline=[ddim,ddim@15]") == [
        ("paraddim-10", 10, "sampler"), ("ddim-10", 10, "baseline"), ("ddim-15", 15, "baseline")]
    # a registered sampler without a config file of its own: only the sampler's steps count
    assert plan("sampler=srds", "sampler.name=parasrdsddim", "sampler.num_inference_steps=15",
                "baseline=[ddim,parataaddim]") == [
        ("parasrdsddim-15", 15, "sampler"), ("ddim", 15, "baseline"), ("parataaddim", 15, "baseline")]


@pytest.mark.parametrize("override, message", [
    ("baseline=ddim@0", "baseline 'ddim@0': the steps after '@' must be an integer in [1, 100]"),
    ("baseline=[ddpm,ddim@abc]", "baseline 'ddim@abc': the steps after '@' must be an integer in [1, 100]"),
    ("baseline=ddim@", "baseline 'ddim@': the steps after '@' must be an integer in [1, 100]"),
    ("baseline=[{name:ddim,num_inference_steps:0}]", "num_inference_steps must be an integer in [1, 100]"),
    ("baseline=[{num_inference_steps:15}]", "a dict entry needs a 'name'"),
    ("sampler.num_inference_steps=101", "sampler.num_inference_steps must be an integer in [1, 100]"),
])
def test_bad_step_counts_fail_in_validate(override, message):
    """validate() (it runs before any env is made; see the subprocess test above) rejects them."""
    from hydra import compose, initialize_config_module

    from parapolicy.evaluation import validate

    with initialize_config_module("parapolicy.conf", version_base=None):
        cfg = compose("eval", overrides=["env=lift", "checkpoint=checkpoints/lift", override])
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(cfg)


def test_baselines_inherit_the_samplers_timestep_spacing():
    from hydra import compose, initialize_config_module

    from parapolicy.policy.checkpoint import resolve_checkpoint
    from parapolicy.evaluation.runs import plan_runs

    overrides = ["env=lift", "sampler=paraddim", "sampler.timestep_spacing=trailing",
                 "baseline=[ddim,{name:ddim,timestep_spacing:leading}]"]
    with initialize_config_module("parapolicy.conf", version_base=None):
        cfg = compose("eval", overrides=overrides)
    specs = plan_runs(cfg, resolve_checkpoint("checkpoints/lift"))
    assert [spec.options.get("timestep_spacing") for spec in specs] == ["trailing", "trailing", "leading"]


def test_baselines_with_their_own_steps_closed_loop(checkpoint, tmp_path):
    """One run compares a parallel sampler with bare, @steps and dict baselines: labels, per-run
    steps in the table and summary.json, rounds of the sequential runs equal to their steps, the
    spacing option reaching every run, and speedup_p50 against the first baseline."""
    out = tmp_path / "run"
    proc = run_eval(*FAST, f"checkpoint={checkpoint}", "n_episodes=1", "sampler.timestep_spacing=trailing",
                    "baseline=[ddpm,ddim@4,{name:ddim,num_inference_steps:8}]", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert list(runs) == ["paraddpm-8", "ddpm-8", "ddim-4", "ddim-8"]
    assert [runs[k]["steps"] for k in runs] == [8, 8, 4, 8]
    assert [runs[k]["role"] for k in runs] == ["sampler", "baseline", "baseline", "baseline"]
    assert {runs[k]["timestep_spacing"] for k in runs} == {"trailing"}
    assert summary["baseline"] == "ddpm-8" and summary["baselines"] == ["ddpm-8", "ddim-4", "ddim-8"]
    assert summary["speedup_p50"] == pytest.approx(runs["ddpm-8"]["latency_ms"]["p50"] / runs["paraddpm-8"]["latency_ms"]["p50"])
    episodes = read_lines(out / "episodes.jsonl")
    for label, steps in (("ddpm-8", 8), ("ddim-4", 4), ("ddim-8", 8)):
        calls = [c for ep in episodes if ep["run"] == label for c in ep["calls"]]
        assert calls and all(c["rounds"] == c["model_evals"] == steps for c in calls)
    table = proc.stdout[proc.stdout.index("sampler "):]
    rows = {line.split()[0]: line.split()[1] for line in table.splitlines()[2:6]}
    assert rows == {"paraddpm-8": "8", "ddpm-8": "8", "ddim-4": "4", "ddim-8": "8"}

    # resume: the same labels, nothing re-run; a log from before labels showed steps is read too
    lines = (out / "episodes.jsonl").read_text()
    again = run_eval(*FAST, f"checkpoint={checkpoint}", "n_episodes=1", "sampler.timestep_spacing=trailing",
                     "baseline=[ddpm,ddim@4,{name:ddim,num_inference_steps:8}]", f"hydra.run.dir={out}", "resume=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "episodes.jsonl").read_text() == lines
    assert list(json.loads((out / "summary.json").read_text())["runs"]) == list(runs)

    old = tmp_path / "old"
    old.mkdir()
    legacy = {"paraddpm-8": "paraddpm", "ddpm-8": "ddpm"}  # what earlier versions wrote for this run
    old_lines = [dict(ep, run=legacy[ep["run"]]) for ep in episodes if ep["run"] in legacy]
    (old / "episodes.jsonl").write_text("".join(json.dumps(ep) + "\n" for ep in old_lines))
    proc = run_eval(*FAST, f"checkpoint={checkpoint}", "n_episodes=1", f"hydra.run.dir={old}", "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    relabelled = read_lines(old / "episodes.jsonl")
    assert [ep["run"] for ep in relabelled] == [ep["run"] for ep in episodes if ep["run"] in legacy]  # none re-run
    assert [ep["calls"] for ep in relabelled] == [ep["calls"] for ep in old_lines]


def test_report_shows_each_runs_steps(tmp_path):
    """parapolicy.report: steps per run from summary.json (older summaries: the sampler's for all)."""
    from parapolicy.evaluation.sweeps import collect_rows, format_rows

    run = {"success_rate": 0.5, "success_ci95": [0.1, 0.9], "n_episodes": 2, "latency_ms": {"p50": 10.0},
           "rounds_mean": 4.0, "model_evals_mean": 40.0}
    new = {"env": "square", "sampler": {"name": "paraddpm", "num_inference_steps": 100, "tolerance": 0.1},
           "sampler_label": "paraddpm", "speedup_p50": 2.0,
           "runs": {"paraddpm": {**run, "steps": 100, "role": "sampler", "timestep_spacing": "leading"},
                    "ddim-15": {**run, "steps": 15, "role": "baseline", "timestep_spacing": "trailing"}}}
    old = {"env": "square", "sampler": {"name": "paraddim", "num_inference_steps": 15, "tolerance": 0.1},
           "sampler_label": "paraddim", "speedup_p50": 1.5, "runs": {"paraddim": run, "ddim": run}}
    for folder, summary in (("new", new), ("old", old)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "summary.json").write_text(json.dumps(summary))
    rows = collect_rows(tmp_path)
    assert [(r["sampler"], r["role"], r["num_inference_steps"]) for r in rows] == [
        ("paraddpm", "sampler", 100), ("ddim-15", "baseline", 15), ("paraddim", "sampler", 15), ("ddim", "baseline", 15)]
    table = format_rows(rows).splitlines()
    assert table[0].split()[:4] == ["sampler", "role", "steps", "spacing"]
    assert table[3].split()[:4] == ["ddim-15", "baseline", "15", "trailing"]
