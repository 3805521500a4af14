"""Train a Diffusion Policy on robomimic-style low-dim demonstrations.

    python -m parapolicy.train env=square                  # -> checkpoints/square
    python -m parapolicy.train env=lift iters=5000 out=/tmp/lift device=cuda
    python -m parapolicy.train env=lift_image torch_threads=1  # cameras + proprioception (policy.vision)

Every ``checkpoint_every`` iterations the EMA policy is written in the shipped format (``out/``,
see parapolicy.policy.checkpoint), together with a resumable training state
(``out/training_state/``: safetensors + JSON, no pickle) and a line in ``out/train_log.jsonl``.
Re-running the same command continues from the training state (``resume=true``). Where that state
is gone (it stays out of git), ``init_from=<checkpoint>`` continues from a shipped checkpoint's EMA
weights and normaliser instead: a new stage with a fresh optimizer and its own warm-up + cosine
schedule from the checkpoint's step to ``iters``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from parapolicy.devices import pick_device
from parapolicy.policy.checkpoint import (
    REPO_ROOT,
    load_checkpoint,
    load_safetensors,
    save_checkpoint,
    save_safetensors,
)
from parapolicy.policy.configuration import DiffusionPolicyConfig
from parapolicy.policy.dataset import SequenceDataset, file_sha256, load_demos, split_demos
from parapolicy.policy.diffusion_policy import DiffusionPolicy
from parapolicy.policy.normalizer import PolicyNormalizer

STATE_DIR = "training_state"
LOG_FILE = "train_log.jsonl"


# ---------------------------------------------------------------------------------------- helpers
def resolve_path(path: str | Path) -> Path:
    """Relative paths are taken from the working directory, falling back to the repository root."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path if (REPO_ROOT / path).exists() else path


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "cosine", start: int = 0) -> float:
    """Linear warm-up, then cosine decay to 0 at ``total_steps`` (diffusers'
    get_cosine_schedule_with_warmup) or, for ``schedule="constant"``, a constant rate. ``start``: the
    step the schedule begins at (a stage continued from a checkpoint restarts its own schedule)."""
    step, total_steps = step - start, total_steps - start
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"lr_scheduler must be 'cosine' or 'constant', got {schedule!r}")
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


class EMA:
    """Diffusion Policy's EMAModel: decay = 1 - (1 + step / inv_gamma) ** -power, clipped to
    [min_value, max_value]; the averaged copy is the one that ships."""

    def __init__(self, model: torch.nn.Module, power: float = 0.75, inv_gamma: float = 1.0,
                 min_value: float = 0.0, max_value: float = 0.9999):
        self.model = model
        self.power, self.inv_gamma = power, inv_gamma
        self.min_value, self.max_value = min_value, max_value
        self.step = 0

    def decay(self) -> float:
        step = self.step - 1  # DP: the first update copies the weights (decay 0)
        if step <= 0:
            return 0.0
        value = 1.0 - (1.0 + step / self.inv_gamma) ** -self.power
        return max(self.min_value, min(value, self.max_value))

    @torch.no_grad()
    def update(self, source: torch.nn.Module) -> None:
        self.step += 1
        decay = self.decay()
        ema_params = list(self.model.parameters())
        src_params = [p.detach() for p in source.parameters()]
        # ema = decay * ema + (1 - decay) * src, fused over all tensors.
        torch._foreach_lerp_(ema_params, src_params, 1.0 - decay)


# ---------------------------------------------------------------------------------------- training state
def save_training_state(folder: Path, policy: DiffusionPolicy, ema: EMA, optimizer: torch.optim.Optimizer,
                        generator: torch.Generator, meta: Mapping[str, Any]) -> None:
    """Model, EMA and optimizer tensors in safetensors (optimizer state keyed by parameter index),
    counters, RNG-free metadata and hyper-parameters in JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"policy.{k}": v for k, v in policy.state_dict().items()})
    tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
    optim_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in optim_state["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    tensors["rng.generator"] = generator.get_state()
    save_safetensors(tensors, folder / "state.safetensors")
    param_groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])}
                    for g in optim_state["param_groups"]]
    state_json = {**meta, "ema_step": ema.step, "optimizer_param_groups": param_groups, "optimizer_scalars": scalars}
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(state_json, indent=2, default=str))
    os.replace(tmp, folder / "state.json")


def load_training_state(folder: Path, policy: DiffusionPolicy, ema: EMA, optimizer: torch.optim.Optimizer,
                        generator: torch.Generator) -> dict[str, Any]:
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_safetensors(folder / "state.safetensors", f"training state {folder}")
    policy.load_state_dict({k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")})
    ema.model.load_state_dict({k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")})
    ema.step = int(meta["ema_step"])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, extra in meta.get("optimizer_scalars", {}).items():
        state.setdefault(int(index), {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
    generator.set_state(tensors["rng.generator"])
    return meta


def init_from_checkpoint(folder: str | Path, policy: DiffusionPolicy, ema: EMA,
                         policy_config: DiffusionPolicyConfig) -> tuple[int, list[dict[str, Any]]]:
    """Load a shipped checkpoint's EMA weights and normaliser into ``policy`` and ``ema``; returns its
    step count and training stages. The network and data layout must match this run's config."""
    source = load_checkpoint(resolve_path(folder))
    keys = ("obs_dim", "action_dim", "obs_keys", "n_obs_steps", "network", "down_dims", "kernel_size",
            "n_groups", "diffusion_step_embed_dim", "num_train_timesteps", "prediction_type")
    ours, theirs = policy_config.to_dict(), source.config.to_dict()
    changed = [k for k in keys if ours.get(k) != theirs.get(k)]
    if changed:
        raise ValueError(f"init_from={folder}: the checkpoint's {changed} differ from this run's config "
                         f"({', '.join(f'{k}={theirs.get(k)} vs {ours.get(k)}' for k in changed)})")
    if source.config.max_delay and source.config.max_delay != policy_config.max_delay:
        raise ValueError(f"init_from={folder}: trained for delay up to {source.config.max_delay} steps, "
                         f"this run says max_delay={policy_config.max_delay}")
    state = widen_condition(source.state_dict(), policy.state_dict())
    state = {k: v.to(policy.device) for k, v in state.items()}
    policy.load_state_dict(state)
    ema.model.load_state_dict(state)
    info = source.training_info or {}
    return int(info.get("iterations", 0)), list(info.get("stages", []))


def widen_condition(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``source``'s weights for ``target``'s network when only the global conditioning grew (an ordinary
    policy fine-tuned for delay: the known-actions columns come after the observation's). The new
    columns of every FiLM layer start at zero, so the widened network computes what the source did.
    The U-Net's convolutions do not depend on the horizon, so a longer horizon keeps every weight."""
    widened = {}
    for key, value in source.items():
        want = target.get(key)
        if want is not None and key.endswith("cond_encoder.1.weight") and value.shape != want.shape:
            if value.shape[0] != want.shape[0] or value.shape[1] > want.shape[1]:
                raise ValueError(f"{key}: cannot widen {list(value.shape)} to {list(want.shape)}")
            value = torch.cat([value, value.new_zeros(value.shape[0], want.shape[1] - value.shape[1])], dim=1)
        widened[key] = value
    return widened


# ---------------------------------------------------------------------------------------- main loop
def image_keys(cfg: DictConfig) -> list[str]:
    """An image task's camera observations (``env.cameras``), robosuite's ``<camera>_image`` names."""
    return [f"{camera}_image" for camera in (cfg.env.get("cameras") or [])]


def build_policy_config(cfg: DictConfig, obs_dim: int, action_dim: int) -> DiffusionPolicyConfig:
    p = cfg.policy
    cameras = image_keys(cfg)
    size = int(cfg.env.get("camera_size") or 84)
    vision = OmegaConf.to_container(p.vision, resolve=True) if cameras and p.get("vision") else {}
    return DiffusionPolicyConfig(
        obs_dim=obs_dim,
        action_dim=action_dim,
        obs_keys=list(cfg.env.obs_keys),
        image_keys=cameras,
        image_shape=[3, size, size],
        vision=vision,
        env=cfg.env.get("name"),
        horizon=p.horizon,
        n_obs_steps=p.n_obs_steps,
        n_action_steps=p.n_action_steps,
        down_dims=list(p.down_dims),
        kernel_size=p.kernel_size,
        n_groups=p.n_groups,
        diffusion_step_embed_dim=p.diffusion_step_embed_dim,
        num_train_timesteps=p.num_train_timesteps,
        beta_schedule=p.beta_schedule,
        clip_sample=p.clip_sample,
        prediction_type=p.prediction_type,
        sampler=p.sampler,
        num_inference_steps=p.num_inference_steps,
        sampler_options=OmegaConf.to_container(p.sampler_options, resolve=True) if p.get("sampler_options") else {},
        max_delay=int(p.get("max_delay") or 0),
        committed_in_sample=str(p.get("committed_in_sample") or "noised"),
        network=OmegaConf.to_container(p.network, resolve=True) if p.get("network") else {},
    )


def optim_groups(policy: DiffusionPolicy, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: every parameter decays (the U-Net recipe), except in DP's transformer,
    which decays only its Linear and attention weights (``TransformerForDiffusion.optim_groups``, as DP)."""
    network_groups = getattr(policy.model, "optim_groups", None)
    if network_groups is None:
        return [{"params": list(policy.parameters()), "weight_decay": weight_decay}]
    rest = [param for name, param in policy.named_parameters() if not name.startswith("model.")]
    groups = network_groups(weight_decay) + [{"params": rest, "weight_decay": weight_decay}]
    return [group for group in groups if group["params"]]


@torch.no_grad()
def validation_loss(policy: DiffusionPolicy, dataset: SequenceDataset | None, batch_size: int,
                    batches: int, device: torch.device, seed: int) -> float | None:
    """Denoising loss on held-out demos with fixed windows / noise / timesteps, so values compare."""
    if dataset is None or batches <= 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(batches):
        batch = to_device(dataset.sample(batch_size, generator), device)
        total += float(policy.compute_loss(batch, generator=generator))
    return total / batches


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch (tensors, or dicts of them: image windows) on ``device``."""
    return {k: to_device(v, device) if isinstance(v, Mapping) else v.to(device, non_blocking=True) for k, v in batch.items()}


def train(cfg: DictConfig) -> Path:
    """Run (or resume) training as configured; returns the checkpoint folder."""
    start_time = time.time()
    device = pick_device(cfg.device)
    torch.set_num_threads(int(cfg.torch_threads) if cfg.get("torch_threads") else (os.cpu_count() or 1))
    torch.manual_seed(cfg.seed)

    dataset_path = resolve_path(cfg.dataset)
    out_dir = Path(cfg.out).expanduser()
    if not out_dir.is_absolute():
        out_dir = Path.cwd() / out_dir
    state_dir = out_dir / STATE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)

    vision = cfg.policy.get("vision") or {}
    demos = load_demos(dataset_path, list(cfg.env.obs_keys), filter_key=cfg.get("filter_key"), image_keys=image_keys(cfg),
                       resize_shape=vision.get("resize_shape") if image_keys(cfg) else None)
    if cfg.env.get("obs_dim") is not None and demos[0].obs.shape[1] != cfg.env.obs_dim:
        raise ValueError(f"{dataset_path}: obs keys give dim {demos[0].obs.shape[1]}, env config says {cfg.env.obs_dim}")
    train_demos, val_demos = split_demos(demos, cfg.val_ratio, seed=cfg.seed)
    p = cfg.policy
    train_set = SequenceDataset(train_demos, p.horizon, p.n_obs_steps, p.n_action_steps)
    val_set = SequenceDataset(val_demos, p.horizon, p.n_obs_steps, p.n_action_steps) if val_demos else None

    policy_config = build_policy_config(cfg, train_set.obs_dim, train_set.action_dim)
    policy = DiffusionPolicy(policy_config)
    if cfg.get("delay_none_prob") is not None:
        policy.delay_none_prob = float(cfg.delay_none_prob)
    # Min-max ranges from every demo (held-out included) so no real observation falls outside [-1, 1].
    fitted = PolicyNormalizer.fit(
        torch.cat([train_set.obs] + ([val_set.obs] if val_set else [])),
        torch.cat([train_set.actions] + ([val_set.actions] if val_set else [])),
    )
    policy.normalizer.load_state_dict(fitted.state_dict())
    policy.to(device)
    ema = EMA(copy.deepcopy(policy).requires_grad_(False).eval(), **OmegaConf.to_container(cfg.ema, resolve=True))
    optimizer = torch.optim.AdamW(optim_groups(policy, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
    generator = torch.Generator().manual_seed(cfg.seed)

    n_params = sum(param.numel() for param in policy.parameters())  # U-Net (+ image encoder)
    dataset_sha = file_sha256(dataset_path)
    step, loss_ema, elapsed_before, stages, schedule_start = 0, None, 0.0, [], 0
    if cfg.resume and (state_dir / "state.json").is_file():
        saved_config = json.loads((state_dir / "state.json").read_text()).get("policy_config")
        if saved_config != policy_config.to_dict():
            changed = sorted(k for k in policy_config.to_dict() if (saved_config or {}).get(k) != getattr(policy_config, k))
            raise ValueError(f"{state_dir}: saved policy config differs from this run's in {changed}; "
                             "use resume=false or another out")
        meta = load_training_state(state_dir, policy, ema, optimizer, generator)
        if meta.get("dataset_sha256") != dataset_sha:
            print(f"warning: {dataset_path} changed since the training state was written")
        step, loss_ema, elapsed_before = int(meta["step"]), meta.get("loss_ema"), float(meta.get("elapsed_s", 0.0))
        stages = list(meta.get("stages", []))
        schedule_start = int(meta.get("schedule_start", 0))
        print(f"resuming from {state_dir} at step {step}/{cfg.iters}")
    elif cfg.get("init_from"):
        step, stages = init_from_checkpoint(cfg.init_from, policy, ema, policy_config)
        schedule_start = step
        print(f"continuing from {cfg.init_from} at step {step}/{cfg.iters} (fresh optimizer, new lr schedule)")
    elif not cfg.resume and (out_dir / LOG_FILE).exists():
        (out_dir / LOG_FILE).unlink()  # a fresh run starts a fresh log

    print(f"training {policy_config.env or 'policy'}: {len(train_demos)} train / {len(val_demos)} val demos, "
          f"{len(train_set)} windows, {n_params / 1e6:.2f}M params, device {device}, "
          f"{torch.get_num_threads()} threads -> {out_dir}")

    run = None
    if cfg.wandb.mode != "disabled":
        import wandb

        run = wandb.init(project=cfg.wandb.project, name=cfg.wandb.get("name"), mode=cfg.wandb.mode,
                         config=OmegaConf.to_container(cfg, resolve=True))

    # Each invocation that trains is a stage: a checkpoint resumed with another batch size or lr records
    # every stage's settings, so the provenance says how to reproduce it (not just the last command's).
    stage = {"from_step": step, "to_step": step, "iters": int(cfg.iters), "batch_size": int(cfg.batch_size),
             "lr": float(cfg.lr), "lr_scheduler": str(cfg.lr_scheduler), "warmup_steps": int(cfg.warmup_steps)}
    if schedule_start:
        stage["schedule_start"] = schedule_start
    if cfg.get("init_from") and schedule_start == step:
        stage["init_from"] = str(cfg.init_from)
    if step < cfg.iters:
        stages.append(stage)

    def checkpoint(step: int, last_loss: float | None) -> None:
        elapsed = elapsed_before + time.time() - start_time
        stage["to_step"] = step
        val = validation_loss(ema.model, val_set, cfg.batch_size, cfg.val_batches, device, cfg.seed + 1)
        training_info = dict(
            dataset=str(cfg.dataset), dataset_sha256=dataset_sha, iterations=step, final_loss=loss_ema,
            last_batch_loss=last_loss, val_loss=val, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
            train_demos=len(train_demos), val_demos=len(val_demos), elapsed_s=round(elapsed, 1),
            stages=stages,
        )
        if policy_config.delay_conditioned:
            training_info["delay"] = {"max_delay": policy_config.max_delay, "none_prob": policy.delay_none_prob,
                                      "known_positions": policy_config.known_positions,
                                      "committed_in_sample": policy_config.committed_in_sample}
        save_checkpoint(ema.model, out_dir, training=training_info)
        save_training_state(state_dir, policy, ema, optimizer, generator, {
            "step": step, "loss_ema": loss_ema, "elapsed_s": elapsed, "policy_config": policy_config.to_dict(),
            "dataset_sha256": dataset_sha, "val_demo_names": [d.name for d in val_demos], "stages": stages,
            "schedule_start": schedule_start,
        })
        record = {"step": step, "loss": loss_ema, "val_loss": val, "lr": optimizer.param_groups[0]["lr"],
                  "time": round(elapsed, 1), "checkpoint": True}
        with open(out_dir / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if run is not None and val is not None:
            run.log({"val_loss": val}, step=step)
        val_text = f" val {val:.4f}" if val is not None else ""
        loss_text = f"{loss_ema:.4f}" if loss_ema is not None else "n/a"
        tqdm.write(f"[checkpoint] iter {step}/{cfg.iters} loss {loss_text}{val_text} "
                   f"elapsed {elapsed / 60:.1f} min -> {out_dir}")

    if step >= cfg.iters:
        print(f"already trained for {step} >= {cfg.iters} iterations; rewriting the checkpoint")
        checkpoint(step, None)
        return out_dir

    # Wall-clock budget for this invocation: a safety net so a background run always ends with a
    # fresh checkpoint; the lr schedule still follows `iters`.
    time_limit_s = cfg.time_limit_min * 60 if cfg.get("time_limit_min") else None
    policy.train()
    bar = tqdm(total=cfg.iters, initial=step, dynamic_ncols=True, disable=not cfg.progress_bar)
    loss_value = None
    while step < cfg.iters:
        lr = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.iters, cfg.lr_scheduler, start=schedule_start)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = to_device(train_set.sample(cfg.batch_size, generator), device)
        loss = policy.compute_loss(batch, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(policy)
        step += 1

        loss_value = loss.item()
        loss_ema = loss_value if loss_ema is None else 0.98 * loss_ema + 0.02 * loss_value
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.iters:
            bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{lr:.2e}")
            elapsed = elapsed_before + time.time() - start_time
            with open(out_dir / LOG_FILE, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss_ema, "batch_loss": loss_value, "lr": lr,
                                    "time": round(elapsed, 1)}) + "\n")
            if run is not None:
                run.log({"loss": loss_value, "loss_ema": loss_ema, "lr": lr}, step=step)
        out_of_time = time_limit_s is not None and time.time() - start_time > time_limit_s
        out_of_time = out_of_time or (cfg.get("stop_at") is not None and step >= cfg.stop_at)
        if step % cfg.checkpoint_every == 0 or step == cfg.iters or out_of_time:
            checkpoint(step, loss_value)
        if out_of_time:
            tqdm.write(f"stopping at iter {step} (time_limit_min / stop_at); run again to resume")
            break
    bar.close()
    if run is not None:
        run.finish()
    return out_dir


@hydra.main(version_base=None, config_path="pkg://parapolicy.conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
