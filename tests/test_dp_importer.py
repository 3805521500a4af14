"""The DP importer against references that do not come from parapolicy itself.

- hostile ``pickles`` blobs are refused by name, nothing runs and nothing is written (the other hostile
  tests put the payload in ``cfg`` / ``state_dicts``);
- DP's ConditionalUnet1D state-dict names and shapes, enumerated here from DP's architecture (not from
  our module), and DP's forward pass written out functionally on those names: the converted policy's
  actions equal DP's loop run on that forward, so a renamed or re-ordered parameter in our U-Net (the
  importer maps names one to one) cannot pass by construction;
- DDIM scheduler checkpoints convert to our ``ddim`` and plan as diffusers' ``DDIMScheduler`` loop; the
  DDIM and scheduler variants we cannot reproduce are refused by name.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import zipfile

import dill
import pytest
import torch
import torch.nn.functional as F

from dp_format import (Malicious, dp_checkpoint_from_policy, dp_predict_action, dp_state_dict, draws_in_dp_order,
                       shipped_dp_normalizer)
from parapolicy.convert import convert, main
from parapolicy.importers.diffusion_policy import UnsupportedCheckpointError
from parapolicy.policy import DiffusionPolicy, DiffusionPolicyConfig, load_policy


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_policy(seed: int = 0, down_dims=(16, 32, 64)) -> DiffusionPolicy:
    torch.manual_seed(seed)
    policy = DiffusionPolicy(DiffusionPolicyConfig(obs_dim=23, action_dim=7, down_dims=list(down_dims),
                                                   diffusion_step_embed_dim=16, horizon=16))
    g = torch.Generator().manual_seed(seed)
    lo = torch.randn(23, generator=g)
    policy.normalizer.obs.set_stats(lo, lo + 0.5 + torch.rand(23, generator=g))
    policy.normalizer.action.set_stats(-torch.ones(7), torch.ones(7) * 1.5)
    # GroupNorm / bias parameters start at 1 / 0: randomise them so a swapped pair cannot hide
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy.eval()


def random_obs(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 2, 23, generator=torch.Generator().manual_seed(seed)) * 0.2


# --------------------------------------------------------------------------- hostile pickles entries
@pytest.mark.parametrize("func, args, name", [
    (os.system, ("touch '{marker}'",), "system"),
    (eval, ("open(r'{marker}', 'w').close()",), "builtins.eval"),
    (__import__("subprocess").call, (["touch", "{marker}"],), "subprocess.call"),
])
def test_hostile_pickles_blob_is_refused_by_name_and_nothing_is_written(tmp_path, capsys, func, args, name):
    """DP stores ``pickles`` as dill blobs inside the pickle: a blob that names a forbidden global refuses
    the whole file, even though the rest of it (cfg, weights) is a valid checkpoint."""
    marker = tmp_path / "pwned"
    args = tuple([a.format(marker=marker) for a in x] if isinstance(x, list) else x.format(marker=marker) for x in args)
    policy = small_policy()
    clean = dp_checkpoint_from_policy(tmp_path / "clean.ckpt", policy, num_inference_steps=10)
    assert (convert(clean, tmp_path / "clean_out") / "config.json").exists()  # the control converts

    hostile = dp_checkpoint_from_policy(tmp_path / "evil.ckpt", policy, num_inference_steps=10,
                                        extra_pickles={"evil": dill.dumps(Malicious(func, *args))})
    out = tmp_path / "out"
    assert main([str(hostile), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and name in err and "evil" in err, err
    with pytest.raises(ValueError, match=name):
        convert(hostile, out)
    assert not marker.exists(), "the pickled command ran"
    assert not out.exists(), "something was written"


def test_unreadable_pickles_blob_is_only_provenance_and_is_dropped(tmp_path):
    policy = small_policy()
    source = dp_checkpoint_from_policy(tmp_path / "dp.ckpt", policy, num_inference_steps=10,
                                       extra_pickles={"broken": b"\x80\x04not a pickle"})
    folder = convert(source, tmp_path / "out")
    origin = json.loads((folder / "config.json").read_text())["training"]["converted_from"]
    assert origin["global_step"] == 1234 and "broken" not in origin


# ------------------------------------------------------------------- DP's U-Net, written from its paper
def dp_unet_shapes(action_dim: int, global_cond_dim: int, down_dims: list[int], step_dim: int,
                   kernel: int) -> dict[str, tuple[int, ...]]:
    """Every parameter / buffer name of DP's ``ConditionalUnet1D`` (cond_predict_scale=True, no local
    conditioning) with its shape, as DP's module tree names them (``model.`` prefix of the policy)."""
    shapes: dict[str, tuple[int, ...]] = {}
    cond = step_dim + global_cond_dim

    def conv_block(prefix, c_in, c_out, k):  # Sequential(Conv1d, GroupNorm, Mish)
        shapes[f"{prefix}.block.0.weight"] = (c_out, c_in, k)
        shapes[f"{prefix}.block.0.bias"] = (c_out,)
        shapes[f"{prefix}.block.1.weight"] = (c_out,)
        shapes[f"{prefix}.block.1.bias"] = (c_out,)

    def res_block(prefix, c_in, c_out):
        conv_block(f"{prefix}.blocks.0", c_in, c_out, kernel)
        conv_block(f"{prefix}.blocks.1", c_out, c_out, kernel)
        shapes[f"{prefix}.cond_encoder.1.weight"] = (2 * c_out, cond)  # Sequential(Mish, Linear, Rearrange)
        shapes[f"{prefix}.cond_encoder.1.bias"] = (2 * c_out,)
        if c_in != c_out:
            shapes[f"{prefix}.residual_conv.weight"] = (c_out, c_in, 1)
            shapes[f"{prefix}.residual_conv.bias"] = (c_out,)

    shapes["model.diffusion_step_encoder.1.weight"] = (4 * step_dim, step_dim)
    shapes["model.diffusion_step_encoder.1.bias"] = (4 * step_dim,)
    shapes["model.diffusion_step_encoder.3.weight"] = (step_dim, 4 * step_dim)
    shapes["model.diffusion_step_encoder.3.bias"] = (step_dim,)
    dims = [action_dim, *down_dims]
    pairs = list(zip(dims[:-1], dims[1:]))
    for i, (c_in, c_out) in enumerate(pairs):
        res_block(f"model.down_modules.{i}.0", c_in, c_out)
        res_block(f"model.down_modules.{i}.1", c_out, c_out)
        if i < len(pairs) - 1:
            shapes[f"model.down_modules.{i}.2.conv.weight"] = (c_out, c_out, 3)
            shapes[f"model.down_modules.{i}.2.conv.bias"] = (c_out,)
    res_block("model.mid_modules.0", down_dims[-1], down_dims[-1])
    res_block("model.mid_modules.1", down_dims[-1], down_dims[-1])
    for i, (c_in, c_out) in enumerate(reversed(pairs[1:])):
        res_block(f"model.up_modules.{i}.0", 2 * c_out, c_in)
        res_block(f"model.up_modules.{i}.1", c_in, c_in)
        # DP's "is_last" test in the up path never holds: every up level has its Upsample1d
        shapes[f"model.up_modules.{i}.2.conv.weight"] = (c_in, c_in, 4)  # ConvTranspose1d: [in, out, k]
        shapes[f"model.up_modules.{i}.2.conv.bias"] = (c_in,)
    conv_block("model.final_conv.0", down_dims[0], down_dims[0], kernel)
    shapes["model.final_conv.1.weight"] = (action_dim, down_dims[0], 1)
    shapes["model.final_conv.1.bias"] = (action_dim,)
    return shapes


def dp_unet_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, global_cond: torch.Tensor,
                    *, n_levels: int, step_dim: int, n_groups: int = 8) -> torch.Tensor:
    """DP's ConditionalUnet1D forward, functionally, on DP's parameter names. x ``[B, H, A]`` -> ``[B, H, A]``."""
    def p(name):
        return sd[f"model.{name}"]

    def conv_block(prefix, h):
        h = F.conv1d(h, p(f"{prefix}.block.0.weight"), p(f"{prefix}.block.0.bias"),
                     padding=p(f"{prefix}.block.0.weight").shape[-1] // 2)
        h = F.group_norm(h, n_groups, p(f"{prefix}.block.1.weight"), p(f"{prefix}.block.1.bias"))
        return F.mish(h)

    def res_block(prefix, h, cond):
        out = conv_block(f"{prefix}.blocks.0", h)
        film = F.linear(F.mish(cond), p(f"{prefix}.cond_encoder.1.weight"), p(f"{prefix}.cond_encoder.1.bias"))
        film = film.reshape(film.shape[0], 2, out.shape[1], 1)
        out = film[:, 0] * out + film[:, 1]  # DP: first half scales, second half shifts
        out = conv_block(f"{prefix}.blocks.1", out)
        skip = h
        if f"model.{prefix}.residual_conv.weight" in sd:
            skip = F.conv1d(h, p(f"{prefix}.residual_conv.weight"), p(f"{prefix}.residual_conv.bias"))
        return out + skip

    t = t.reshape(-1).expand(x.shape[0]).to(x.dtype)
    half = step_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=x.dtype) * -(math.log(10000) / (half - 1)))
    angles = t[:, None] * freqs[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    emb = F.linear(F.mish(F.linear(emb, p("diffusion_step_encoder.1.weight"), p("diffusion_step_encoder.1.bias"))),
                   p("diffusion_step_encoder.3.weight"), p("diffusion_step_encoder.3.bias"))
    cond = torch.cat([emb, global_cond], dim=-1)
    h, skips = x.transpose(1, 2), []
    for i in range(n_levels):
        h = res_block(f"down_modules.{i}.0", h, cond)
        h = res_block(f"down_modules.{i}.1", h, cond)
        skips.append(h)
        if i < n_levels - 1:
            h = F.conv1d(h, p(f"down_modules.{i}.2.conv.weight"), p(f"down_modules.{i}.2.conv.bias"), stride=2, padding=1)
    h = res_block("mid_modules.0", h, cond)
    h = res_block("mid_modules.1", h, cond)
    for i in range(n_levels - 1):
        h = torch.cat([h, skips.pop()], dim=1)
        h = res_block(f"up_modules.{i}.0", h, cond)
        h = res_block(f"up_modules.{i}.1", h, cond)
        h = F.conv_transpose1d(h, p(f"up_modules.{i}.2.conv.weight"), p(f"up_modules.{i}.2.conv.bias"), stride=2, padding=1)
    h = conv_block("final_conv.0", h)
    h = F.conv1d(h, p("final_conv.1.weight"), p("final_conv.1.bias"))
    return h.transpose(1, 2)


def test_our_unet_carries_dps_parameter_names_and_shapes():
    policy = small_policy()
    ours = {f"model.{k}": tuple(v.shape) for k, v in policy.model.state_dict().items()}
    assert ours == dp_unet_shapes(7, 46, [16, 32, 64], 16, 5)


@pytest.mark.parametrize("down_dims", [(16, 32), (16, 32, 64)])
def test_converted_policy_plans_dps_loop_on_an_independent_unet_forward(tmp_path, down_dims):
    """DP-format file -> convert -> our predict_action equals DP's loop whose denoiser is the functional
    DP forward above on the file's own state dict (no parapolicy module on the reference side)."""
    policy = small_policy(seed=3, down_dims=down_dims)
    source = dp_checkpoint_from_policy(tmp_path / "dp.ckpt", policy, num_inference_steps=10)
    converted = load_policy(convert(source, tmp_path / "out"), sampler="ddpm")
    sd = torch.load(source, map_location="cpu", weights_only=False, pickle_module=dill)["state_dicts"]["ema_model"]

    def dp_model(x, t, global_cond):
        return dp_unet_forward(sd, x, torch.as_tensor(t), global_cond, n_levels=len(down_dims), step_dim=16)

    obs = random_obs(2, seed=9)
    with torch.no_grad():
        reference = dp_predict_action(dp_model, sd, converted.scheduler_config, obs, horizon=16, n_obs_steps=2,
                                      n_action_steps=8, num_inference_steps=10, oa_step_convention=True,
                                      generator=torch.Generator().manual_seed(5))
    x_T, noise = draws_in_dp_order(torch.Generator().manual_seed(5), 2, 16, 7, converted.sampler.timesteps)
    ours = converted.predict_action(obs, x_T=x_T, noise=noise)
    torch.testing.assert_close(ours["action"], reference["action"], atol=2e-5, rtol=0)
    assert (ours["action"] - reference["action"]).abs().max() < 2e-5
    assert ours["action"].std() > 0.05  # a real plan, not a constant both sides agree on


# ------------------------------------------------------------------------------------ DDIM schedulers
DDIM = {
    "_target_": "diffusers.schedulers.scheduling_ddim.DDIMScheduler",
    "num_train_timesteps": 100,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "squaredcos_cap_v2",
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
}


def test_ddim_checkpoint_converts_to_our_ddim_and_plans_as_diffusers_ddim(tmp_path):
    from diffusers import DDIMScheduler

    policy = small_policy(seed=4)
    source = dp_checkpoint_from_policy(tmp_path / "dp.ckpt", policy, noise_scheduler=dict(DDIM), num_inference_steps=8)
    converted = load_policy(convert(source, tmp_path / "out"))
    assert converted.config.sampler == "ddim" and converted.sampler.num_inference_steps == 8
    assert not converted.sampler.is_stochastic

    scheduler = DDIMScheduler(**{k: v for k, v in DDIM.items() if k != "_target_"})
    scheduler.set_timesteps(8)
    sd = dp_state_dict(policy, *shipped_dp_normalizer(policy))
    obs = random_obs(2, seed=2)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 16, 7, generator=g)
    with torch.no_grad():
        nobs = obs * sd["normalizer.params_dict.obs.scale"] + sd["normalizer.params_dict.obs.offset"]
        cond = nobs[:, :2].reshape(2, -1)
        traj = x.clone()
        for t in scheduler.timesteps:
            traj = scheduler.step(policy.model(traj, t, cond), t, traj).prev_sample
        expected = (traj - sd["normalizer.params_dict.action.offset"]) / sd["normalizer.params_dict.action.scale"]
        ours = converted.predict_action(obs, x_T=x)
    torch.testing.assert_close(ours["action_pred"], expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("change, message", [
    ({"set_alpha_to_one": False}, "set_alpha_to_one=False"),
    ({"steps_offset": 1}, "steps_offset"),
    ({"_target_": "diffusers.schedulers.scheduling_dpmsolver_multistep.DPMSolverMultistepScheduler"},
     "DPMSolverMultistepScheduler is not supported"),
])
def test_ddim_variants_and_other_schedulers_are_refused_by_name(tmp_path, change, message):
    policy = small_policy()
    source = dp_checkpoint_from_policy(tmp_path / "dp.ckpt", policy, noise_scheduler={**DDIM, **change},
                                       num_inference_steps=8)
    with pytest.raises(UnsupportedCheckpointError, match=message):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra_key, message", [("obs_encoder.nets.rgb.conv1.weight", "image"),
                                                ("model.obs_encoder.key_model_map.rgb.fc.weight", "image / hybrid"),
                                                ("model.encoder.layers.0.linear1.weight", "transformer"),
                                                ("model.tok_emb.weight", "transformer")])
def test_weights_of_another_architecture_are_refused_whatever_the_class_says(tmp_path, extra_key, message):
    """A checkpoint named as the low-dim U-Net policy but carrying an image encoder's or a transformer's
    weights is refused by what the weights are (the class name alone is not trusted)."""
    from dp_format import dp_config, write_dp_checkpoint

    policy = small_policy()
    sd = {**dp_state_dict(policy, *shipped_dp_normalizer(policy)), extra_key: torch.zeros(2)}
    cfg = dp_config(obs_dim=policy.config.obs_dim, action_dim=policy.config.action_dim,
                    down_dims=list(policy.config.down_dims),
                    diffusion_step_embed_dim=policy.config.diffusion_step_embed_dim,
                    kernel_size=policy.config.kernel_size)
    source = write_dp_checkpoint(tmp_path / "dp.ckpt", cfg, sd, dict(sd))
    with pytest.raises(UnsupportedCheckpointError, match=message):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_scheduler_without_target_is_dps_default_ddpm(tmp_path):
    """DP's noise_scheduler without ``_target_`` is a DDPMScheduler (DP's default), not refused."""
    policy = small_policy()
    ddpm = {k: v for k, v in DDIM.items() if k not in ("_target_", "set_alpha_to_one", "steps_offset")}
    source = dp_checkpoint_from_policy(tmp_path / "dp.ckpt", policy, noise_scheduler=ddpm, num_inference_steps=8)
    converted = load_policy(convert(source, tmp_path / "out"))
    assert converted.config.sampler == "ddpm" and converted.sampler.num_inference_steps == 8


def test_dp_normaliser_becomes_the_same_min_max_map_and_bad_ones_are_refused():
    """DP's y = x * scale + offset equals our 2 (x - min) / (max - min) - 1 with min = (-1 - offset) / scale,
    max = (1 - offset) / scale; zero or negative scales, NaN or inf anywhere, and ranges our normaliser would
    take as flat are refused."""
    from parapolicy.importers.diffusion_policy import dp_affine_to_minmax

    scale, offset = torch.tensor([0.5, 2.0, 40.0]), torch.tensor([0.1, -0.3, 2.0])
    low, high = dp_affine_to_minmax(scale, offset)
    x = torch.tensor([[-1.0, 0.25, 3.0], [2.0, -0.5, 0.01]])
    torch.testing.assert_close(2 * (x - low) / (high - low) - 1, x * scale + offset, rtol=1e-5, atol=1e-5)
    for bad_scale, bad_offset, message in (
        ([0.5, 0.0, 1.0], [0.0, 0.0, 0.0], r"dims \[1\]"),
        ([0.5, -2.0, 1.0], [0.0, 0.0, 0.0], r"dims \[1\]"),
        ([0.5, 1.0, 3e4], [0.0, 0.0, 0.0], r"dims \[2\]"),  # a span of 2 / 3e4 < 1e-4: flat
        ([0.5, 1.0, 1.0], [0.0, float("nan"), 0.0], "NaN or inf"),
        ([0.5, float("inf"), 1.0], [0.0, 0.0, 0.0], "NaN or inf"),
    ):
        with pytest.raises(ValueError, match=message):
            dp_affine_to_minmax(torch.tensor(bad_scale), torch.tensor(bad_offset))


# ------------------------------------------------------------------------------- the restricted reader
def test_config_values_come_back_as_the_same_plain_values():
    """DP's cfg is an OmegaConf object pickled with dill: every kind of value comes back as plain data,
    interpolations as their raw strings (never resolved, never evaluated)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    from parapolicy.importers.safe_pickle import inert_to_plain, safe_loads

    values = {"int": 3, "float": 2.5, "yes": True, "no": False, "none": None, "text": "square",
              "list": [1, "${int}", {"deep": [False, 0.5]}], "nested": {"ref": "${eval:'1+1'}", "empty": {}},
              "empty_list": []}
    plain = inert_to_plain(safe_loads(dill.dumps(OmegaConf.create(values))))
    assert plain == values
    assert repr(plain) == repr(values)  # bool stays bool, int stays int, float stays float

    # null sub-configs stay null, a sub-config that is an interpolation stays its string, a value of a
    # class the reader does not model becomes its name; plain containers (tuples as lists) as well
    odd = OmegaConf.create({"sub": DictConfig(None), "seq": ListConfig(None), "meta": DictConfig("${shape}"),
                            "shape": {"a": 1}, "path": pathlib.Path("/data/demo.hdf5")})
    assert inert_to_plain(safe_loads(dill.dumps(odd))) == {"sub": None, "seq": None, "meta": "${shape}",
                                                         "shape": {"a": 1}, "path": "<pathlib.PosixPath>"}
    plain_containers = {"a": [1, {"b": (2, 3)}], 4: "four", "raw": b"\x00"}
    assert inert_to_plain(safe_loads(dill.dumps(plain_containers))) == {"a": [1, {"b": [2, 3]}], "4": "four",
                                                                        "raw": "<bytes>"}

    deep: dict = {}
    node = deep
    for _ in range(70):  # the reader stops at 64 levels, in plain containers and in OmegaConf's own
        node["x"] = {}
        node = node["x"]
    nested_list: list = []
    node = nested_list
    for _ in range(70):
        node.append([])
        node = node[0]
    for blob in (deep, nested_list, OmegaConf.create(deep), OmegaConf.create({"x": nested_list})):
        with pytest.raises(ValueError, match="nests too deeply"):
            inert_to_plain(safe_loads(dill.dumps(blob)))


def test_a_checkpoint_saved_on_a_gpu_reads_on_the_cpu(tmp_path, monkeypatch):
    """DP's checkpoints come from GPU training: their storages say "cuda:0". The reader maps them to the
    CPU (a CPU-only machine could not create them there; a GPU machine would put them on the GPU)."""
    import torch.serialization

    from parapolicy.importers.safe_pickle import safe_torch_load

    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    with monkeypatch.context() as patch:  # as torch.save writes a CUDA tensor's storage
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"state_dicts": {"model": weights}}, tmp_path / "gpu.ckpt")
    with zipfile.ZipFile(tmp_path / "gpu.ckpt") as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"cuda:0" in pickled
    loaded = safe_torch_load(tmp_path / "gpu.ckpt")["state_dicts"]["model"]["w"]
    assert loaded.device.type == "cpu" and torch.equal(loaded, weights["w"])


@pytest.mark.parametrize("protocol", [0, 1])
def test_protocol_0_and_1_configs_rebuild_only_stand_ins(protocol):
    """Protocols 0 and 1 rebuild objects through copyreg._reconstructor: an OmegaConf config still comes
    back as its plain values, and the reconstructor refuses to build anything but a stand-in."""
    import pickle

    from omegaconf import OmegaConf

    from parapolicy.importers.safe_pickle import inert_to_plain, safe_loads

    values = {"horizon": 16, "keys": ["object", "robot0_eef_pos"], "ema": {"power": 0.75}}
    blob = dill.dumps(OmegaConf.create(values), protocol=protocol)
    assert b"_reconstructor" in blob and inert_to_plain(safe_loads(blob)) == values
    # copyreg._reconstructor(collections.OrderedDict, object, None), written by hand: both names allowed
    forged = b"ccopy_reg\n_reconstructor\n(ccollections\nOrderedDict\nc__builtin__\nobject\nNtR."
    with pytest.raises(pickle.UnpicklingError, match="_reconstructor asked to build"):
        safe_loads(forged)


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_old_protocol_pickles_are_read_and_refused_under_python3_names(protocol):
    import pickle

    from parapolicy.importers.safe_pickle import UnsafePickleError, safe_loads

    data = {"bytes": b"\x00\xff raw", "tuple": (1, 2.0), "set": {3}, "range": range(3)}  # range: __builtin__.xrange
    assert safe_loads(pickle.dumps(data, protocol=protocol)) == data
    with pytest.raises(UnsafePickleError) as info:
        safe_loads(pickle.dumps(Malicious(eval, "1"), protocol=protocol))
    assert info.value.global_name == "builtins.eval" and "builtins.eval" in str(info.value)
