"""eval video=true: offscreen rollouts written as mp4 (decoded here), the GL backend choice, the preview."""

import ctypes.util
import json
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest

from test_eval import FAST, checkpoint, read_lines, run_eval  # noqa: F401  (checkpoint: a fixture)

STEPS = 10


@pytest.fixture(scope="module")
def gl_backend():
    from parapolicy.envs.opengl import available_gl_backend

    backend = available_gl_backend()
    if backend is None:
        pytest.skip("no offscreen OpenGL for MuJoCo here (neither MUJOCO_GL=egl nor osmesa makes a context)")
    return backend


@pytest.fixture(scope="module")
def video_run(gl_backend, checkpoint, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("video") / "run"
    proc = run_eval(*FAST, f"checkpoint={checkpoint}", f"max_episode_steps={STEPS}", "n_episodes=2",
                    "video=true", "n_video_episodes=1", "video_size=64", "camera=frontview", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_video_eval_writes_playable_mp4s_with_one_frame_per_step(video_run):
    out, proc = video_run
    files = sorted(p.name for p in (out / "videos").iterdir())
    assert len(files) == 3, files  # one per run for episode 0, and the side-by-side file
    episodes = {(ep["run"], ep["episode"]): ep for ep in read_lines(out / "episodes.jsonl")}
    for label in ("paraddpm-8", "ddpm-8"):
        logged = episodes[(label, 0)]
        outcome = "success" if logged["success"] else "fail"
        p50 = np.percentile([c["latency_ms"] for c in logged["calls"]], 50)
        name = f"{label}_ep000_seed100000_{outcome}_p50-{p50:.0f}ms.mp4"
        assert name in files
        frames = iio.imread(out / "videos" / name, plugin="FFMPEG")  # a real decode of the file
        assert frames.shape == (1 + STEPS, 64, 64, 3)  # the reset, then one frame per env step
        assert frames.std() > 5 and np.abs(frames[0].astype(int) - frames[-1]).mean() > 0.5  # a scene that moves
    both = iio.imread(out / "videos" / "ep000_seed100000_side_by_side.mp4", plugin="FFMPEG")
    assert both.shape == (1 + STEPS, 64, 64 + 16 + 64, 3)  # ddpm | paraddpm with a 16-px gap
    assert "video replay differs" not in proc.stderr  # the replay reproduced the timed episodes


def test_timed_episodes_do_not_render(video_run, checkpoint, tmp_path):  # noqa: F811
    """The timed episodes are the same with and without video=true: videos come from a later replay."""
    out, _ = video_run
    plain = tmp_path / "plain"
    proc = run_eval(*FAST, f"checkpoint={checkpoint}", f"max_episode_steps={STEPS}", "n_episodes=2",
                    f"hydra.run.dir={plain}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    key = lambda ep: (ep["run"], ep["episode"], ep["success"], ep["length"], [c["rounds"] for c in ep["calls"]])
    assert sorted(map(key, read_lines(plain / "episodes.jsonl"))) == sorted(map(key, read_lines(out / "episodes.jsonl")))
    assert not (plain / "videos").exists()


def test_preview_gif_from_an_eval_video(video_run, tmp_path):
    from PIL import Image

    out, _ = video_run
    source = next((out / "videos").glob("ddpm-8_*.mp4"))
    gif = tmp_path / "preview.gif"
    proc = subprocess.run([sys.executable, "-m", "parapolicy.video", "preview", str(source), str(gif),
                           "--size", "32", "--every", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(gif) as image:
        assert image.n_frames == 5 and image.height == 32  # frames 0, 3, 6, 9 and the last, 10
        image.seek(image.n_frames - 1)
        assert image.info["duration"] == 1500  # the outcome frame is held


@pytest.mark.parametrize("override, message", [
    ("video_size=100", "video_size must be a multiple of 16 in [64, 1024]"),
    ("n_video_episodes=0", "n_video_episodes must be an integer >= 1"),
])
def test_bad_video_options_fail_before_any_env_starts(override, message, tmp_path):
    proc = run_eval("env=lift", "checkpoint=checkpoints/lift", "video=true", override, f"hydra.run.dir={tmp_path}",
                    timeout=300)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "episodes.jsonl").exists()


@pytest.mark.skipif(ctypes.util.find_library("OSMesa") is not None, reason="OSMesa is installed here")
def test_missing_gl_library_is_named_in_one_line(tmp_path):
    """MUJOCO_GL=osmesa without libOSMesa: the eval stops before any env, naming the library."""
    env = {**os.environ, "MUJOCO_GL": "osmesa"}
    env.pop("PYOPENGL_PLATFORM", None)
    cmd = [sys.executable, "-m", "parapolicy.eval", "env=lift", "checkpoint=checkpoints/lift", "video=true",
           f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("RuntimeError: offscreen rendering (video=true")]
    assert len(lines) == 1 and "libOSMesa.so not found" in lines[0] and "libosmesa6" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "episodes.jsonl").exists()
