"""Rollout videos for ``python -m parapolicy.eval video=true``: offscreen frames, mp4 files, a README preview.

    python -m parapolicy.eval video=true n_video_episodes=2 video_size=256 camera=agentview
    python -m parapolicy.video preview <rollout.mp4> docs/square_paraddpm.gif --size 160 --every 2

After the timed episodes, the eval replays the first ``n_video_episodes`` episodes of every run (sampler
and baselines; same seeds, noise and batching, so the same rollouts) with a frame rendered after every
env step, and writes into ``<run dir>/videos/``:

- ``<run>_ep<e>_seed<s>_<success|fail>_p50-<ms>ms.mp4``: one per run and episode, each frame captioned
  with the run, the step, the latency of the policy call that planned the current action, and success;
- ``ep<e>_seed<s>_side_by_side.mp4``: the same episode of every run side by side, sequential samplers
  left, parallel ones right (the shorter episodes hold their last frame).

OpenGL: ``validate_video`` picks MuJoCo's offscreen backend (``parapolicy.envs.opengl``) before any
simulator starts, in this process and so in every env worker.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from parapolicy.envs.opengl import select_gl_backend


def validate_video(cfg) -> None:
    """``video=true``: check its options and pick the OpenGL backend (sets MUJOCO_GL before robosuite
    is imported here or in env workers); RuntimeError naming the missing library when none works."""
    if not cfg.get("video"):
        return
    n_video, size = cfg.get("n_video_episodes", 2), cfg.get("video_size", 256)
    if isinstance(n_video, bool) or not isinstance(n_video, int) or n_video < 1:
        raise ValueError(f"n_video_episodes must be an integer >= 1, got {n_video!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not 64 <= size <= 1024 or size % 16:
        raise ValueError(f"video_size must be a multiple of 16 in [64, 1024] (H.264 macro blocks), got {size!r}")
    try:
        import imageio_ffmpeg  # noqa: F401  (imageio's mp4 writer)
    except ImportError:
        raise ImportError('video=true writes mp4 with imageio-ffmpeg: pip install -e ".[video]"') from None
    select_gl_backend()


def caption(frame: np.ndarray, lines: Sequence[str], color=(255, 255, 255)) -> np.ndarray:
    """``frame`` uint8 ``[H, W, 3]`` with ``lines`` of text on a dark band at the top (a new array)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image, "RGBA")
    size = max(8, min(frame.shape[0] // 16, frame.shape[1] // 14))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed size
        font = ImageFont.load_default()
    line_height = size + 2
    draw.rectangle((0, 0, frame.shape[1], line_height * len(lines) + 3), fill=(0, 0, 0, 150))
    for row, text in enumerate(lines):
        draw.text((3, 2 + row * line_height), text, fill=color, font=font)
    return np.asarray(image)


def side_by_side(clips: Sequence[np.ndarray], gap: int = 16) -> np.ndarray:
    """Clips ``[T_k, H, W, 3]`` -> ``[max T_k, H, sum W + gaps, 3]``; shorter clips hold their last frame.
    (A 16-px gap keeps widths that are multiples of 16 so: H.264 encoders work in 16-px blocks.)"""
    length = max(len(clip) for clip in clips)
    padded = [np.concatenate([clip, np.repeat(clip[-1:], length - len(clip), axis=0)]) for clip in clips]
    height = padded[0].shape[1]
    spacer = np.zeros((length, height, gap, 3), dtype=np.uint8)
    parts = []
    for k, clip in enumerate(padded):
        parts += [spacer, clip] if k else [clip]
    return np.concatenate(parts, axis=2)


def write_mp4(path: Path, frames, fps: int = 20) -> None:
    """H.264 mp4 (imageio's ffmpeg plugin); frames uint8 ``[H, W, 3]`` with H, W multiples of 16."""
    import imageio.v2 as imageio

    with imageio.get_writer(path, fps=fps, codec="libx264", quality=7, macro_block_size=16) as writer:
        for frame in frames:
            writer.append_data(frame)


def read_frames(path: Path) -> np.ndarray:
    """All frames of a video file, uint8 ``[T, H, W, 3]``."""
    import imageio.v3 as iio

    return iio.imread(path, plugin="FFMPEG")


def preview_indices(n_frames: int, every: int) -> list[int]:
    """Every ``every``-th frame index, and always the last one (it shows the outcome)."""
    indices = list(range(0, n_frames, every))
    return indices if indices[-1] == n_frames - 1 else indices + [n_frames - 1]


def write_preview(frames: np.ndarray, path: Path, size: int = 160, every: int = 2, fps: int = 20,
                  hold_s: float = 1.5) -> None:
    """An animated GIF or WebP (by suffix) of every ``every``-th frame and the last (held ``hold_s``),
    resized to ``size`` px high."""
    from PIL import Image

    images = [Image.fromarray(frames[i]) for i in preview_indices(len(frames), every)]
    width = round(images[0].width * size / images[0].height)
    images = [image.resize((width, size), Image.LANCZOS) for image in images]
    durations = [int(1000 * every / fps)] * (len(images) - 1) + [int(1000 * hold_s)]
    if Path(path).suffix.lower() == ".gif":  # one shared palette keeps the file small and stable
        palette = images[len(images) // 2].quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        images = [image.quantize(palette=palette, dither=Image.Dither.NONE) for image in images]
        images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=True)
    else:
        images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, quality=70)


# ------------------------------------------------------------------------------------------ eval videos
class EpisodeVideos:
    """Frames and mp4 files of recorded episodes, per run (``runs``: ``(label, is_parallel)`` in order).

    Per batch and run: ``on_step = start(label, episodes, seeds, envs)`` goes to
    ``PolicyRunner.run_batch(on_step=...)``, then ``finish(label, episodes, records)`` writes the files,
    and the side-by-side file of an episode once every run has one. ``logged``: the timed eval's
    records by ``(label, episode)``; captions and file names show their latencies when present.
    """

    def __init__(self, out_dir: Path, runs: Sequence[tuple[str, bool]], episodes: Sequence[int],
                 logged: dict | None = None, fps: int = 20):
        self.folder = Path(out_dir) / "videos"
        self.runs = list(runs)
        self.episodes = set(episodes)
        self.logged = logged or {}
        self.fps = fps
        self.files: dict[tuple[str, int], Path] = {}
        self.mismatches: list[str] = []
        self._frames: dict[int, list[np.ndarray]] = {}  # env row -> frames of the episode being recorded

    def _latencies(self, label: str, episode: int, rec: dict) -> list[float]:
        logged = self.logged.get((label, episode))
        return [c["latency_ms"] for c in (logged or rec)["calls"]]

    def start(self, label: str, episodes: Sequence[int], seeds: Sequence[int], envs) -> Callable | None:
        """The ``on_step`` callback for one batch of ``label``, or None if no episode of it is recorded."""
        rows = {row: (episode, seed) for row, (episode, seed) in enumerate(zip(episodes, seeds))
                if episode in self.episodes}
        if not rows:
            return None
        self._frames = {row: [] for row in rows}

        def on_step(env_rows: Sequence[int], records: Sequence[dict]) -> None:
            wanted = [row for row in env_rows if row in rows]
            if not wanted:
                return
            frames = envs.call("render")  # every sub-env renders; only recorded rows are kept
            for row in wanted:
                episode, seed = rows[row]
                rec = records[row]
                calls = len(rec["calls"])
                latency = "call -"
                if calls:  # the call that planned the action just executed
                    ms = self._latencies(label, episode, rec)
                    ms = ms[calls - 1] if calls <= len(ms) else rec["calls"][-1]["latency_ms"]
                    latency = f"{ms:.0f} ms, {rec['calls'][-1]['rounds']} rounds"
                lines = [f"{label}  seed {seed}", f"t {rec['length']}  {latency}"]
                if rec["success"] or rec.get("wall_s") is not None:  # wall_s: the episode has ended
                    lines.append("SUCCESS" if rec["success"] else "failed")
                color = (120, 255, 120) if rec["success"] else (255, 255, 255)
                self._frames[row].append(caption(frames[row], lines, color))

        return on_step

    def finish(self, label: str, episodes: Sequence[int], records: Sequence[dict]) -> list[Path]:
        """Write the mp4 of each recorded episode of this batch; returns the files written."""
        written = []
        self.folder.mkdir(parents=True, exist_ok=True)
        for row, frames in sorted(self._frames.items()):
            if not frames:
                continue
            episode, rec = episodes[row], records[row]
            logged = self.logged.get((label, episode))
            if logged is not None and (logged["success"], logged["length"]) != (rec["success"], rec["length"]):
                self.mismatches.append(f"{label} episode {episode}: logged success={logged['success']} "
                                       f"length={logged['length']}, replayed {rec['success']} / {rec['length']}")
            latencies = self._latencies(label, episode, rec)
            p50 = f"{np.percentile(latencies, 50):.0f}" if latencies else "na"
            outcome = "success" if rec["success"] else "fail"
            path = self.folder / f"{_safe(label)}_ep{episode:03d}_seed{rec['seed']}_{outcome}_p50-{p50}ms.mp4"
            write_mp4(path, frames, self.fps)
            self.files[(label, episode)] = path
            written.append(path)
            written += self._side_by_side(episode, rec["seed"])
        self._frames = {}
        return written

    def _side_by_side(self, episode: int, seed: int) -> list[Path]:
        if len(self.runs) < 2 or not all((label, episode) in self.files for label, _ in self.runs):
            return []
        order = [label for label, parallel in self.runs if not parallel] + [label for label, parallel in self.runs if parallel]
        path = self.folder / f"ep{episode:03d}_seed{seed}_side_by_side.mp4"
        write_mp4(path, side_by_side([read_frames(self.files[(label, episode)]) for label in order]), self.fps)
        return [path]


def record_videos(cfg, out_dir: Path, runs: dict, specs: Sequence, episodes: Sequence[dict],
                  wanted: range) -> EpisodeVideos:
    """eval ``video=true``: replay the first ``n_video_episodes`` episodes of every run with rendering on.

    A separate pass after the timed episodes, so no timed call ever shares its time with rendering.
    Same seeds, noise and batching (``n_envs``; 1 for Ray workers) as the eval, so the same rollouts
    (a differing outcome is reported); captions show the eval's logged latency of each call.
    """
    from tqdm import tqdm

    from parapolicy.realtime.runner import PolicyRunner, make_vector_env
    from parapolicy.samplers import SAMPLERS

    order = list(wanted)
    recorded = order[: int(cfg.n_video_episodes)]
    n_envs = int(cfg.n_envs) if str(cfg.get("executor") or "local") == "local" else 1
    logged = {(ep["run"], ep["episode"]): ep for ep in episodes}
    videos = EpisodeVideos(out_dir, [(s.label, SAMPLERS[s.name].is_parallel) for s in specs], recorded, logged)
    envs = make_vector_env(cfg.env.name, n_envs, cfg.max_episode_steps, render_mode="rgb_array",
                           camera=str(cfg.camera), render_size=int(cfg.video_size))
    bar = tqdm(total=len(recorded) * len(runs), desc="videos", unit="ep", disable=not cfg.progress_bar)
    try:
        for start in range(0, len(order), n_envs):
            batch = order[start : start + n_envs]
            if not videos.episodes & set(batch):
                break
            seeds = [int(cfg.seed) + e for e in batch]
            for label, policy in runs.items():
                on_step = videos.start(label, batch, seeds, envs)
                records = PolicyRunner(envs, policy).run_batch(seeds, on_step=on_step)
                videos.finish(label, batch, records)
                bar.update(sum(e in videos.episodes for e in batch))
    finally:
        bar.close()
        envs.close()
    for line in videos.mismatches:
        print(f"video replay differs from the timed episode: {line}", file=sys.stderr)
    return videos


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
