"""Import a Diffusion Policy (real-stanford/diffusion_policy) low-dim U-Net workspace checkpoint
(its hybrid image policy: ``parapolicy.importers.dp_image``).

DP's ``BaseWorkspace.save_checkpoint`` writes ``torch.save(payload, pickle_module=dill)`` with
``payload = {"cfg": <OmegaConf DictConfig>, "state_dicts": {"model", "ema_model", "optimizer"},
"pickles": {<name>: dill bytes}}``. The file is read with ``safe_pickle.safe_torch_load`` (no pickled code
runs), the config is read as plain values (interpolations are looked up, never evaluated), network sizes
come from the weight shapes, and DP's ``LinearNormalizer`` (per-dimension ``x * scale + offset``) becomes
our min/max normaliser: ``min = (-1 - offset) / scale``, ``max = (1 - offset) / scale`` is the same affine
map (DP's flat dimensions, scale 1 and offset -x, come out as a range of width 2 around x: still the
same map).

Supported: ``DiffusionUnetLowdimPolicy`` with ``obs_as_global_cond=True``, ``cond_predict_scale=True``,
``pred_action_steps_only=False``, ``n_groups=8``, a DDPM scheduler (or DDIM with default
``set_alpha_to_one`` / ``steps_offset``, sampled with our ``ddim``). Everything else is refused by name.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from parapolicy.importers.safe_pickle import UnsafePickleError, inert_to_plain, safe_loads, safe_torch_load
from parapolicy.policy.configuration import DiffusionPolicyConfig

FORMAT = "diffusion_policy.workspace"
LOWDIM_UNET_POLICY = "DiffusionUnetLowdimPolicy"
_MIN_SPAN = 1e-4  # parapolicy.policy.normalizer._MIN_RANGE: narrower ranges are treated as flat there
_DDPM_TARGETS = ("DDPMScheduler",)
_DDIM_TARGETS = ("DDIMScheduler",)
_TRANSFORMER_WEIGHTS = ("model.encoder.", "model.decoder.", "model.tok_emb", "model.input_emb.")  # DP-T's network
_REF = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")  # a plain reference, ${a.b}: looked up, nothing evaluated


class UnsupportedCheckpointError(ValueError):
    """The checkpoint is a kind of policy that parapolicy cannot run (the message says which and why)."""


@dataclass
class DPCheckpoint:
    """A DP workspace checkpoint read without running pickled code."""

    path: Path
    sha256: str
    cfg: dict[str, Any]  # plain values; interpolation strings kept raw
    state_dicts: dict[str, Any]
    pickles: dict[str, Any] = field(default_factory=dict)  # plain values that unpickled safely

    def get(self, dotted: str, default: Any = None) -> Any:
        """Config value at ``a.b.c``; plain ``${x.y}`` references are followed, other interpolations
        (``${eval:...}``, ``${now:...}``) count as missing and give ``default``."""
        return cfg_get(self.cfg, dotted, default)


def cfg_get(cfg: Mapping[str, Any], dotted: str, default: Any = None, _hops: int = 0) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    if isinstance(node, str) and "${" in node:
        match = _REF.match(node.strip())
        if match and _hops < 16:
            return cfg_get(cfg, match.group(1), default, _hops + 1)
        return default
    return node


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_dp_checkpoint(path: str | Path) -> DPCheckpoint:
    """Read and sanity-check the payload of a DP workspace ``.ckpt`` (see module docstring)."""
    path = Path(path)
    what = f"Diffusion Policy checkpoint {path.name}"
    payload = safe_torch_load(path, what)
    if not isinstance(payload, dict) or "state_dicts" not in payload or "cfg" not in payload:
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{what}: not a DP workspace checkpoint (expected keys cfg, state_dicts, pickles; got {keys})")
    cfg = inert_to_plain(payload["cfg"])
    if not isinstance(cfg, dict):
        raise ValueError(f"{what}: 'cfg' is not a config mapping")
    state_dicts = payload["state_dicts"]
    if not isinstance(state_dicts, dict):
        raise ValueError(f"{what}: 'state_dicts' is not a mapping")
    pickles: dict[str, Any] = {}
    for key, blob in dict(payload.get("pickles") or {}).items():
        # global_step / epoch / _output_dir: provenance only, read with the same restricted unpickler.
        # A blob that names a forbidden global refuses the whole file (as in cfg / state_dicts); one that
        # is merely unreadable is dropped, since nothing but provenance comes from here.
        try:
            value = safe_loads(blob) if isinstance(blob, (bytes, bytearray)) else None
        except UnsafePickleError as err:
            raise ValueError(f"{what}: refused, its pickles[{str(key)!r}] entry asks for {err.global_name!r}, "
                             f"which is not a tensor, container or config object; nothing from it was run") from err
        except Exception:
            value = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            pickles[str(key)] = value
    return DPCheckpoint(path=path, sha256=sha256_file(path), cfg=cfg, state_dicts=state_dicts, pickles=pickles)


# ------------------------------------------------------------------------------------------ checks
def _target(ckpt: DPCheckpoint, dotted: str) -> str:
    value = cfg_get(ckpt.cfg, dotted, "")
    return value if isinstance(value, str) else ""


def check_supported(ckpt: DPCheckpoint, weights: Mapping[str, torch.Tensor]) -> None:
    """Refuse, by name, every DP variant this importer cannot reproduce exactly."""
    what = f"Diffusion Policy checkpoint {ckpt.path.name}"
    policy_target = _target(ckpt, "policy._target_")
    name = policy_target.rsplit(".", 1)[-1]
    keys = list(weights)
    if any(k.startswith(("obs_encoder.", "model.obs_encoder")) for k in keys) or "image" in name.lower():
        raise UnsupportedCheckpointError(
            f"{what}: image / hybrid policies ({name or 'obs_encoder weights'}) are not supported; "
            f"parapolicy imports the low-dim U-Net policy ({LOWDIM_UNET_POLICY}) only")
    if "transformer" in name.lower() or any(k.startswith(_TRANSFORMER_WEIGHTS) for k in keys):
        raise UnsupportedCheckpointError(
            f"{what}: transformer policies ({name or 'TransformerForDiffusion weights'}) are not supported; "
            f"only the U-Net policy {LOWDIM_UNET_POLICY} is")
    if name and name != LOWDIM_UNET_POLICY:
        raise UnsupportedCheckpointError(f"{what}: policy class {name} is not supported; only {LOWDIM_UNET_POLICY} is")
    if not any(k.startswith("model.down_modules.") for k in keys):
        raise UnsupportedCheckpointError(f"{what}: no ConditionalUnet1D weights (model.down_modules.*) in the state dict")
    local = cfg_get(ckpt.cfg, "policy.obs_as_local_cond", cfg_get(ckpt.cfg, "obs_as_local_cond", False))
    if local is True or any(k.startswith("model.local_cond_encoder.") for k in keys):
        raise UnsupportedCheckpointError(
            f"{what}: local conditioning (obs_as_local_cond=True, model.local_cond_encoder) is not supported")
    glob = cfg_get(ckpt.cfg, "policy.obs_as_global_cond", cfg_get(ckpt.cfg, "obs_as_global_cond"))
    if glob is False:
        raise UnsupportedCheckpointError(
            f"{what}: inpainting policies (obs_as_global_cond=False: observations are in-painted into the "
            f"diffused trajectory) are not supported; retrain with obs_as_global_cond=True")
    only = cfg_get(ckpt.cfg, "policy.pred_action_steps_only", cfg_get(ckpt.cfg, "pred_action_steps_only", False))
    if only is True:
        raise UnsupportedCheckpointError(f"{what}: pred_action_steps_only=True is not supported")
    # FiLM with scale: cond_encoder.1 outputs 2 * out_channels; without it, out_channels (bias only).
    w = weights.get("model.mid_modules.0.cond_encoder.1.weight")
    c = weights.get("model.mid_modules.0.blocks.0.block.0.weight")
    if w is not None and c is not None and w.shape[0] != 2 * c.shape[0]:
        report = ", ".join(
            f"{k}: {list(v.shape)}" for k, v in weights.items() if k.endswith("cond_encoder.1.weight")
        )
        raise UnsupportedCheckpointError(
            f"{what}: cond_predict_scale=False (FiLM bias only) is not supported: cond_encoder.1 outputs "
            f"{w.shape[0]} = out_channels {c.shape[0]}, not 2 x out_channels. Shapes: {report}")
    if cfg_get(ckpt.cfg, "policy.model.cond_predict_scale") is False:
        raise UnsupportedCheckpointError(f"{what}: policy.model.cond_predict_scale=False is not supported")
    n_groups = cfg_get(ckpt.cfg, "policy.model.n_groups", 8)
    if n_groups != 8:
        # DP builds final_conv's Conv1dBlock with its default 8 groups whatever n_groups says.
        raise UnsupportedCheckpointError(
            f"{what}: n_groups={n_groups} is not supported (DP's final_conv always uses 8 groups, "
            f"parapolicy's U-Net uses n_groups throughout; only n_groups=8 maps exactly)")


# ------------------------------------------------------------------------------------- conversion
def _dims_from_weights(w: Mapping[str, torch.Tensor], what: str) -> dict[str, Any]:
    def shape(key: str) -> tuple[int, ...]:
        if key not in w:
            raise ValueError(f"{what}: missing weight {key}")
        return tuple(w[key].shape)

    levels = sorted({int(k.split(".")[2]) for k in w if k.startswith("model.down_modules.")})
    if levels != list(range(len(levels))):
        raise ValueError(f"{what}: down_modules levels {levels} are not contiguous")
    down_dims, kernel = [], None
    for i in levels:
        out_c, in_c, k = shape(f"model.down_modules.{i}.0.blocks.0.block.0.weight")
        down_dims.append(out_c)
        kernel = k if kernel is None else kernel
        if i == 0:
            action_dim = in_c
    step_dim = shape("model.diffusion_step_encoder.3.weight")[0]
    cond_dim = shape("model.mid_modules.0.cond_encoder.1.weight")[1]
    return dict(action_dim=action_dim, down_dims=down_dims, kernel_size=kernel,
                diffusion_step_embed_dim=step_dim, global_cond_dim=cond_dim - step_dim)


def _affine(sd: Mapping[str, torch.Tensor], key: str, dim: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = f"normalizer.params_dict.{key}"
    if f"{prefix}.scale" not in sd or f"{prefix}.offset" not in sd:
        raise ValueError(f"{what}: normaliser {prefix}.scale / .offset not found in the state dict")
    scale = sd[f"{prefix}.scale"].detach().to(torch.float64).reshape(-1)
    offset = sd[f"{prefix}.offset"].detach().to(torch.float64).reshape(-1)
    if scale.numel() == 1:  # a single global factor
        scale = scale.expand(dim)
    if offset.numel() == 1:
        offset = offset.expand(dim)
    if scale.numel() != dim or offset.numel() != dim:
        raise ValueError(f"{what}: {prefix} has {scale.numel()} / {offset.numel()} entries, the network needs {dim}")
    return scale, offset


def dp_affine_to_minmax(scale: torch.Tensor, offset: torch.Tensor, what: str = "normaliser") -> tuple[torch.Tensor, torch.Tensor]:
    """DP's ``y = x * scale + offset`` -> ``(min, max)`` with ``2 (x - min) / (max - min) - 1`` the same map.

    Needs ``0 < scale <= 2 / 1e-4`` (a narrower min/max range would count as flat in our normaliser).
    Computed in float64; returns float32.
    """
    scale, offset = scale.to(torch.float64), offset.to(torch.float64)
    if not torch.isfinite(scale).all() or not torch.isfinite(offset).all():
        raise ValueError(f"{what}: scale / offset contain NaN or inf")
    bad = (scale <= 0) | (2.0 / scale.clamp_min(1e-300) < _MIN_SPAN)
    if bad.any():
        idx = bad.nonzero().flatten().tolist()
        raise UnsupportedCheckpointError(
            f"{what}: dims {idx} have scale {scale[bad].tolist()}; a min/max normaliser needs 0 < scale <= "
            f"{2 / _MIN_SPAN:g}")
    return ((-1.0 - offset) / scale).float(), ((1.0 - offset) / scale).float()


def _int(value: Any, name: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what}: config value {name} = {value!r} is not a plain integer")
    return value


def build_config(ckpt: DPCheckpoint, weights: Mapping[str, torch.Tensor]) -> tuple[DiffusionPolicyConfig, dict[str, Any]]:
    """(our policy config, diffusers scheduler config) from the DP config + weight shapes."""
    what = f"Diffusion Policy checkpoint {ckpt.path.name}"
    get = ckpt.get
    dims = _dims_from_weights(weights, what)
    n_obs_steps = _int(get("policy.n_obs_steps", get("n_obs_steps")), "n_obs_steps", what)
    horizon = _int(get("policy.horizon", get("horizon")), "horizon", what)
    latency = get("n_latency_steps", 0)
    latency = _int(latency if latency is not None else 0, "n_latency_steps", what)
    n_action = get("n_action_steps")  # top level: the executed count; the policy plans it + latency
    policy_n_action = get("policy.n_action_steps")
    if n_action is None:
        n_action = _int(policy_n_action, "policy.n_action_steps", what) - latency
    n_action = _int(n_action, "n_action_steps", what)
    if isinstance(policy_n_action, int) and policy_n_action != n_action + latency:
        raise ValueError(f"{what}: policy.n_action_steps={policy_n_action} but n_action_steps + n_latency_steps "
                         f"= {n_action} + {latency}")
    if dims["global_cond_dim"] <= 0:  # no global conditioning in the weights: an inpainting U-Net
        raise UnsupportedCheckpointError(
            f"{what}: the U-Net has no global conditioning (cond width {dims['global_cond_dim'] + dims['diffusion_step_embed_dim']}"
            f" = step embedding only): inpainting policies are not supported")
    if dims["global_cond_dim"] % n_obs_steps:
        raise ValueError(f"{what}: global_cond_dim {dims['global_cond_dim']} is not a multiple of n_obs_steps={n_obs_steps}")
    obs_dim = dims["global_cond_dim"] // n_obs_steps
    for name, value in (("obs_dim", get("policy.obs_dim", get("obs_dim"))), ("action_dim", get("policy.action_dim", get("action_dim")))):
        expected = obs_dim if name == "obs_dim" else dims["action_dim"]
        if isinstance(value, int) and value != expected:
            raise ValueError(f"{what}: config says {name}={value}, the weights give {expected}")
    oa = get("policy.oa_step_convention", False)  # DP's constructor default is False
    if not isinstance(oa, bool):
        raise ValueError(f"{what}: policy.oa_step_convention={oa!r} is not true / false")

    sampler, steps, scheduler = read_scheduler(ckpt, what)
    extra = sorted(set(get("policy", {})) - _KNOWN_POLICY_KEYS)
    if extra:  # DP passes unknown policy keys to scheduler.step(**kwargs): we cannot honour them
        raise UnsupportedCheckpointError(f"{what}: policy options {extra} (passed to scheduler.step) are not supported")

    obs_keys = get("task.obs_keys", get("task.env_runner.obs_keys", [])) or []
    task_name = get("task.task_name", get("task_name"))
    action_space = read_action_space(ckpt, dims["action_dim"], what)
    env = _our_env(task_name, obs_dim, list(obs_keys), action_space)
    config = DiffusionPolicyConfig(
        obs_dim=obs_dim,
        action_dim=dims["action_dim"],
        action_space=action_space,
        obs_keys=[str(k) for k in obs_keys],
        env=env,
        horizon=horizon,
        n_obs_steps=n_obs_steps,
        n_action_steps=n_action,
        oa_step_convention=oa,
        n_latency_steps=latency,
        down_dims=dims["down_dims"],
        kernel_size=dims["kernel_size"],
        n_groups=8,
        diffusion_step_embed_dim=dims["diffusion_step_embed_dim"],
        num_train_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
        beta_schedule=str(scheduler.get("beta_schedule", "linear")),
        clip_sample=bool(scheduler.get("clip_sample", True)),
        prediction_type=str(scheduler.get("prediction_type", "epsilon")),
        sampler=sampler,
        num_inference_steps=steps,
    )
    return config, scheduler


def read_scheduler(ckpt: DPCheckpoint, what: str) -> tuple[str, int, dict[str, Any]]:
    """``policy.noise_scheduler`` -> (our sampler name, inference steps, diffusers scheduler config)."""
    get = ckpt.get
    sched = get("policy.noise_scheduler")
    if not isinstance(sched, dict):
        raise ValueError(f"{what}: policy.noise_scheduler not found in the config")
    target = str(sched.get("_target_", "DDPMScheduler")).rsplit(".", 1)[-1]
    scheduler = {k: v for k, v in sched.items() if k != "_target_"}
    unresolved = [k for k, v in scheduler.items() if isinstance(v, str) and "${" in v]
    if unresolved:
        raise ValueError(f"{what}: noise_scheduler values {unresolved} are interpolations; they are not evaluated")
    steps = get("policy.num_inference_steps")
    if steps is None:
        steps = scheduler.get("num_train_timesteps", 1000)
    steps = _int(steps, "policy.num_inference_steps", what)
    if target in _DDPM_TARGETS:
        sampler = "ddpm"
    elif target in _DDIM_TARGETS:
        if scheduler.pop("set_alpha_to_one", True) is not True or scheduler.get("steps_offset", 0) != 0:
            raise UnsupportedCheckpointError(f"{what}: DDIM with set_alpha_to_one=False or steps_offset != 0 is not supported")
        sampler = "ddim"
    else:
        raise UnsupportedCheckpointError(f"{what}: noise scheduler {target} is not supported (DDPMScheduler, DDIMScheduler)")
    return sampler, steps, scheduler


_ROBOMIMIC_TASKS = ("lift", "can", "square", "tool_hang", "transport")


def read_action_space(ckpt: DPCheckpoint, action_dim: int, what: str) -> str:
    """``delta``, or ``absolute_rot6d`` for DP's ``abs_action=True`` robomimic policies (position, 6D
    rotation, gripper: 10 per arm, for robosuite's OSC_POSE in absolute mode). Refused by name: two arms
    (transport, 20), other rotation representations, and absolute actions outside robomimic (kitchen's
    joint targets, block pushing's positions), which are not robosuite poses."""
    get = ckpt.get
    abs_action = any(get(key) is True for key in ("task.abs_action", "abs_action", "task.env_runner.abs_action",
                                                  "task.dataset.abs_action"))
    if not abs_action:
        return "delta"
    task = get("task.task_name", get("task_name"))
    runner = str(get("task.env_runner._target_", "") or "")
    if task not in _ROBOMIMIC_TASKS and "robomimic" not in runner:
        raise UnsupportedCheckpointError(f"{what}: absolute actions of task {task or get('task.name')!r} are not "
                                         f"robosuite end-effector poses; only robomimic's abs_action tasks are supported")
    rep = get("task.dataset.rotation_rep", "rotation_6d")
    if rep != "rotation_6d":
        raise UnsupportedCheckpointError(f"{what}: abs_action with rotation_rep={rep!r} is not supported (only rotation_6d)")
    if action_dim == 20:
        raise UnsupportedCheckpointError(f"{what}: two-arm absolute actions (20 = 2 x 10, e.g. transport) are not "
                                         f"supported: parapolicy's envs have one arm")
    if action_dim != 10:
        raise UnsupportedCheckpointError(f"{what}: abs_action=True with action_dim={action_dim}; robomimic's absolute "
                                         f"actions are 10 per arm (position 3, 6D rotation 6, gripper 1)")
    return "absolute_rot6d"


_KNOWN_POLICY_KEYS = {
    "_target_", "model", "noise_scheduler", "horizon", "obs_dim", "action_dim", "n_action_steps", "n_obs_steps",
    "num_inference_steps", "obs_as_local_cond", "obs_as_global_cond", "pred_action_steps_only", "oa_step_convention",
}


def _our_env(task_name: Any, obs_dim: int, obs_keys: list[str], action_space: str = "delta") -> str | None:
    """Our env of the same name when its observation layout matches (DP's square/lift/can low-dim tasks;
    absolute actions: its ``*_abs`` twin)."""
    try:
        from parapolicy.envs.robosuite_env import TASKS
    except Exception:  # envs need gymnasium; the conversion itself does not
        return None
    suffix = "" if action_space == "delta" else "_abs"
    spec = TASKS.get(f"{task_name}{suffix}") if task_name is not None else None
    if spec is None or spec.obs_dim != obs_dim or (obs_keys and tuple(obs_keys) != tuple(spec.obs_keys)):
        return None
    return spec.name


def default_weights(ckpt: DPCheckpoint) -> str:
    """``ema`` when the run trained with EMA (``training.use_ema``), else ``model``; ema if unknown."""
    use_ema = ckpt.get("training.use_ema")
    if use_ema is False:
        return "model"
    return "ema"


def convert_dp_checkpoint(
    source: str | Path, out: str | Path, weights: str | None = None, overwrite: bool = False,
    convert_image: Callable[..., Path] | None = None, convert_transformer: Callable[..., Path] | None = None,
) -> Path:
    """DP workspace ``.ckpt`` -> parapolicy checkpoint folder ``out`` (model.safetensors + config.json).

    ``weights``: ``"ema"`` or ``"model"`` (default: ``default_weights``). Everything is read and checked
    before ``out`` is created; a refused or broken file leaves nothing behind. ``convert_image(ckpt, sd,
    weights_key, source, out)`` takes over image policies (``parapolicy.importers.dp_image``; passed in by
    ``parapolicy.convert``, so that this module does not import it); without it they are refused.
    ``convert_transformer`` (same arguments) takes over DP-T policies (``parapolicy.importers.dp_transformer``).
    """
    from parapolicy.policy.checkpoint import save_converted
    from parapolicy.policy.diffusion_policy import DiffusionPolicy

    source, out = Path(source), Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise FileExistsError(f"output {out} exists and is not empty (pass overwrite=True / --overwrite)")
    ckpt = read_dp_checkpoint(source)
    what = f"Diffusion Policy checkpoint {source.name}"
    weights = weights or default_weights(ckpt)
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    key = "ema_model" if weights == "ema" else "model"
    sd = ckpt.state_dicts.get(key)
    if not isinstance(sd, Mapping) or not sd:
        raise ValueError(f"{what}: no state_dicts[{key!r}] (has {sorted(ckpt.state_dicts)}); try --weights "
                         f"{'model' if weights == 'ema' else 'ema'}")
    bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{what}: state_dicts[{key!r}] entries {bad[:5]} are not tensors")
    name = _target(ckpt, "policy._target_").rsplit(".", 1)[-1].lower()
    if convert_transformer is not None and ("transformer" in name or any(k.startswith(_TRANSFORMER_WEIGHTS) for k in sd)):
        return convert_transformer(ckpt, sd, key, source, out)
    image = "image" in name
    if convert_image is not None and (image or any(k.startswith("obs_encoder.") for k in sd)):
        return convert_image(ckpt, sd, key, source, out)
    check_supported(ckpt, sd)
    config, scheduler = build_config(ckpt, sd)

    policy = DiffusionPolicy(config, scheduler_config=scheduler)
    model_sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    load_network_weights(policy, model_sd, what, "U-Net", "ConditionalUnet1D")
    for name, dim in (("obs", config.obs_dim), ("action", config.action_dim)):
        scale, offset = _affine(sd, name, dim, what)
        lo, hi = dp_affine_to_minmax(scale, offset, f"{what}: normalizer {name}")
        getattr(policy.normalizer, name).set_stats(lo, hi)

    excerpt_keys = ("name", "_target_", "task_name", "horizon", "n_obs_steps", "n_action_steps", "n_latency_steps",
                    "obs_as_global_cond", "policy", "task.obs_keys", "task.obs_dim", "task.action_dim", "training.use_ema",
                    "training.seed")
    excerpt = {k: _excerpt(ckpt.get(k) if "." in k else ckpt.cfg.get(k)) for k in excerpt_keys}
    training = {
        "converted_from": {
            "format": FORMAT,
            "source": source.name,
            "sha256": ckpt.sha256,
            "weights": key,
            **{k: v for k, v in ckpt.pickles.items() if k in ("global_step", "epoch")},
            "dp_config": {k: v for k, v in excerpt.items() if v is not None},
        },
        "converter": "parapolicy.convert",
    }
    return save_converted(policy, out, training)


def load_network_weights(policy: Any, state: Mapping[str, torch.Tensor], what: str, kind: str,
                         dp_class: str) -> None:
    """Load a DP network's weights ``state`` (keys without ``model.``) into ``policy.model``, refusing any
    that miss, add, reshape or hold NaN / inf (named by ``kind`` and DP's ``dp_class``)."""
    expected = policy.model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what}: {kind} weights do not match DP's {dp_class} layout: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ValueError(f"{what}: model.{key} has shape {list(state[key].shape)}, expected {list(ref.shape)}")
        if not torch.isfinite(state[key]).all():
            raise ValueError(f"{what}: model.{key} contains NaN or inf")
    policy.model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def _excerpt(value: Any) -> Any:
    if isinstance(value, dict):  # the policy block minus the bulky bits nobody needs to read again
        return {k: _excerpt(v) for k, v in value.items() if k not in ("ema", "optimizer")}
    return value
