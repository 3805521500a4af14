"""Closed-loop evaluation: task success and per-call latency, parallel sampler vs sequential baseline.

    python -m parapolicy.eval env=square                          # paraddpm vs ddpm, shipped checkpoint
    python -m parapolicy.eval sampler=paraddim baseline=ddim n_episodes=50
    python -m parapolicy.eval -m sampler=ddpm,paraddpm sampler.tolerance=0.01,0.1

Both runs use the same episode seeds (``seed``, ``seed + 1``, ...) and the same per-call noise.
Writes ``episodes.jsonl`` (a line per finished episode; ``resume=true`` continues an interrupted run),
``summary.json``, ``latency.png`` into Hydra's run directory and prints a table.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLER_KEYS = ("name", "num_inference_steps")


def available_samplers() -> list[str]:
    folder = resources.files("parapolicy.conf") / "sampler"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def sampler_config(name: str) -> DictConfig:
    """The config for ``baseline=<name>``: ``conf/sampler/<name>.yaml``, else a registered sampler
    name with its default options (e.g. ``parasrdsddim``, whose config file is ``srds.yaml``)."""
    from parapolicy.samplers import SAMPLERS

    if name in available_samplers():
        return OmegaConf.load(str(resources.files("parapolicy.conf") / "sampler" / f"{name}.yaml"))
    if name in SAMPLERS:
        return OmegaConf.create({"name": name, "num_inference_steps": None})  # steps: the sampler's
    raise ValueError(f"unknown baseline sampler {name!r}; configs: {', '.join(available_samplers())}; "
                     f"registered samplers: {', '.join(sorted(SAMPLERS))}")


def sampler_kwargs(cfg: DictConfig) -> tuple[str, int, dict]:
    """(name, num_inference_steps, options) from a sampler config; null options mean 'default'."""
    options = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
               if k not in SAMPLER_KEYS and v is not None}
    steps = cfg.get("num_inference_steps")
    return str(cfg.name), int(steps) if steps is not None else None, options


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint folder: as given (relative to the working directory), else relative to the repo."""
    candidates = [Path(path), REPO_ROOT / path]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"checkpoint {path!r} not found (looked for config.json in "
                            f"{', '.join(str(c) for c in candidates)}); train one with "
                            f"`python -m parapolicy.train env=...` or pass checkpoint=<folder>")


def validate(cfg: DictConfig) -> tuple[Path, list["RunSpec"]]:
    """Fail on bad values before any simulator starts; returns the checkpoint folder and the runs."""
    from parapolicy.envs.robosuite_env import get_task

    get_task(cfg.env.name)
    if int(cfg.n_episodes) < 1:
        raise ValueError(f"n_episodes must be >= 1, got {cfg.n_episodes}")
    first = cfg.get("first_episode", 0)
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first < int(cfg.n_episodes):
        raise ValueError(f"first_episode must be an integer in [0, n_episodes) = [0, {cfg.n_episodes}), got {first!r}")
    if int(cfg.n_envs) < 1:
        raise ValueError(f"n_envs must be >= 1, got {cfg.n_envs}")
    if cfg.max_episode_steps is not None and int(cfg.max_episode_steps) < 1:
        raise ValueError(f"max_episode_steps must be >= 1, got {cfg.max_episode_steps}")
    checkpoint = resolve_checkpoint(str(cfg.checkpoint))
    specs = plan_runs(cfg, checkpoint)
    validate_video(cfg)
    return checkpoint, specs


def validate_video(cfg: DictConfig) -> None:
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
    from parapolicy.video import select_gl_backend

    select_gl_backend()


def baseline_names(value) -> list:
    """``baseline``: one entry (a sampler name, ``name@steps`` or a dict), a list of them, or null."""
    if value in (None, "null", "none"):
        return []
    if isinstance(value, (str, dict, DictConfig)):
        return [value]
    return list(value)


def run_label(name: str, options: dict, steps: int | None = None) -> str:
    """``name``, ``name-<steps>`` when the schedule length is shown, ``+warm`` for warm starts."""
    label = name if steps is None else f"{name}-{steps}"
    return f"{label}+warm" if options.get("warm_start") else label


@dataclasses.dataclass
class RunSpec:
    """One run of an eval (the sampler or a baseline): what it samples with and how it is labelled.

    ``steps`` is the schedule length it runs; ``label`` shows it (``ddim-100``) whenever it differs from
    the run's config file (``conf/sampler/<name>.yaml``) or from the sampler's. ``legacy_label`` is the
    label earlier versions gave the same run (steps never shown), so ``resume=true`` reads their logs.
    """

    label: str
    name: str
    steps: int
    options: dict
    role: str  # "sampler" | "baseline"
    legacy_label: str | None = None
    timestep_spacing: str | None = None  # the spacing in use, once the sampler is built


def parse_baseline(entry, num_train_timesteps: int) -> tuple[DictConfig, int | None]:
    """One ``baseline`` entry -> (its sampler config, its own schedule length or None).

    ``"ddim"``: the config with the sampler's schedule length (like for like); ``"ddim@15"``: 15 steps;
    ``{name: ddim, num_inference_steps: 15, eta: 0.5}``: the config with these values on top (no
    ``num_inference_steps``: the sampler's). Raises ValueError naming the entry on a bad step count.
    """
    if isinstance(entry, (dict, DictConfig)):
        entry = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else dict(entry)
        if "name" not in entry:
            raise ValueError(f"baseline {entry!r}: a dict entry needs a 'name'")
        b_cfg = OmegaConf.merge(sampler_config(str(entry["name"])), entry)
        steps = entry.get("num_inference_steps")
        text = f"baseline {entry!r}: num_inference_steps"
    else:
        name, _, steps = str(entry).partition("@")
        b_cfg = sampler_config(name)
        steps = steps if "@" in str(entry) else None
        text = f"baseline {str(entry)!r}: the steps after '@'"
    if steps is None:
        return b_cfg, None
    return b_cfg, check_steps(text, steps, num_train_timesteps)


def check_steps(text: str, value, num_train_timesteps: int) -> int:
    """A schedule length: an integer in [1, num_train_timesteps], else ValueError starting with ``text``."""
    try:
        steps = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        steps = None
    if steps is None or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"{text} must be an integer in [1, {num_train_timesteps}] (the checkpoint's "
                         f"num_train_timesteps), got {value!r}")
    return steps


def config_steps(name: str) -> int | None:
    """``num_inference_steps`` of ``conf/sampler/<name>.yaml`` (None: no such file, or null there)."""
    if name not in available_samplers():
        return None
    return sampler_kwargs(sampler_config(name))[1]


def _sampler_choice(cfg: DictConfig) -> str:
    """The ``sampler=<file>`` config the run was started with (Hydra's choice), else the sampler's name."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("sampler")
        if choice:
            return str(choice)
    return str(cfg.sampler.name)


def plan_runs(cfg: DictConfig, checkpoint: Path) -> list[RunSpec]:
    """The sampler's run, then one per ``baseline`` entry, with labels and schedule lengths (the
    checkpoint's ``config.json`` gives the defaults and the bound num_train_timesteps). Reads no weights.

    A baseline inherits the sampler's ``timestep_spacing`` unless it sets one, so a like-for-like
    comparison compares the same schedule.
    """
    from parapolicy.policy.checkpoint import read_config

    saved = read_config(checkpoint)
    num_train = int(saved["scheduler"]["num_train_timesteps"])
    saved_steps = int((saved.get("sampler") or {}).get("num_inference_steps") or saved["policy"]["num_inference_steps"])
    name, steps, options = sampler_kwargs(cfg.sampler)
    if steps is not None:
        steps = check_steps("sampler.num_inference_steps", steps, num_train)
    steps = steps or saved_steps
    default = config_steps(_sampler_choice(cfg)) or saved_steps
    specs = [RunSpec(run_label(name, options, None if steps == default else steps), name, steps, options,
                     "sampler", legacy_label=run_label(name, options))]
    spacing = options.get("timestep_spacing") or (options.get("scheduler_kwargs") or {}).get("timestep_spacing")
    for entry in baseline_names(cfg.baseline):
        b_cfg, own_steps = parse_baseline(entry, num_train)
        b_name, _, b_options = sampler_kwargs(b_cfg)
        b_steps = steps if own_steps is None else own_steps
        if spacing and not (b_options.get("timestep_spacing") or (b_options.get("scheduler_kwargs") or {}).get("timestep_spacing")):
            b_options["timestep_spacing"] = spacing
        source = str(entry["name"]) if isinstance(entry, (dict, DictConfig)) else str(entry).partition("@")[0]
        b_default = config_steps(source)  # the steps of the config file the entry names, if any
        shown = b_steps != steps or (b_default is not None and b_steps != b_default)
        legacy = run_label(b_name, b_options) if b_steps == steps else None  # earlier versions: the sampler's steps
        label = run_label(b_name, b_options, b_steps if shown else None)
        taken = {spec.label for spec in specs}
        if label in taken:  # the same sampler twice (e.g. sampler=ddim baseline=ddim)
            label, i = f"{label}-baseline", 2
            while label in taken:
                label, i = f"{label.rsplit('-baseline', 1)[0]}-baseline{i}", i + 1
        if legacy is not None and legacy in {spec.legacy_label for spec in specs}:
            legacy = f"{legacy}-baseline"
        specs.append(RunSpec(label, b_name, b_steps, b_options, "baseline", legacy))
    return specs


def relabel_legacy(episodes: list[dict], specs: list[RunSpec]) -> list[dict]:
    """Log lines written before labels showed steps, renamed to today's labels (``resume=true`` on an
    older run directory then continues it instead of running everything again)."""
    labels = {spec.label for spec in specs}
    rename = {spec.legacy_label: spec.label for spec in specs
              if spec.legacy_label and spec.legacy_label != spec.label and spec.legacy_label not in labels}
    return [{**ep, "run": rename[ep["run"]]} if ep.get("run") in rename else ep for ep in episodes]


def build_runs(policy, specs: list[RunSpec]) -> dict:
    """``{label: policy}``: the sampler's policy first, then each baseline on the same weights."""
    from parapolicy.runner import with_sampler

    runs = {specs[0].label: policy}
    for spec in specs[1:]:
        runs[spec.label] = with_sampler(policy, spec.name, spec.steps, **spec.options)
    for spec in specs:
        if runs[spec.label].sampler.num_inference_steps != spec.steps:  # plan and build must agree
            raise RuntimeError(f"{spec.label}: planned {spec.steps} steps, built {runs[spec.label].sampler!r}")
        spec.timestep_spacing = runs[spec.label].sampler.timestep_spacing
    return runs


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def read_episodes(path: Path) -> list[dict]:
    if not path.exists():
        return []
    episodes = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                episodes.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interruption: that episode reruns
                continue
    return episodes


def summarize(episodes: list[dict], labels: list[str], baseline_label: str | None,
              specs: list[RunSpec] | None = None) -> dict:
    """Per-run summaries (``metrics.summarize_run`` plus, from ``specs``, each run's sampler, role,
    ``steps`` and options) and the p50 speedup of the first run over ``baseline_label``."""
    from parapolicy.metrics import summarize_run

    by_label = {spec.label: spec for spec in specs or []}
    runs = {}
    for label in labels:
        mine = sorted((ep for ep in episodes if ep["run"] == label), key=lambda ep: ep["episode"])
        if mine:
            runs[label] = summarize_run(mine)
            if label in by_label:
                spec = by_label[label]
                runs[label].update(sampler=spec.name, role=spec.role, steps=spec.steps,
                                   timestep_spacing=spec.timestep_spacing, options=spec.options)
    speedup = None
    if baseline_label and baseline_label in runs and labels[0] in runs:
        speedup = runs[baseline_label]["latency_ms"]["p50"] / runs[labels[0]]["latency_ms"]["p50"]
    return {"runs": runs, "speedup_p50": speedup}


def run_eval(cfg: DictConfig, out_dir: Path) -> dict:
    """The whole evaluation; returns the summary dict (also written to ``out_dir/summary.json``)."""
    import torch
    from tqdm import tqdm

    from parapolicy.metrics import format_table, plot_latency
    from parapolicy.policy import load_policy
    from parapolicy.runner import PolicyRunner, make_vector_env

    if cfg.get("server"):  # closed loop through a running policy server (python -m parapolicy.serve)
        from parapolicy.serving.remote_runner import run_remote_eval

        return run_remote_eval(cfg, out_dir)
    checkpoint, specs = validate(cfg)
    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    device = pick_device(str(cfg.device))
    name, steps, options = sampler_kwargs(cfg.sampler)
    policy = load_policy(str(checkpoint), sampler=name, device=str(device), num_inference_steps=steps,
                         fast_path=cfg.get("fast_path", "auto"), **options)  # baselines share it (one per network)
    if policy.config.obs_dim != _task_obs_dim(cfg.env.name):
        raise ValueError(f"checkpoint {checkpoint} expects obs_dim={policy.config.obs_dim}, env "
                         f"{cfg.env.name!r} gives {_task_obs_dim(cfg.env.name)}: wrong checkpoint for this env?")

    runs = build_runs(policy, specs)  # labels and schedule lengths: plan_runs
    from parapolicy.accel import warm_up

    fast_path_warmup = {lbl: warm_up(p, int(cfg.n_envs)) for lbl, p in runs.items()}  # before any timed call
    label = specs[0].label
    baseline_label = list(runs)[1] if len(runs) > 1 else None  # the speedup is against the first baseline
    shadow = runs[baseline_label] if cfg.shadow and baseline_label else None

    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "episodes.jsonl"
    episodes = relabel_legacy(read_episodes(log_path), specs) if cfg.resume else []
    # keep only complete lines: a line cut by an interruption must not glue onto the next one
    log_path.write_text("".join(json.dumps(ep) + "\n" for ep in episodes))
    done = {(ep["run"], ep["episode"]) for ep in episodes}

    # Episodes first_episode .. n_episodes - 1 (episode e has seed `seed + e` whichever process runs it,
    # so a run split over processes by first_episode gives the same episodes as one run).
    first_episode, n_episodes, n_envs = int(cfg.get("first_episode", 0)), int(cfg.n_episodes), int(cfg.n_envs)
    wanted = range(first_episode, n_episodes)
    # executor=local: this process, runs interleaved batch by batch; executor=ray: Ray workers
    from parapolicy.executors import make_executor

    executor = make_executor(cfg, checkpoint, specs)
    bar = tqdm(total=len(wanted) * len(runs), initial=len(done & {(r, e) for r in runs for e in wanted}),
               desc=f"eval {cfg.env.name}", unit="ep", disable=not cfg.progress_bar)
    try:
        with log_path.open("a") as log:

            def record(run_label_, episode, rec):  # every finished episode, as it arrives
                line = {"run": run_label_, "episode": episode, **rec}
                log.write(json.dumps(line) + "\n")
                log.flush()
                episodes.append(line)
                bar.update(1)
                bar.set_postfix({lbl: f"{sum(ep['success'] for ep in episodes if ep['run'] == lbl)}"
                                 f"/{sum(ep['run'] == lbl for ep in episodes)}" for lbl in runs})

            executor.run(runs, label, shadow, wanted, done, int(cfg.seed), record)
    finally:
        bar.close()
        executor.close()
    if cfg.get("video"):  # a replay with rendering, after the timed episodes (parapolicy/video.py)
        from parapolicy.video import record_videos

        record_videos(cfg, out_dir, runs, specs, episodes, wanted)

    episodes = [ep for ep in episodes if ep["episode"] in wanted]  # a resumed log may hold others
    summary = {"env": cfg.env.name, "checkpoint": str(checkpoint), "device": _device_name(device),
               "sampler": OmegaConf.to_container(cfg.sampler, resolve=True), "sampler_label": label,
               "baseline": baseline_label, "baselines": list(runs)[1:],
               "seed": int(cfg.seed), "first_episode": first_episode, "n_envs": n_envs,
               "fast_path": str(cfg.get("fast_path", "auto")), "fast_path_warmup": fast_path_warmup,
               **executor.describe(),
               **summarize(episodes, list(runs), baseline_label, specs)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    latencies = {label: [c["latency_ms"] for ep in episodes if ep["run"] == label for c in ep["calls"]]
                 for label in runs}
    plot_latency(latencies, out_dir / "latency.png")
    print(f"\n{cfg.env.name}: {len(wanted)} episodes per sampler, seeds {int(cfg.seed) + first_episode}.."
          f"{int(cfg.seed) + n_episodes - 1}, "
          f"device {summary['device']}, batch {n_envs}")
    print(format_table(summary["runs"], summary["speedup_p50"]))
    print(f"results: {out_dir}")
    _log_wandb(cfg, summary, latencies, out_dir)
    return summary


def _task_obs_dim(task: str) -> int:
    from parapolicy.envs.robosuite_env import get_task

    return get_task(task).obs_dim


def _device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _log_wandb(cfg: DictConfig, summary: dict, latencies: dict, out_dir: Path) -> None:
    mode = str(cfg.wandb.mode)
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(mode=mode, project=cfg.wandb.project, name=cfg.wandb.name, dir=str(out_dir),
                     config=OmegaConf.to_container(cfg, resolve=True))
    for label, run_summary in summary["runs"].items():
        run.summary[label] = run_summary
        run.log({f"{label}/latency_ms": wandb.Histogram(latencies[label])})
    run.summary["speedup_p50"] = summary["speedup_p50"]
    run.log({"latency": wandb.Image(str(out_dir / "latency.png"))})
    run.finish()


@hydra.main(version_base=None, config_path="pkg://parapolicy.conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_eval(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
