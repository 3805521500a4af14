"""python -m parapolicy.convert: Diffusion Policy workspace checkpoints -> parapolicy checkpoints.

The DP files are written by tests/dp_format.py the way DP's save_checkpoint writes them (dill, a real
OmegaConf DictConfig, DP's state-dict names and LinearNormalizer), holding the shipped Square policy's
weights or a small random U-Net.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import subprocess

import pytest
import torch

from dp_format import (
    dp_checkpoint_from_policy,
    dp_config,
    dp_limits,
    dp_predict_action,
    dp_state_dict,
    draws_in_dp_order,
    shipped_dp_normalizer,
    write_dp_checkpoint,
    write_malicious_checkpoint,
)
from parapolicy.convert import convert, main
from parapolicy.importers.diffusion_policy import UnsupportedCheckpointError, dp_affine_to_minmax
from parapolicy.policy import DiffusionPolicy, DiffusionPolicyConfig, MinMaxNormalizer, load_policy
from parapolicy.policy.checkpoint import CHECKPOINTS_DIR


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny forward passes: a second intra-op thread only adds contention on a shared CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shipped():
    return load_policy("square", sampler="ddpm")


@pytest.fixture(scope="module")
def converted(shipped, tmp_path_factory):
    """The shipped Square policy -> DP checkpoint (unresolved cfg, as in DP's yaml) -> parapolicy folder."""
    root = tmp_path_factory.mktemp("dp_square")
    source = dp_checkpoint_from_policy(root / "epoch=0100-test_mean_score=0.900.ckpt", shipped)
    assert main([str(source), "--out", str(root / "out")]) == 0
    return source, root / "out"


def small_policy(seed: int = 0, **overrides) -> DiffusionPolicy:
    torch.manual_seed(seed)
    cfg = dict(obs_dim=23, action_dim=7, down_dims=[16, 32], diffusion_step_embed_dim=16, horizon=16)
    policy = DiffusionPolicy(DiffusionPolicyConfig(**{**cfg, **overrides}))
    g = torch.Generator().manual_seed(seed)
    lo = torch.randn(23, generator=g)
    policy.normalizer.obs.set_stats(lo, lo + 0.5 + torch.rand(23, generator=g))
    policy.normalizer.action.set_stats(-torch.ones(7), torch.ones(7) * 1.5)
    return policy.eval()


def random_obs(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 2, 23, generator=torch.Generator().manual_seed(seed)) * 0.2


# ------------------------------------------------------------------------------ shipped Square policy
def test_converted_square_plans_the_shipped_policys_actions(shipped, converted):
    source, out = converted
    policy = load_policy(out)
    for key in ("obs_dim", "action_dim", "obs_keys", "env", "horizon", "n_obs_steps", "n_action_steps", "down_dims",
                "kernel_size", "diffusion_step_embed_dim", "num_inference_steps", "beta_schedule", "sampler"):
        assert getattr(policy.config, key) == getattr(shipped.config, key), key
    assert policy.scheduler_config == shipped.scheduler_config
    assert policy.config.action_start == 1
    # same weights, scheduler and normaliser: the same steps for any schedule length (20 keeps CI fast)
    policy.set_sampler("ddpm", 20)
    shipped.set_sampler("ddpm", 20)
    g = torch.Generator().manual_seed(0)
    obs = random_obs(2)
    x_T, noise = torch.randn(2, 16, 7, generator=g), torch.randn(20, 2, 16, 7, generator=g)
    ours = policy.predict_action(obs, x_T=x_T, noise=noise)
    reference = shipped.predict_action(obs, x_T=x_T, noise=noise)
    torch.testing.assert_close(ours["action_pred"], reference["action_pred"], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["action"], reference["action"], atol=1e-5, rtol=0)

    config = json.loads((out / "config.json").read_text())
    origin = config["training"]["converted_from"]
    assert origin["source"] == source.name and origin["weights"] == "ema_model"
    assert origin["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert origin["global_step"] == 1234 and origin["epoch"] == 56
    assert origin["dp_config"]["policy"]["n_action_steps"] == "${eval:'${n_action_steps}+${n_latency_steps}'}"


def test_converted_square_paraddpm_converges_to_ddpm(converted):
    policy = load_policy(converted[1], sampler="ddpm", num_inference_steps=10)
    g = torch.Generator().manual_seed(3)
    obs = random_obs(1, seed=4)
    x_T, noise = torch.randn(1, 16, 7, generator=g), torch.randn(10, 1, 16, 7, generator=g)
    sequential = policy.predict_action(obs, x_T=x_T, noise=noise)
    policy.set_sampler("paraddpm", 10, window=10, tolerance=1e-6)
    parallel = policy.predict_action(obs, x_T=x_T, noise=noise)
    assert parallel["converged"] and parallel["rounds"] <= 10
    torch.testing.assert_close(parallel["action"], sequential["action"], atol=1e-4, rtol=0)


def test_converted_square_matches_dps_own_loop_for_the_same_generator(shipped, converted):
    """DP's predict_action (x_T, then one randn per noisy step from its generator, DP's normaliser)."""
    source, out = converted
    policy = load_policy(out, sampler="ddpm", num_inference_steps=10)
    sd = dp_state_dict(shipped, *shipped_dp_normalizer(shipped))
    obs = random_obs(2, seed=5)
    scheduler = {k: v for k, v in shipped.scheduler_config.items()}
    dp = dp_predict_action(shipped.model, sd, scheduler, obs, horizon=16, n_obs_steps=2, n_action_steps=8,
                           num_inference_steps=10, oa_step_convention=True,
                           generator=torch.Generator().manual_seed(7))
    x_T, noise = draws_in_dp_order(torch.Generator().manual_seed(7), 2, 16, 7, policy.sampler.timesteps)
    ours = policy.predict_action(obs, x_T=x_T, noise=noise)
    torch.testing.assert_close(ours["action"], dp["action"], atol=1e-5, rtol=0)


def test_old_config_json_without_the_new_fields_still_loads(shipped):
    stored = json.loads((CHECKPOINTS_DIR / "square" / "config.json").read_text())
    assert "oa_step_convention" not in stored["policy"]  # written before the field existed
    assert shipped.config.oa_step_convention is True and shipped.config.action_start == 1


# --------------------------------------------------------------------------------- action starts
@pytest.mark.parametrize("oa, latency, start", [(True, 0, 1), (False, 0, 2), (True, 2, 3), (False, 1, 3)])
def test_both_action_start_conventions_and_latency(tmp_path, oa, latency, start):
    policy = small_policy()
    source = dp_checkpoint_from_policy(tmp_path / "dp.ckpt", policy, oa_step_convention=oa, n_latency_steps=latency,
                                       num_inference_steps=10, resolved=bool(latency % 2))
    converted = load_policy(convert(source, tmp_path / "out"), sampler="ddpm")
    assert converted.config.oa_step_convention is oa and converted.config.n_latency_steps == latency
    assert converted.config.n_action_steps == 8 and converted.config.action_start == start
    obs = random_obs(2)
    sd = dp_state_dict(policy, *shipped_dp_normalizer(policy))
    dp = dp_predict_action(policy.model, sd, policy.scheduler_config, obs, horizon=16, n_obs_steps=2,
                           n_action_steps=8 + latency, num_inference_steps=10, oa_step_convention=oa,
                           generator=torch.Generator().manual_seed(11))
    x_T, noise = draws_in_dp_order(torch.Generator().manual_seed(11), 2, 16, 7, converted.sampler.timesteps)
    ours = converted.predict_action(obs, x_T=x_T, noise=noise)
    torch.testing.assert_close(ours["action"], ours["action_pred"][:, start : start + 8])
    # DP's runner drops the first n_latency_steps of the planned n_action_steps + n_latency_steps
    torch.testing.assert_close(ours["action"], dp["action"][:, latency:], atol=1e-5, rtol=0)
    config = DiffusionPolicyConfig.from_dict({**converted.config.to_dict()})
    assert config.action_start == start


# ------------------------------------------------------------------------------------ normaliser
def test_normaliser_round_trip_with_a_flat_dimension(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(500, 6, generator=g) * torch.tensor([1.0, 0.1, 5.0, 1.0, 1.0, 2e-3])
    data[:, 3] = 0.25  # flat: DP gives scale 1, offset -0.25 (it maps to 0)
    data[:, 4] = -3.0
    scale, offset = dp_limits(data.min(0).values, data.max(0).values)
    assert scale[3] == 1 and offset[3] == -0.25
    norm = MinMaxNormalizer(6)
    norm.set_stats(*dp_affine_to_minmax(scale, offset))
    probe = torch.cat([data[:50], torch.randn(20, 6, generator=g) * 4])
    torch.testing.assert_close(norm.normalize(probe), probe * scale + offset, atol=2e-6, rtol=2e-6)
    y = torch.rand(20, 6, generator=g) * 2 - 1
    torch.testing.assert_close(norm.unnormalize(y), (y - offset) / scale, atol=2e-6, rtol=2e-6)
    assert torch.allclose(norm.normalize(data[:, :]).select(1, 3), torch.zeros(500))

    # end to end: a checkpoint whose observation normaliser has a flat dimension
    policy = small_policy()
    obs_scale, obs_offset, act_scale, act_offset = shipped_dp_normalizer(policy)
    obs_scale[5], obs_offset[5] = 1.0, -0.7  # flat at 0.7 in DP's training data
    sd = dp_state_dict(policy, obs_scale, obs_offset, act_scale, act_offset)
    source = write_dp_checkpoint(tmp_path / "flat.ckpt", dp_config(down_dims=[16, 32], diffusion_step_embed_dim=16), sd, sd)
    converted = load_policy(convert(source, tmp_path / "out"))
    obs = random_obs(4).reshape(-1, 23)
    obs[:, 5] = 0.7
    torch.testing.assert_close(converted.normalizer.obs.normalize(obs), obs * obs_scale + obs_offset, atol=2e-6, rtol=2e-6)
    assert converted.normalizer.obs.normalize(obs)[:, 5].abs().max() < 1e-6
    actions = torch.rand(4, 16, 7) * 2 - 1
    torch.testing.assert_close(converted.normalizer.action.unnormalize(actions), (actions - act_offset) / act_scale)


def test_normaliser_that_min_max_cannot_express_is_refused():
    with pytest.raises(UnsupportedCheckpointError, match="scale"):
        dp_affine_to_minmax(torch.tensor([1.0, -2.0]), torch.zeros(2))
    with pytest.raises(UnsupportedCheckpointError, match="scale"):
        dp_affine_to_minmax(torch.tensor([1.0, 1e6]), torch.zeros(2))


# -------------------------------------------------------------------------- config / weights choice
def test_eval_interpolations_are_never_evaluated(tmp_path):
    marker = tmp_path / "evaluated"
    policy = small_policy()
    source = dp_checkpoint_from_policy(
        tmp_path / "dp.ckpt", policy, num_inference_steps=10,
        extra_top={"exp_name": "${eval:'__import__(\"pathlib\").Path(r\"%s\").touch()'}" % marker})
    out = convert(source, tmp_path / "out")
    assert not marker.exists()
    assert load_policy(out).config.n_action_steps == 8  # read from the plain top-level values


def test_weights_choice_follows_use_ema_and_the_flag(tmp_path):
    ema, raw = small_policy(seed=0), small_policy(seed=1)
    raw.normalizer.load_state_dict(ema.normalizer.state_dict())
    source = dp_checkpoint_from_policy(tmp_path / "dp.ckpt", raw, ema_policy=ema, num_inference_steps=10)
    first = lambda folder: load_policy(folder).model.final_conv[1].weight  # noqa: E731
    assert torch.equal(first(convert(source, tmp_path / "a")), ema.model.final_conv[1].weight)
    assert torch.equal(first(convert(source, tmp_path / "b", weights="model")), raw.model.final_conv[1].weight)
    no_ema = dp_checkpoint_from_policy(tmp_path / "noema.ckpt", raw, ema_policy=ema, use_ema=False)
    folder = convert(no_ema, tmp_path / "c")
    assert torch.equal(first(folder), raw.model.final_conv[1].weight)
    assert json.loads((folder / "config.json").read_text())["training"]["converted_from"]["weights"] == "model"
    with pytest.raises(FileExistsError):
        convert(source, tmp_path / "a")


# ------------------------------------------------------------------------------------- hostile files
@pytest.mark.parametrize("where", ["cfg", "state_dicts"])
@pytest.mark.parametrize("func, name", [(os.system, "system"), (builtins.eval, "builtins.eval"),
                                        (subprocess.call, "subprocess.call")])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, capsys, where, func, name):
    marker = tmp_path / "pwned"
    if func is builtins.eval:
        args = (f"open(r'{marker}', 'w').close()",)
    elif func is os.system:
        args = (f"touch '{marker}'",)
    else:
        args = (["touch", str(marker)],)
    source = write_malicious_checkpoint(tmp_path / "evil.ckpt", func, *args, where=where)
    out = tmp_path / "out"
    assert main([str(source), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and name in err, err
    with pytest.raises(ValueError, match=name):
        convert(source, out)
    assert not marker.exists(), "the pickled command ran"
    assert not out.exists(), "something was written"


def test_truncated_corrupt_and_foreign_files_give_clear_errors(tmp_path, converted):
    source = converted[0]
    data = source.read_bytes()
    cases = {
        "truncated.ckpt": (data[: len(data) // 2], "not a torch zip archive"),
        "empty.ckpt": (b"", "not a torch zip archive"),
        "noise.ckpt": (os.urandom(4096), "not a torch zip archive"),
    }
    corrupt = bytearray(data)
    corrupt[len(data) // 3 : len(data) // 3 + 64] = bytes(64)
    cases["corrupt.ckpt"] = (bytes(corrupt), "CRC|corrupt")
    for name, (blob, message) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=message):
            convert(tmp_path / name, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    torch.save({"weights": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a DP workspace checkpoint"):
        convert(tmp_path / "plain.pt", tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        convert(tmp_path / "missing.ckpt", tmp_path / "out")


# ------------------------------------------------------------------------------------ refused kinds
def _refused(tmp_path, sd=None, **cfg):
    policy = small_policy()
    sd = sd or dp_state_dict(policy, *shipped_dp_normalizer(policy))
    base = dict(down_dims=[16, 32], diffusion_step_embed_dim=16)
    source = write_dp_checkpoint(tmp_path / "dp.ckpt", dp_config(**{**base, **cfg}), sd, sd)
    with pytest.raises(UnsupportedCheckpointError) as info:
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    return str(info.value)


def test_refuses_what_it_cannot_run_by_name(tmp_path):
    assert "image / hybrid" in _refused(
        tmp_path, policy_target="diffusion_policy.policy.diffusion_unet_hybrid_image_policy.DiffusionUnetHybridImagePolicy")
    assert "transformer" in _refused(
        tmp_path, policy_target="diffusion_policy.policy.diffusion_transformer_lowdim_policy.DiffusionTransformerLowdimPolicy")
    assert "inpainting" in _refused(tmp_path, obs_as_global_cond=False)
    assert "local conditioning" in _refused(tmp_path, obs_as_global_cond=False, obs_as_local_cond=True)
    assert "n_groups=4" in _refused(tmp_path, n_groups=4)
    assert "not supported" in _refused(tmp_path, extra_policy={"pred_action_steps_only": True})


def test_refuses_film_without_scale_with_a_shape_report(tmp_path):
    policy = small_policy()
    sd = dp_state_dict(policy, *shipped_dp_normalizer(policy))
    for key in [k for k in sd if k.endswith("cond_encoder.1.weight") or k.endswith("cond_encoder.1.bias")]:
        sd[key] = sd[key][: sd[key].shape[0] // 2].clone()  # bias-only FiLM: out_channels outputs
    message = _refused(tmp_path, sd=sd, cond_predict_scale=False)
    assert "cond_predict_scale=False" in message and "model.mid_modules.0.cond_encoder.1.weight: [32, 62]" in message


def test_inpainting_weights_are_refused_even_when_the_config_says_global(tmp_path):
    from parapolicy.policy import ConditionalUnet1D

    policy = small_policy()
    sd = dp_state_dict(policy, *shipped_dp_normalizer(policy))
    unet = ConditionalUnet1D(input_dim=7, global_cond_dim=0, diffusion_step_embed_dim=16, down_dims=[16, 32])
    sd = {k: v for k, v in sd.items() if not k.startswith("model.")}
    sd.update({f"model.{k}": v for k, v in unet.state_dict().items()})
    assert "inpainting" in _refused(tmp_path, sd=sd)
