"""Diffusion Policy's transformer (DP-T): the network against DP's forward on torch's own transformer layers,
and DP-T low-dim workspaces converted and planned against DP's predict_action loop on the same noise."""

from __future__ import annotations

import json
import os

import dill
import pytest
import torch

from dp_format import Malicious, draws_in_dp_order
from dp_transformer_format import dp_t_checkpoint, dp_t_config, dp_t_network, dp_t_predict_action, reference_forward
from parapolicy.convert import convert, main
from parapolicy.importers.diffusion_policy import UnsupportedCheckpointError, convert_dp_checkpoint
from parapolicy.policy import DiffusionPolicy, DiffusionPolicyConfig, load_checkpoint
from parapolicy.policy.transformer import TransformerForDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {  # dp_t_config options
    "obs_cond": {},
    "obs_cond_encoder": {"n_cond_layers": 2},
    "obs_cond_not_causal": {"causal_attn": False},
    "inpaint": {"obs_as_cond": False},
    "inpaint_not_causal": {"obs_as_cond": False, "causal_attn": False},
    "encoder_only": {"obs_as_cond": False, "time_as_cond": False},
    "encoder_only_causal_off": {"obs_as_cond": False, "time_as_cond": False, "causal_attn": False},
}


def net_inputs(cfg, batch=3, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    m = cfg.policy.model
    sample = torch.randn(batch, m.horizon, m.input_dim, generator=g, dtype=dtype)
    t = torch.randint(0, 100, (batch,), generator=g)
    cond = torch.randn(batch, m.n_obs_steps, m.cond_dim, generator=g, dtype=dtype) if m.cond_dim else None
    return sample, t, cond


# ------------------------------------------------------------------------------------------- network
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_network_is_dps_forward(variant):
    """Our attention, masks, time token and condition encoder against DP's forward on torch's own layers."""
    cfg = dp_t_config(**VARIANTS[variant])
    net = dp_t_network(cfg)
    sample, t, cond = net_inputs(cfg)
    with torch.no_grad():
        ours = net.forward_tokens(sample, t, cond)
    expected = reference_forward(net, sample, t, cond, n_head=cfg.policy.model.n_head)
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-5)
    assert ours.abs().mean() > 0.1  # the weights matter


def test_causal_attention_sees_no_later_action_or_observation():
    """Token i's output depends on action tokens <= i and observation steps <= i only; without the mask it
    would see all of them (the planted 'causal mask dropped' defect)."""
    cfg = dp_t_config(n_obs_steps=3, horizon=6, n_action_steps=3)
    net = dp_t_network(cfg)
    sample, t, cond = net_inputs(cfg)
    with torch.no_grad():
        base = net.forward_tokens(sample, t, cond)
        later_action = sample.clone()
        later_action[:, 4:] += 1.0
        moved = net.forward_tokens(later_action, t, cond)
        later_obs = cond.clone()
        later_obs[:, 2] += 1.0
        moved_obs = net.forward_tokens(sample, t, later_obs)
    assert torch.equal(moved[:, :4], base[:, :4]) and (moved[:, 4:] - base[:, 4:]).abs().max() > 1e-3
    assert torch.equal(moved_obs[:, :2], base[:, :2]) and (moved_obs[:, 2:] - base[:, 2:]).abs().max() > 1e-3


def test_timestep_is_the_first_condition_token():
    """The timestep is condition token 0 (with its positional embedding): outputs change with t, and moving
    cond_pos_emb[0] changes them too."""
    cfg = dp_t_config()
    net = dp_t_network(cfg)
    sample, t, cond = net_inputs(cfg)
    with torch.no_grad():
        base = net.forward_tokens(sample, t, cond)
        assert (net.forward_tokens(sample, (t + 37) % 100, cond) - base).abs().max() > 1e-3
        net.cond_pos_emb[:, 0] += 0.5
        assert (net.forward_tokens(sample, t, cond) - base).abs().max() > 1e-3


def test_policy_interface_maps_the_flat_condition_step_major():
    """model(sample, t, global_cond [B, To * F]) is DP's forward with cond [B, To, F]: step-major layout."""
    cfg = dp_t_config(n_obs_steps=3, horizon=6, n_action_steps=3)
    net = dp_t_network(cfg)
    sample, t, cond = net_inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(net(sample, t, cond.reshape(len(cond), -1)), net.forward_tokens(sample, t, cond),
                                   rtol=0, atol=0)


def test_inpainting_network_imposes_the_first_observation_steps():
    """obs_as_cond=False: the observation channels of the first To steps come from global_cond, whatever the
    sampler's state holds there; the rest of the sequence is the model's input as it is."""
    net = TransformerForDiffusion(input_dim=5, output_dim=5, horizon=6, n_obs_steps=2, n_layer=1, n_head=2,
                                  n_emb=16, inpaint_dim=3, causal_attn=True).eval()
    g = torch.Generator().manual_seed(0)
    sample, obs = torch.randn(2, 6, 5, generator=g), torch.randn(2, 2, 3, generator=g)
    imposed = net.impose_observations(sample, obs.reshape(2, -1))
    assert torch.equal(imposed[:, :2, 2:], obs) and torch.equal(imposed[:, :2, :2], sample[:, :2, :2])
    assert torch.equal(imposed[:, 2:], sample[:, 2:])
    garbage = sample.clone()
    garbage[:, :2, 2:] = 1e3
    with torch.no_grad():
        assert torch.equal(net(garbage, torch.tensor([3, 4]), obs.reshape(2, -1)),
                           net(sample, torch.tensor([3, 4]), obs.reshape(2, -1)))


def test_config_builds_the_transformer_and_round_trips(tmp_path):
    from parapolicy.policy import save_checkpoint

    config = DiffusionPolicyConfig(obs_dim=23, horizon=10, n_obs_steps=2, n_action_steps=8,
                                   network={"class": "TransformerForDiffusion", "n_layer": 1, "n_emb": 32, "n_head": 2})
    policy = DiffusionPolicy(config)
    assert isinstance(policy.model, TransformerForDiffusion) and policy.model.cond_obs_emb.in_features == 23
    folder = save_checkpoint(policy, tmp_path / "t")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["network"]["class"] == "TransformerForDiffusion" and saved["network"]["cond_dim"] == 23
    assert "model.mask" not in policy.state_dict()  # rebuilt from the options, not saved
    loaded = load_checkpoint(folder)
    obs = torch.randn(2, 2, 23)
    a = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action_pred"]
    b = loaded.predict_action(obs, generator=torch.Generator().manual_seed(0))["action_pred"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("network, message", [
    ({"class": "Mamba"}, "not one of"),
    ({"class": "TransformerForDiffusion", "n_layers": 2}, "unknown TransformerForDiffusion options"),
    ({"class": "TransformerForDiffusion", "n_emb": 30, "n_head": 4}, "divisible by n_head"),
    ({"class": "TransformerForDiffusion", "obs_as_cond": True, "time_as_cond": False}, "needs time_as_cond"),
    ({"class": "TransformerForDiffusion", "horizon": 12}, "must be the policy's"),
    ({"class": "TransformerForDiffusion", "causal_attn": "yes"}, "true or false"),
])
def test_bad_transformer_options_are_refused(network, message):
    with pytest.raises(ValueError, match=message):
        DiffusionPolicyConfig(obs_dim=23, horizon=10, n_obs_steps=2, n_action_steps=8, network=network)


def test_transformer_horizon_need_not_fit_the_unets_downsampling():
    config = DiffusionPolicyConfig(obs_dim=23, horizon=5, n_obs_steps=3, n_action_steps=1,
                                   network={"class": "TransformerForDiffusion", "n_layer": 1, "n_emb": 16, "n_head": 2})
    assert config.sample_dim == 7
    with pytest.raises(ValueError, match="divisible"):
        DiffusionPolicyConfig(obs_dim=23, horizon=5, n_obs_steps=3, n_action_steps=1)


# ------------------------------------------------------------------------------------------- import
CASES = {  # dp_t_config options of a converted workspace
    "obs_cond": {},
    "obs_cond_encoder": {"n_cond_layers": 2},
    "inpaint": {"obs_as_cond": False},
    "inpaint_encoder_only": {"obs_as_cond": False, "time_as_cond": False},
    "steps_only": {"pred_action_steps_only": True, "causal_attn": False},
    "steps_only_causal": {"pred_action_steps_only": True, "horizon": 8},
    "latency": {"n_latency_steps": 1, "n_obs_steps": 3},
    "ddim": {"num_inference_steps": 10, "noise_scheduler": {
        "_target_": "diffusers.schedulers.scheduling_ddim.DDIMScheduler", "num_train_timesteps": 100,
        "beta_schedule": "squaredcos_cap_v2", "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
        "prediction_type": "epsilon"}},
    "inpaint_ddim": {"obs_as_cond": False, "num_inference_steps": 10, "noise_scheduler": {
        "_target_": "diffusers.schedulers.scheduling_ddim.DDIMScheduler", "num_train_timesteps": 100,
        "beta_schedule": "squaredcos_cap_v2", "clip_sample": True, "prediction_type": "epsilon"}},
}


def dp_and_ours(tmp_path, case, batch=3, seed=5):
    """(DP's predict_action, ours, our policy) on the same observations and noise draws."""
    source, cfg, net, sd = dp_t_checkpoint(tmp_path / f"{case}.ckpt", **CASES[case])
    policy = load_checkpoint(convert(source, tmp_path / case))
    p = cfg.policy
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(batch, p.n_obs_steps, cfg.obs_dim, generator=g)
    dp_gen = torch.Generator().manual_seed(seed + 1)
    dp = dp_t_predict_action(lambda x, t, c: reference_forward(net, x, t[None], c, p.model.n_head), sd,
                             dict(p.noise_scheduler), obs, horizon=p.horizon, n_obs_steps=p.n_obs_steps,
                             n_action_steps=p.n_action_steps, num_inference_steps=p.num_inference_steps,
                             obs_as_cond=p.obs_as_cond, pred_action_steps_only=p.pred_action_steps_only,
                             generator=dp_gen)
    x_T, noise = draws_in_dp_order(torch.Generator().manual_seed(seed + 1), batch, policy.config.horizon,
                                   policy.config.sample_dim, policy.sampler.timesteps)
    if not policy.sampler.is_stochastic:
        noise = None
    ours = policy.predict_action(obs, x_T=x_T, noise=noise)
    return dp, ours, policy, cfg


@pytest.mark.parametrize("case", list(CASES))
def test_converted_workspace_plans_dps_actions(tmp_path, case):
    dp, ours, policy, cfg = dp_and_ours(tmp_path, case)
    latency = cfg.n_latency_steps
    executed = dp["action"][:, latency:]  # DP's runner drops the latency steps
    assert ours["action"].shape == executed.shape
    torch.testing.assert_close(ours["action"], executed, rtol=0, atol=1e-5)
    assert executed.std() > 0.05
    assert policy.config.network["obs_as_cond"] is cfg.obs_as_cond


def test_hostile_pickles_blob_is_refused_by_name_and_nothing_is_written(tmp_path, capsys):
    marker = tmp_path / "pwned"
    hostile, *_ = dp_t_checkpoint(tmp_path / "evil.ckpt", extra_pickles={
        "evil": dill.dumps(Malicious(os.system, f"touch '{marker}'"))})
    out = tmp_path / "out"
    assert main([str(hostile), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "system" in err and "evil" in err, err
    assert not marker.exists() and not out.exists()


def test_cli_names_the_transformer(tmp_path, capsys):
    source, *_ = dp_t_checkpoint(tmp_path / "dp.ckpt", n_cond_layers=1)
    assert main([str(source), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "TransformerForDiffusion (2 layers, n_emb 32, causal True, obs_as_cond True)" in printed, printed
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    origin = saved["training"]["converted_from"]
    assert origin["policy_class"] == "DiffusionTransformerLowdimPolicy" and origin["global_step"] == 1234
    assert saved["policy"]["network"]["n_cond_layers"] == 1 and saved["policy"]["env"] == "square"


def _bad_mask(sd):
    sd["model.mask"] = torch.zeros_like(sd["model.mask"])


def _drop_memory_mask(sd):
    del sd["model.memory_mask"]


@pytest.mark.parametrize("options, tamper, message", [
    ({"extra_policy": {"eta": 0.5}}, None, "passed to scheduler.step"),
    ({}, _bad_mask, "not Diffusion Policy's causal mask"),
    ({}, _drop_memory_mask, "memory_mask is missing"),
    ({"pred_action_steps_only": True}, None, "cannot run it"),  # causal over 10 tokens, 8 planned
    ({"noise_scheduler": {"_target_": "diffusers.DPMSolverMultistepScheduler", "num_train_timesteps": 100}}, None,
     "DPMSolverMultistepScheduler"),
])
def test_unsupported_variants_are_refused_by_name_and_nothing_is_written(tmp_path, options, tamper, message):
    source, *_ = dp_t_checkpoint(tmp_path / "dp.ckpt", tamper=tamper, **options)
    with pytest.raises(ValueError, match=message):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_policy_network_obs_as_cond_mismatch_is_refused(tmp_path):
    """DP derives the network's obs_as_cond from cond_dim > 0; a policy that says otherwise is refused."""
    cfg_tokens = dp_t_config()
    source, *_ = dp_t_checkpoint(tmp_path / "dp.ckpt")
    from omegaconf import OmegaConf

    from dp_format import write_dp_checkpoint
    from parapolicy.importers.diffusion_policy import read_dp_checkpoint

    ckpt = read_dp_checkpoint(source)
    cfg = OmegaConf.create(ckpt.cfg)
    cfg.policy.obs_as_cond = False
    bad = write_dp_checkpoint(tmp_path / "bad.ckpt", cfg, ckpt.state_dicts["model"], ckpt.state_dicts["ema_model"])
    with pytest.raises(UnsupportedCheckpointError, match="obs_as_cond=False but the network has observation tokens"):
        convert(bad, tmp_path / "out")
    assert cfg_tokens.policy.obs_as_cond is True


def test_without_the_transformer_converter_dp_t_is_still_refused(tmp_path):
    source, *_ = dp_t_checkpoint(tmp_path / "dp.ckpt")
    with pytest.raises(UnsupportedCheckpointError, match="transformer policies"):
        convert_dp_checkpoint(source, tmp_path / "out")


def test_hybrid_image_transformer_is_refused_by_name(tmp_path):
    from omegaconf import OmegaConf

    from dp_format import write_dp_checkpoint
    from parapolicy.importers.diffusion_policy import read_dp_checkpoint

    source, *_ = dp_t_checkpoint(tmp_path / "dp.ckpt")
    ckpt = read_dp_checkpoint(source)
    cfg = OmegaConf.create(ckpt.cfg)
    cfg.policy._target_ = ("diffusion_policy.policy.diffusion_transformer_hybrid_image_policy."
                           "DiffusionTransformerHybridImagePolicy")
    hybrid = write_dp_checkpoint(tmp_path / "hybrid.ckpt", cfg, ckpt.state_dicts["model"], ckpt.state_dicts["ema_model"])
    with pytest.raises(UnsupportedCheckpointError, match="DiffusionTransformerHybridImagePolicy"):
        convert(hybrid, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
