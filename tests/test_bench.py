"""Latency benchmark CLI (parapolicy.bench) on a tiny checkpoint and a tiny synthetic dataset."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from parapolicy.bench import (build_jobs, denoiser_networks, expand_sampler_names, headline, interpolate,
                              predict_latency, twin_name)
from policy_synthetic import learnable_hdf5, tiny_policy
from parapolicy.policy.accel import CPU_BACKENDS


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from parapolicy.policy import save_checkpoint

    root = tmp_path_factory.mktemp("bench")
    return save_checkpoint(tiny_policy(), root / "ckpt"), learnable_hdf5(root / "square.hdf5", n_demos=3, length=30)


def tiny_cfg(**overrides):
    cfg = {"samplers": ["ddpm", "paraddpm"], "num_inference_steps": 6, "sampler_options": {}, "twins": {},
           "windows": [], "window_sampler": "paraddpm",
           "denoiser": {"full_size": False, "full_size_down_dims": [16, 32], "full_size_step_embed_dim": 16},
           "seed": 0}
    cfg.update(overrides)
    return OmegaConf.create(cfg)


def test_twins_and_sampler_names():
    assert twin_name("paraddpm", {}) == "ddpm" and twin_name("paradpmsolver", {}) == "dpmsolver"
    assert twin_name("ddim", {}) is None and twin_name("paraddim", {"paraddim": "ddpm"}) == "ddpm"
    notes = []
    assert expand_sampler_names(["ddpm", "nosuch", "ddpm", "paraddim"], notes) == [("ddpm", "ddpm"), ("paraddim", "paraddim")]
    assert any("nosuch" in n and "skipped" in n for n in notes)
    names = dict(expand_sampler_names(["srds", "parataa"], notes))  # conf/sampler files name the sampler
    assert names == {"srds": "parasrdsddpm", "parataa": "parataaddpm"}


def test_build_jobs_adds_missing_twins():
    notes = []
    cfg = tiny_cfg(samplers=["paraddim", "ddpm", "srds"], windows=[2, 4],
                   sampler_options={"paraddim": {"tolerance": 0.05}}, twins={"srds": "ddim"})
    phases = build_jobs(cfg, tiny_policy(), notes)
    jobs = {job.label: job for job in phases["samplers"]}
    # 6 steps differ from every config file's (15 / 100): the labels say so
    # ddim added as paraddim's twin (trailing, as in both config files); srds's twin is ddim with the
    # checkpoint's leading spacing, which the label shows
    assert list(jobs) == ["paraddim-6", "ddpm-6", "srds-6", "ddim-6", "ddim-6-leading"]
    assert jobs["paraddim-6"].twin == "ddim-6" and jobs["ddpm-6"].twin is None
    assert jobs["srds-6"].name == "parasrdsddpm" and jobs["srds-6"].twin == "ddim-6-leading"  # twins override by label
    assert jobs["ddim-6"].policy.sampler.scheduler.config.timestep_spacing == "trailing"
    assert jobs["ddim-6-leading"].policy.sampler.scheduler.config.timestep_spacing == "leading"
    assert jobs["paraddim-6"].options["tolerance"] == 0.05 and jobs["paraddim-6"].policy.sampler.tolerance == 0.05
    assert all(job.steps == 6 and job.policy.sampler.num_inference_steps == 6 for job in jobs.values())
    assert all(job.describe()["steps"] == 6 and job.fast == "off" for job in jobs.values())
    assert "window" not in jobs["ddim-6"].options  # only the options the twin takes
    windows = {job.label: job for job in phases["windows"]}
    assert list(windows) == ["paraddpm-6-w2", "paraddpm-6-w4", "ddpm-6"]  # one shared twin
    assert [windows[f"paraddpm-6-w{w}"].policy.sampler.window for w in (2, 4)] == [2, 4]
    assert any("added ddim-6" in n for n in notes)


def test_labels_keep_config_steps_and_modes_pair_up():
    """A sampler at its config file's schedule length keeps its bare name; with fast modes each job
    has a +fast variant whose twin is the twin's +fast variant; tolerances sweep with windows."""
    from parapolicy.policy.accel import FastPath

    policy = tiny_policy()
    fast_policy = tiny_policy()
    fast_policy.fast_path = FastPath()
    cfg = tiny_cfg(samplers=["paraddim"], num_inference_steps=None, windows=[4], window_tolerances=[0.05, 0.2])
    phases = build_jobs(cfg, policy, [], ("off", "on"), fast_policy)
    jobs = {job.label: job for job in phases["samplers"]}
    assert list(jobs) == ["paraddim", "ddim", "paraddim+fast", "ddim+fast"]  # 15 steps as in the yaml files
    assert jobs["paraddim+fast"].twin == "ddim+fast" and jobs["paraddim+fast"].base == "paraddim"
    assert jobs["paraddim+fast"].twin_base == "ddim" and jobs["paraddim"].twin_base == "ddim"
    assert jobs["paraddim+fast"].policy.fast_path is fast_policy.fast_path and jobs["paraddim"].policy.fast_path is None
    assert jobs["ddim"].steps == 15
    labels = [job.label for job in phases["windows"]]
    assert labels[:3] == ["paraddpm-w4-tol0.05", "paraddpm-w4-tol0.2", "ddpm"]
    assert {job.options["tolerance"] for job in phases["windows"] if job.window} == {0.05, 0.2}


def test_headline_and_latency_model():
    """The honest speedup divides by the fastest twin variant; the model sums calls x per-call cost."""
    def row(label, base, fast, p50, twin=None, twin_base=None, **extra):
        return {"phase": "samplers", "label": label, "base_label": base, "fast_path": fast, "batch": 1,
                "steps": 100, "window": None, "twin": twin, "latency_ms": {"p50": p50}, **extra}
    rows = [row("ddpm", "ddpm", "off", 500.0), row("ddpm+fast", "ddpm", "on", 300.0),
            row("paraddpm", "paraddpm", "off", 250.0, "ddpm", speedup=2.0, fastest_twin="ddpm+fast",
                fastest_twin_p50_ms=300.0, speedup_vs_fastest_twin=1.2),
            row("paraddpm+fast", "paraddpm", "on", 200.0, "ddpm+fast", speedup=1.5, fastest_twin="ddpm+fast",
                fastest_twin_p50_ms=300.0, speedup_vs_fastest_twin=1.5)]
    (h,) = headline(rows)
    assert h["best"] == "paraddpm+fast" and h["fastest_twin"] == "ddpm+fast" and h["speedup"] == 1.5
    assert h["eager_speedup"] == 2.0
    curve = {1: 4.0, 4: 7.0, 16: 13.0}
    assert interpolate(curve, 4) == 7.0 and interpolate(curve, 10) == pytest.approx(10.0)
    assert interpolate(curve, 32) == pytest.approx(21.0)  # beyond the ends: the last segment's slope
    den = [{"network": "checkpoint", "fast_path": f, "batch": 1, "k": k, "latency_ms": {"p50": v * (1 if f == "off" else 0.5)}}
           for f in ("off", "on") for k, v in curve.items()]
    eager = {"fast_path": "off", "batch": 1, "rounds_mean": 10.0, "model_evals_mean": 100.0}
    assert predict_latency(eager, den) == pytest.approx(10 * 10.0)  # 10 rounds at mean K = 10
    fast = {"fast_path": "on", "batch": 1, "rounds_mean": 3.0, "model_evals_mean": 30.0,
            "calls_per_bucket": {"1": 1.0, "16": 2.0}}
    assert predict_latency(fast, den) == pytest.approx(1 * 2.0 + 2 * 6.5)


def test_full_size_network_is_optional():
    policy = tiny_policy()
    assert [name for name, _ in denoiser_networks(tiny_cfg(), policy)] == ["checkpoint"]
    cfg = tiny_cfg(denoiser={"full_size": True, "full_size_down_dims": [16, 32, 64], "full_size_step_embed_dim": 32})
    (_, _), (name, full) = denoiser_networks(cfg, policy)
    assert name == "full_size" and full.config.down_dims == [16, 32, 64]
    assert full.config.obs_dim == policy.config.obs_dim and full.config.action_dim == policy.config.action_dim


def test_bench_cli_writes_bench_json(files, tmp_path):
    """One tiny run: both modes of every sampler, the honest speedup, the window sweep, the model."""
    checkpoint, dataset = files
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "parapolicy.bench", f"checkpoint={checkpoint}", f"dataset={dataset}",
           "obs_source=dataset", "n_obs=4", "samplers=[ddpm,paraddpm,nosuch]", "num_inference_steps=6",
           "repetitions=2", "warmup=1", "batch_sizes=[1]", "windows=[2]", "denoiser.k=[1,2,6]",
           "denoiser.repetitions=1", "denoiser.warmup=1", "denoiser.full_size=true",
           "denoiser.full_size_down_dims=[16,32]", "denoiser.full_size_step_embed_dim=16",
           "torch_threads=1", "progress_bar=false", f"out={out}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "PARAPOLICY_CACHE": str(tmp_path / "cache")}  # exported graphs: not the user's cache
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "speedup over the fastest sequential twin" in proc.stdout and "paraddpm-6+fast" in proc.stdout
    assert "fast-path backends per shape" in proc.stdout

    result = json.loads((out / "bench.json").read_text())
    assert set(result) >= {"meta", "samplers", "windows", "denoiser", "notes", "headline"}
    meta = result["meta"]
    assert meta["device"] == "cpu" and meta["torch_threads"] == 1 and meta["fast_path_modes"] == ["off", "on"]
    assert meta["preset"] == "quick" and meta["duration_s"] > 0
    fast_stats = meta["fast_path"]["stats"]
    assert set(fast_stats["backends"]) == {"K1xB1", "K6xB1", "K2xB1"}  # ddpm, paraddpm (window 16 -> 6), window 2
    assert set(fast_stats["backends"].values()) <= set(CPU_BACKENDS) and fast_stats["warmup_s_total"] > 0
    assert meta["obs_source"].startswith("dataset") and meta["command"].startswith("python -m parapolicy.bench")
    assert any("nosuch" in note for note in result["notes"])

    rows = {r["label"]: r for r in result["samplers"]}
    assert set(rows) == {"ddpm-6", "paraddpm-6", "ddpm-6+fast", "paraddpm-6+fast"}
    for row in rows.values():
        lat = row["latency_ms"]
        assert row["steps"] == 6 and row["batch"] == 1 and row["converged_fraction"] == 1.0
        assert lat["n"] == 2 and len(row["latencies_ms"]) == 2 and 0 < lat["p50"] <= lat["p95"]
        assert row["predicted_ms"] > 0
    seq, par = rows["ddpm-6"], rows["paraddpm-6"]
    seq_fast, par_fast = rows["ddpm-6+fast"], rows["paraddpm-6+fast"]
    assert seq["rounds_mean"] == 6 and seq["model_evals_mean"] == 6 and seq["twin"] is None and seq["speedup"] is None
    assert seq["fast_path"] == "off" and seq_fast["fast_path"] == "on" and seq_fast["fast_path_warmup_s"] > 0
    assert seq_fast["calls_per_bucket"] == {"1": 6.0} and seq["calls_per_bucket"] is None
    assert 1 <= par["rounds_mean"] <= 6 and par["twin"] == "ddpm-6" and par_fast["twin"] == "ddpm-6+fast"
    assert par["deviation_vs_twin"]["max"] >= 0 and par_fast["deviation_vs_eager"]["max"] <= 1e-3
    assert seq_fast["deviation_vs_eager"]["max"] <= 1e-3  # the fast path: eager within float rounding, amplified by 6 steps
    p50 = {label: row["latency_ms"]["p50"] for label, row in rows.items()}
    fastest = min(("ddpm-6", "ddpm-6+fast"), key=p50.get)
    for row in (par, par_fast):  # same-mode speedup, and the honest one against the fastest twin
        assert row["speedup"] == pytest.approx(p50[row["twin"]] / row["latency_ms"]["p50"], rel=1e-12)
        assert row["fastest_twin"] == fastest
        assert row["speedup_vs_fastest_twin"] == pytest.approx(p50[fastest] / row["latency_ms"]["p50"], rel=1e-12)
    (top,) = [h for h in result["headline"] if h["phase"] == "samplers"]
    assert top["sampler"] == "paraddpm-6" and top["best"] == min(("paraddpm-6", "paraddpm-6+fast"), key=p50.get)
    assert top["speedup"] == pytest.approx(p50[fastest] / p50[top["best"]], rel=1e-12)
    assert top["eager_speedup"] == pytest.approx(par["speedup"], rel=1e-12)
    best = rows[top["best"]]  # the model's speedup: a ratio of two predictions from the denoiser curve
    assert top["predicted_speedup"] == pytest.approx(rows[fastest]["predicted_ms"] / best["predicted_ms"], rel=1e-12)

    windows = {r["label"]: r for r in result["windows"]}
    assert set(windows) == {"paraddpm-6-w2", "ddpm-6", "paraddpm-6-w2+fast", "ddpm-6+fast"}
    w2 = windows["paraddpm-6-w2"]
    assert w2["window"] == 2 and w2["speedup"] == pytest.approx(windows["ddpm-6"]["latency_ms"]["p50"] / w2["latency_ms"]["p50"], rel=1e-12)
    assert w2["model_evals_mean"] <= 2 * w2["rounds_mean"]
    assert sum(windows["paraddpm-6-w2+fast"]["calls_per_bucket"].values()) == pytest.approx(w2["rounds_mean"])

    den = {(r["network"], r["fast_path"], r["k"]): r for r in result["denoiser"]}
    assert set(den) == {(n, f, k) for n in ("checkpoint", "full_size") for f in ("off", "on") for k in (1, 2, 6)}
    for (net, mode, k), row in den.items():
        assert row["rows"] == row["k"] * row["batch"] and row["latency_ms"]["p50"] > 0
        assert row["per_eval_ms"] == pytest.approx(row["latency_ms"]["p50"] / row["k"])
        assert (row["backend"] in CPU_BACKENDS) if mode == "on" else row["backend"] is None
    assert den["checkpoint", "off", 1]["throughput_gain"] == pytest.approx(1.0)
    for name in ("latency_vs_batch.png", "latency_vs_window.png", "denoiser_vs_k.png"):
        assert (out / name).stat().st_size > 0


def test_bench_single_mode_and_bad_fast_path(files, tmp_path):
    from parapolicy.bench import fast_modes

    cpu = __import__("torch").device("cpu")
    assert fast_modes(OmegaConf.create({"fast_path": "auto"}), cpu) == ["off"]
    assert fast_modes(OmegaConf.create({"fast_path": True}), cpu) == ["on"]
    with pytest.raises(ValueError, match="fast_path"):
        fast_modes(OmegaConf.create({"fast_path": "sometimes"}), cpu)


def test_bench_on_env_observations_prints_robosuite_lines_once(files, tmp_path):
    """No dataset: observations come from env resets. robosuite's start-up chatter stays out of both
    streams, and none of its lines reach the table's stream (stdout) through Hydra's root handler."""
    checkpoint, _ = files
    cmd = [sys.executable, "-m", "parapolicy.bench", f"checkpoint={checkpoint}", f"dataset={tmp_path / 'none.hdf5'}",
           "obs_source=auto", "n_obs=1", "samplers=[ddpm]", "num_inference_steps=2", "repetitions=1", "warmup=0",
           "batch_sizes=[1]", "windows=[]", "denoiser.k=[1]", "denoiser.repetitions=1", "denoiser.warmup=0",
           "fast_path=off", "torch_threads=1", "progress_bar=false", f"out={tmp_path / 'out'}",
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "using env" in proc.stdout  # the env path really ran
    assert "robosuite" not in proc.stdout and "private macro file" not in proc.stderr


def test_dp_networks_have_diffusion_policy_sizes():
    """With Square's dims (23-dim obs x 2 steps, 7-dim actions), dp_lowdim is DP's 65.9M low-dim U-Net;
    dp_image is DP's 255.6M hybrid-image U-Net (10-dim actions, 2 x 64 + 9 features per step); dp_transformer
    DP's 9.0M low-dim transformer (horizon 16).
    Counted on the meta device: no memory, no weights."""
    import torch

    from parapolicy.bench.networks import DP_NETWORKS, network_config
    from parapolicy.policy.networks import build_network

    base = tiny_policy().config
    assert (base.obs_dim, base.action_dim, base.n_obs_steps) == (23, 7, 2)
    counts = {}
    for name, spec in DP_NETWORKS.items():
        config = network_config(spec, base)
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in build_network(config).parameters())
        assert counts[name] == spec.num_parameters
    assert counts == {"dp_lowdim": 65_878_279, "dp_image": 255_612_042, "dp_transformer": 8_968_455}
    assert network_config(DP_NETWORKS["dp_transformer"], base).network["class"] == "TransformerForDiffusion"
    assert network_config(DP_NETWORKS["dp_image"], base).global_cond_dim == 274


def test_built_network_takes_its_own_dims_and_the_checkpoints_schedule():
    """Another conditioning width gets the identity normaliser (random features in [-1, 1]); the same
    width keeps the checkpoint's normaliser; both keep horizon, scheduler and sampler."""
    import torch

    from parapolicy.bench.networks import NetworkSpec, build_network, network_names, random_images

    policy = tiny_policy()
    policy.normalizer.obs.set_stats(torch.full((23,), -3.0), torch.full((23,), 5.0))
    image = build_network("dp_image", policy, spec=NetworkSpec((16, 32), 16, action_dim=10, obs_dim=137))
    assert image.config.global_cond_dim == 274 and image.config.action_dim == 10 and image.config.obs_keys == []
    assert image.normalizer.obs.min.tolist() == [-1.0] * 137 and image.sampler_name == policy.sampler_name
    assert image.scheduler_config == policy.scheduler_config and image.config.horizon == policy.config.horizon
    out = image.predict_action(torch.rand(3, 2, 137) * 2 - 1, generator=torch.Generator().manual_seed(0))
    assert out["action_pred"].shape == (3, 16, 10) and torch.isfinite(out["action_pred"]).all()
    same = build_network("dp_lowdim", policy, spec=NetworkSpec((16, 32), 16))
    assert same.normalizer.obs.min.tolist() == [-3.0] * 23 and same.config.obs_keys == policy.config.obs_keys
    assert build_network("checkpoint", policy) is policy
    cams = NetworkSpec((16, 32), 16, action_dim=10, obs_dim=9, image_keys=("agentview_image",), image_shape=(3, 24, 24),
                       vision={"backbone": "conv", "crop_shape": [20, 20], "num_kp": 8, "feature_dim": 16})
    seeing = build_network("dp_image", policy, spec=cams)
    assert seeing.config.global_cond_dim == 2 * (16 + 9) and seeing.obs_encoder is not None
    frames = random_images(seeing, 3)
    assert frames["agentview_image"].shape == (3, 2, 3, 24, 24) and frames["agentview_image"].dtype == torch.uint8
    out = seeing.predict_action(torch.zeros(3, 2, 9), images=frames, generator=torch.Generator().manual_seed(0))
    assert out["action_pred"].shape == (3, 16, 10) and out["encode_ms"] > 0
    assert random_images(policy, 3) is None
    assert network_names(["dp_image", "checkpoint", "dp_image"]) == ["dp_image", "checkpoint"]
    with pytest.raises(ValueError, match="unknown network"):
        network_names("dp_huge")


def test_bench_cli_times_a_dp_size_network(files, tmp_path):
    """network=dp_lowdim: the sampler rows and the model run DP's 65.9M U-Net (random weights) on the
    checkpoint's observations; the denoiser curve starts with it."""
    checkpoint, dataset = files
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "parapolicy.bench", f"checkpoint={checkpoint}", f"dataset={dataset}",
           "obs_source=dataset", "n_obs=2", "network=dp_lowdim", "samplers=[paraddpm]", "num_inference_steps=3",
           "repetitions=1", "warmup=0", "batch_sizes=[1]", "windows=[]", "denoiser.k=[1,2]",
           "denoiser.repetitions=1", "denoiser.warmup=0", "fast_path=off", "plots=false",
           "torch_threads=1", "progress_bar=false", f"out={out}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "network dp_lowdim, 65.9M" in proc.stdout
    result = json.loads((out / "bench.json").read_text())
    net = result["meta"]["network"]
    assert net["name"] == "dp_lowdim" and net["num_parameters"] == 65_878_279 and net["random_weights"]
    assert net["down_dims"] == [256, 512, 1024] and result["meta"]["obs_source"].startswith("dataset")
    assert {r["label"] for r in result["samplers"]} == {"paraddpm-3", "ddpm-3"}
    assert {r["network"] for r in result["denoiser"]} == {"dp_lowdim"}
    assert all(r["predicted_ms"] > 0 for r in result["samplers"])  # the model reads the dp_lowdim curve


def test_sampler_at_steps():
    """name@steps: that sampler at that schedule length, labelled like the eval (ddim-10); the twin of a
    parallel sampler at its own length; a bad length is refused."""
    cfg = tiny_cfg(samplers=["ddim@10", "paraddim@6", "ddim@10"], num_inference_steps=None)
    jobs = {job.label: job for job in build_jobs(cfg, tiny_policy(), [])["samplers"]}
    assert list(jobs) == ["ddim-10", "paraddim-6", "ddim-6"]  # listed twice: timed once
    assert jobs["ddim-10"].steps == 10 and jobs["ddim-10"].policy.sampler.num_inference_steps == 10
    assert jobs["paraddim-6"].twin == "ddim-6" and jobs["ddim-6"].steps == 6
    with pytest.raises(ValueError, match="positive number of steps"):
        build_jobs(tiny_cfg(samplers=["ddim@zero"]), tiny_policy(), [])


def test_deviation_vs_twin_is_the_gap_between_the_same_calls(one_thread):
    """``deviation_vs_twin`` is, call for call, max |parallel - sequential| for the same observations and
    the same noise (seed + r): ~0 for Picard at a tight tolerance, the real gap at a loose one. A bench
    that gave the twin other noise, or compared against another call, reports numbers that differ."""
    import torch

    from parapolicy.bench.jobs import Job, with_sampler
    from parapolicy.bench.timed_calls import summarize_phase, time_phase

    policy = tiny_policy()
    cfg = policy.config
    steps = 8
    policy.set_sampler("ddpm", steps)
    generator = torch.Generator().manual_seed(0)
    low, high = policy.normalizer.obs.min, policy.normalizer.obs.max
    obs_pool = low + torch.rand(5, cfg.n_obs_steps, cfg.obs_dim, generator=generator) * (high - low)
    options = {"tight": {"window": 4, "tolerance": 1e-7}, "loose": {"window": 8, "tolerance": 0.5}}
    jobs = [Job(label="ddpm", name="ddpm", steps=steps, options={}, policy=with_sampler(policy, "ddpm", steps))]
    for label, opts in options.items():
        jobs.append(Job(label=label, name="paraddpm", steps=steps, options=opts, twin="ddpm",
                        policy=with_sampler(policy, "paraddpm", steps, **opts)))
    run = OmegaConf.create({"seed": 11, "warmup": 0, "repetitions": 3})
    records = time_phase(jobs, obs_pool, 2, run, torch.device("cpu"))

    def plan(job, r):  # the call r of the bench, made again here
        rows = [(r * 2 + i) % 5 for i in range(2)]
        out = job.policy.predict_action(obs_pool[rows], generator=torch.Generator().manual_seed(11 + r))
        return out["action_pred"]

    for job in jobs[1:]:
        expected = [float((plan(job, r) - plan(jobs[0], r)).abs().max()) for r in range(3)]
        assert records[job.label].deviation == pytest.approx(expected, abs=1e-7)
    assert max(records["tight"].deviation) < 1e-4 < max(records["loose"].deviation)
    rows = {row["label"]: row for row in summarize_phase("samplers", jobs, 2, records)}
    assert rows["tight"]["deviation_vs_twin"]["max"] == max(records["tight"].deviation)
    assert rows["loose"]["deviation_vs_twin"]["p50"] == pytest.approx(float(np.median(records["loose"].deviation)))
    assert rows["ddpm"]["deviation_vs_twin"] is None
