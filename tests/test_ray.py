"""executor=ray and the Ray sweep launcher against a real local Ray (loopback only, 2 CPUs, one instance
shared by the whole file): same episodes as a local run, a killed worker retried, an episode that keeps
failing logged as failed, resume, and a two-job sweep through hydra/launcher=ray_cluster."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
# the shipped Lift policy, DDIM-15 schedules, short episodes; shadow=true adds a per-call float (the
# deviation from the ddim twin on the same observations and noise) that only identical inputs reproduce
EVAL = ["env=lift", "checkpoint=checkpoints/lift", "sampler=paraddim", "baseline=ddim", "n_episodes=2",
        "max_episode_steps=24", "torch_threads=1", "shadow=true", "progress_bar=false"]
# Ray rewrites 127.0.0.1 to the machine's routable address (and binds every interface) unless this is 0;
# every process that starts or joins the test's Ray needs it
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray on loopback for the whole file; other processes join it by its GCS address."""
    saved = {k: os.environ.get(k) for k in LOOPBACK_ENV}
    os.environ.update(LOOPBACK_ENV)  # read when ray is imported
    import psutil
    import ray

    for attempt in range(2):  # Ray gives its raylet a fixed 30 s to register: on a loaded machine, retry once
        try:
            ctx = ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
            break
        except Exception as err:
            if attempt or "timed out during startup" not in str(err):
                raise
            ray.shutdown()
    try:
        address = ctx.address_info["gcs_address"]
        assert address.startswith("127.0.0.1:")
        listening = {(p.name(), c.laddr.ip) for p in psutil.Process().children(recursive=True)
                     for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        assert listening, "no Ray process listens"
        assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for _, ip in listening), listening
        yield address
    finally:
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def run_eval(*args, multirun=False, extra_env=None):
    env = {**os.environ, **LOOPBACK_ENV, **(extra_env or {})}
    cmd = [sys.executable, "-m", "parapolicy.eval", *(["-m"] if multirun else []), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=600):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"eval did not finish in {timeout} s: {err[-3000:]}")
    assert proc.returncode == 0, (out[-2000:], err[-4000:])
    return out


def read_log(path):
    return {(ep["run"], ep["episode"]): ep for ep in map(json.loads, path.read_text().splitlines())}


def assert_same_episode(a, b):
    """Same seed, outcome and per-call solver work; the same shadow deviation to float precision.
    Latencies differ (measured on different processes), so they are not compared."""
    for key in ("seed", "success", "length", "reward", "error"):
        assert a[key] == b[key], (key, a, b)
    assert len(a["calls"]) == len(b["calls"])
    for ca, cb in zip(a["calls"], b["calls"]):
        for key in ("rounds", "model_evals", "converged", "batch", "warm"):
            assert ca[key] == cb[key], (key, ca, cb)
        if "shadow_deviation" in ca or "shadow_deviation" in cb:
            assert ca["shadow_deviation"] == pytest.approx(cb["shadow_deviation"], rel=1e-5, abs=1e-7)


@pytest.fixture(scope="module")
def local_log(tmp_path_factory):
    """The same eval run locally, started at once (it runs while Ray starts); call it for its log."""
    out = tmp_path_factory.mktemp("local")
    proc = run_eval(*EVAL, f"hydra.run.dir={out}")
    log = {}

    def get():
        if not log:
            finish(proc)
            log.update(read_log(out / "episodes.jsonl"))
        return log

    yield get
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_ray_eval_equals_local_run(local_log, ray_address, tmp_path):
    out = tmp_path / "ray"
    stdout = finish(run_eval(*EVAL, "executor=ray", f"ray.address={ray_address}", "ray.num_workers=2",
                             f"hydra.run.dir={out}"))
    local_log = local_log()
    assert "paraddim" in stdout and "p50 latency speedup over baseline" in stdout
    episodes = read_log(out / "episodes.jsonl")
    assert sorted(episodes) == sorted(local_log) == [("ddim", 0), ("ddim", 1), ("paraddim", 0), ("paraddim", 1)]
    for key, ep in episodes.items():
        assert_same_episode(ep, local_log[key])
        assert ep["host"] and all(c["latency_ms"] > 0 for c in ep["calls"])
        assert "attempts" not in ep  # nothing was retried
    assert any("shadow_deviation" in c for ep in episodes.values() for c in ep["calls"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["executor"]["kind"] == "ray" and summary["executor"]["workers"] == 2
    assert summary["executor"]["replaced_workers"] == 0
    assert set(summary["executor"]["hosts"]) == {ep["host"] for ep in episodes.values()}
    assert all(run["n_episodes"] == 2 for run in summary["runs"].values())
    assert (out / "latency.png").stat().st_size > 1000


def test_killed_worker_is_retried_and_a_failing_episode_is_logged(local_log, ray_address, tmp_path):
    """Resume from a log holding one episode; of the three left, ddim 0 kills its worker process on the
    first attempt (retried on a fresh worker: same result as locally) and paraddim 1 raises on every
    attempt (logged as failed with its reason after 1 + max_retries attempts); the run goes on."""
    local_log = local_log()
    out = tmp_path / "ray"
    out.mkdir()
    kept = local_log[("paraddim", 0)]
    (out / "episodes.jsonl").write_text(json.dumps(kept) + "\n")
    finish(run_eval(*EVAL, "executor=ray", f"ray.address={ray_address}", "ray.num_workers=1",
                    "ray.max_retries=1", "resume=true", f"hydra.run.dir={out}",
                    extra_env={"PARAPOLICY_RAY_CRASH": "ddim:0,paraddim:1:raise"}))
    lines = (out / "episodes.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == kept and len(lines) == 4  # resumed: kept, not re-run
    episodes = read_log(out / "episodes.jsonl")
    retried = episodes[("ddim", 0)]
    assert retried["attempts"] == 2
    assert_same_episode(retried, local_log[("ddim", 0)])
    assert_same_episode(episodes[("ddim", 1)], local_log[("ddim", 1)])
    failed = episodes[("paraddim", 1)]
    assert failed["success"] is False and failed["attempts"] == 2 and failed["calls"] == []
    assert failed["error"].startswith("ray: task failed") and "injected failure" in failed["error"]
    assert "after 2 attempts" in failed["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["executor"]["replaced_workers"] == 1  # the killed one; a raising task keeps its worker
    assert summary["runs"]["paraddim"]["n_episodes"] == 2 and summary["runs"]["paraddim"]["n_errors"] == 1


def test_sweep_launcher_runs_two_jobs_on_the_cluster(ray_address, tmp_path):
    """hydra/launcher=ray_cluster as shipped, pointed at the running test cluster (a joining driver:
    hydra-ray-launcher's default object_store_memory would make ray.init refuse)."""
    sweep = tmp_path / "sweep"
    finish(run_eval("env=lift", "checkpoint=checkpoints/lift", "sampler=ddim", "sampler.num_inference_steps=5,10",
                    "baseline=null", "n_episodes=1", "max_episode_steps=8", "torch_threads=1", "progress_bar=false",
                    "hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address={ray_address}",
                    f"hydra.sweep.dir={sweep}", multirun=True))
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(summaries) == 2
    steps = sorted(run["steps"] for s in summaries for run in s["runs"].values())
    assert steps == [5, 10]
    assert all(s["executor"]["kind"] == "local" for s in summaries)  # each job ran its episodes itself


def test_ray_runs_real_time_execution_like_the_local_executor(ray_address, tmp_path):
    """timing=async with a fixed latency on Ray workers: the same episodes as in this process (delays,
    stalls and task time included), since latency is simulated, not measured, there."""
    realtime = ["timing=async", "latency=150", "transition=forecast", "baseline=null"]
    local, remote = tmp_path / "local", tmp_path / "ray"
    proc = run_eval(*EVAL, *realtime, f"hydra.run.dir={local}")
    finish(run_eval(*EVAL, *realtime, "executor=ray", f"ray.address={ray_address}", "ray.num_workers=1",
                    f"hydra.run.dir={remote}"))
    finish(proc)
    on_ray, here = read_log(remote / "episodes.jsonl"), read_log(local / "episodes.jsonl")
    assert sorted(on_ray) == sorted(here) and len(here) == 2
    for key, ep in on_ray.items():
        assert_same_episode(ep, here[key])
        assert [c["delay_steps"] for c in ep["calls"]] == [c["delay_steps"] for c in here[key]["calls"]]
        assert all(c["delay_steps"] == 3 for c in ep["calls"][1:])
        assert ep["stall_steps"] == here[key]["stall_steps"] and ep["task_time_s"] == here[key]["task_time_s"]
    summary = json.loads((remote / "summary.json").read_text())
    run = next(iter(summary["runs"].values()))
    assert run["timing"] == "async" and run["transition"] == "forecast" and run["delay_steps"] == 3.0


def test_an_image_policy_on_ray_with_videos_plans_as_in_this_process(ray_address, tmp_path):
    """The shipped Lift image policy on a Ray worker, recording videos there, against a local run without
    videos: the same episodes, to the per-call shadow deviation (a function of the camera frames the policy
    saw), so rendering the video camera does not disturb the observation cameras; the mp4s decode."""
    import imageio.v3 as iio

    image = ["env=lift_image", "checkpoint=checkpoints/lift_image", "sampler=paraddim", "sampler.num_inference_steps=8",
             "baseline=ddim", "shadow=true", "n_episodes=1", "max_episode_steps=16", "torch_threads=1",
             "progress_bar=false"]
    local, remote = tmp_path / "local", tmp_path / "ray"
    proc = run_eval(*image, f"hydra.run.dir={local}")
    on_worker = run_eval(*image, "executor=ray", f"ray.address={ray_address}", "ray.num_workers=1", "video=true",
                         "n_video_episodes=1", "video_size=64", f"hydra.run.dir={remote}")
    _, err = on_worker.communicate(timeout=600)
    assert on_worker.returncode == 0, err[-3000:]
    assert "video replay differs" not in err  # the rendering replay saw the frames the timed episode saw
    finish(proc)
    on_ray, here = read_log(remote / "episodes.jsonl"), read_log(local / "episodes.jsonl")
    assert sorted(on_ray) == sorted(here) == [("ddim-8", 0), ("paraddim-8", 0)]
    for key, ep in on_ray.items():
        assert_same_episode(ep, here[key])
        assert all(c["encode_ms"] > 0 for c in ep["calls"])  # the encoder ran on the worker, once per call
    deviations = [c["shadow_deviation"] for c in here[("paraddim-8", 0)]["calls"]]
    assert len(deviations) == 2 and len(set(deviations)) == 2 and min(deviations) > 0  # frame-dependent
    videos = sorted((remote / "videos").iterdir())
    assert len(videos) == 3
    for video in videos:
        frames = iio.imread(video, plugin="FFMPEG")
        assert frames.shape[0] == 1 + 16 and frames.std() > 5
