"""Latency benchmark CLI (parapolicy.bench) on a tiny checkpoint and a tiny synthetic dataset."""

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from parapolicy.bench import build_jobs, denoiser_networks, expand_sampler_names, twin_name
from policy_synthetic import learnable_hdf5, tiny_policy


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
    assert list(jobs) == ["paraddim", "ddpm", "srds", "ddim"]  # ddim added as paraddim's twin
    assert jobs["paraddim"].twin == "ddim" and jobs["ddpm"].twin is None
    assert jobs["srds"].name == "parasrdsddpm" and jobs["srds"].twin == "ddim"  # twins override by label
    assert jobs["paraddim"].options["tolerance"] == 0.05 and jobs["paraddim"].policy.sampler.tolerance == 0.05
    assert all(job.steps == 6 and job.policy.sampler.num_inference_steps == 6 for job in jobs.values())
    assert "window" not in jobs["ddim"].options  # only the options the twin takes
    windows = {job.label: job for job in phases["windows"]}
    assert list(windows) == ["paraddpm-w2", "paraddpm-w4", "ddpm"]  # one shared twin
    assert [windows[f"paraddpm-w{w}"].policy.sampler.window for w in (2, 4)] == [2, 4]
    assert any("added ddim" in n for n in notes)


def test_full_size_network_is_optional():
    policy = tiny_policy()
    assert [name for name, _ in denoiser_networks(tiny_cfg(), policy)] == ["checkpoint"]
    cfg = tiny_cfg(denoiser={"full_size": True, "full_size_down_dims": [16, 32, 64], "full_size_step_embed_dim": 32})
    (_, _), (name, full) = denoiser_networks(cfg, policy)
    assert name == "full_size" and full.config.down_dims == [16, 32, 64]
    assert full.config.obs_dim == policy.config.obs_dim and full.config.action_dim == policy.config.action_dim


def test_bench_cli_writes_bench_json(files, tmp_path):
    checkpoint, dataset = files
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "parapolicy.bench", f"checkpoint={checkpoint}", f"dataset={dataset}",
           "obs_source=dataset", "n_obs=4", "samplers=[ddpm,paraddpm,nosuch]", "num_inference_steps=6",
           "repetitions=1", "warmup=1", "batch_sizes=[1]", "windows=[2]", "denoiser.k=[1,2]",
           "denoiser.repetitions=1", "denoiser.warmup=1", "denoiser.full_size_down_dims=[16,32]",
           "denoiser.full_size_step_embed_dim=16", "torch_threads=1", "progress_bar=false", f"out={out}",
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "speedup" in proc.stdout and "paraddpm" in proc.stdout

    result = json.loads((out / "bench.json").read_text())
    assert set(result) >= {"meta", "samplers", "windows", "denoiser", "notes"}
    meta = result["meta"]
    assert meta["device"] == "cpu" and meta["torch_threads"] == 1 and meta["fast_path"] is None
    assert meta["obs_source"].startswith("dataset") and meta["command"].startswith("python -m parapolicy.bench")
    assert any("nosuch" in note for note in result["notes"])

    rows = {(r["label"], r["batch"]): r for r in result["samplers"]}
    assert set(rows) == {("ddpm", 1), ("paraddpm", 1)}
    seq, par = rows["ddpm", 1], rows["paraddpm", 1]
    assert seq["rounds_mean"] == 6 and seq["model_evals_mean"] == 6 and seq["twin"] is None and seq["speedup"] is None
    assert 1 <= par["rounds_mean"] <= 6 and par["twin"] == "ddpm" and par["deviation_vs_twin"]["max"] >= 0
    for row in (seq, par):
        lat = row["latency_ms"]
        assert lat["n"] == 1 and len(row["latencies_ms"]) == 1 and 0 < lat["p50"] <= lat["p95"]
        assert set(lat) >= {"p50", "p95", "mean"} and row["converged_fraction"] == 1.0
    assert par["speedup"] == pytest.approx(seq["latency_ms"]["p50"] / par["latency_ms"]["p50"], rel=1e-12)

    windows = {r["label"]: r for r in result["windows"]}
    assert set(windows) == {"paraddpm-w2", "ddpm"} and windows["paraddpm-w2"]["window"] == 2
    w2 = windows["paraddpm-w2"]
    assert w2["speedup"] == pytest.approx(windows["ddpm"]["latency_ms"]["p50"] / w2["latency_ms"]["p50"], rel=1e-12)
    assert w2["model_evals_mean"] <= 2 * w2["rounds_mean"]

    den = {(r["network"], r["k"]): r for r in result["denoiser"]}
    assert set(den) == {("checkpoint", 1), ("checkpoint", 2), ("full_size", 1), ("full_size", 2)}
    for row in den.values():
        assert row["rows"] == row["k"] * row["batch"] and row["latency_ms"]["p50"] > 0
        assert row["per_eval_ms"] == pytest.approx(row["latency_ms"]["p50"] / row["k"])
    assert den["checkpoint", 1]["throughput_gain"] == pytest.approx(1.0)
    for name in ("latency_vs_batch.png", "latency_vs_window.png", "denoiser_vs_k.png"):
        assert (out / name).stat().st_size > 0
