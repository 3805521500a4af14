"""Network, normaliser, sampler callback and the act() control-loop API."""

import numpy as np
import pytest
import torch

from parapolicy.policy import ConditionalUnet1D, DiffusionPolicyConfig, MinMaxNormalizer
from policy_synthetic import ACTION_DIM, KEY_DIMS, OBS_DIM, OBS_KEYS, tiny_policy


# ------------------------------------------------------------------------------------------ network
def test_unet_shapes_and_per_row_timesteps():
    torch.manual_seed(0)
    net = ConditionalUnet1D(input_dim=7, global_cond_dim=46, diffusion_step_embed_dim=16,
                            down_dims=[16, 32, 64], kernel_size=5, n_groups=8).eval()
    x, cond = torch.randn(4, 16, 7), torch.randn(4, 46)
    t = torch.tensor([0, 17, 50, 99])
    with torch.no_grad():
        out = net(x, t, cond)
        assert out.shape == (4, 16, 7)
        for i in range(4):  # row i of the mixed batch == the same row alone at its own timestep
            torch.testing.assert_close(out[i : i + 1], net(x[i : i + 1], t[i : i + 1], cond[i : i + 1]),
                                       rtol=1e-4, atol=1e-5)
        # The timestep matters (otherwise the test above would be vacuous) and a scalar broadcasts.
        assert not torch.allclose(net(x, torch.zeros(4, dtype=torch.long), cond), out)
        torch.testing.assert_close(net(x, 17, cond), net(x, torch.full((4,), 17), cond))


def test_default_network_size_fits_the_budget():
    cfg = DiffusionPolicyConfig(obs_dim=23)
    net = ConditionalUnet1D(**cfg.network_kwargs())
    n_params = sum(p.numel() for p in net.parameters())
    assert 1_000_000 < n_params and n_params * 4 <= 25 * 2**20  # fp32 checkpoint <= 25 MB


def test_config_rejects_bad_horizon():
    with pytest.raises(ValueError, match="divisible"):
        DiffusionPolicyConfig(obs_dim=5, horizon=10, down_dims=[16, 32, 64])
    with pytest.raises(ValueError, match="too short"):
        DiffusionPolicyConfig(obs_dim=5, horizon=8, n_obs_steps=2, n_action_steps=8, down_dims=[16, 32])


# ------------------------------------------------------------------------------------------ normaliser
def test_normalizer_round_trip_and_range():
    data = torch.randn(500, 6) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0, 0.0]) + 5.0  # last dim constant
    norm = MinMaxNormalizer.fit(data)
    y = norm.normalize(data)
    assert y[:, :5].min() >= -1 - 1e-5 and y[:, :5].max() <= 1 + 1e-5
    torch.testing.assert_close(y[:, :5].amin(0), -torch.ones(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[:, :5].amax(0), torch.ones(5), atol=1e-5, rtol=0)
    assert torch.all(y[:, 5] == 0)  # a constant feature maps to the centre, not to inf
    torch.testing.assert_close(norm.unnormalize(y), data, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------ sampling
def test_denoise_fn_folds_timesteps_into_the_batch():
    policy = tiny_policy()
    cond = torch.randn(3, policy.config.global_cond_dim)
    denoise = policy.make_denoise_fn(cond)
    x, t = torch.randn(4, 3, 16, ACTION_DIM), torch.tensor([90, 60, 30, 0])
    with torch.no_grad():
        out = denoise(x, t)
        assert out.shape == x.shape
        for k in range(4):
            torch.testing.assert_close(out[k], policy.model(x[k], t[k].expand(3), cond), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(denoise(x[:2], t[:2]), out[:2], rtol=1e-4, atol=1e-5)  # cache per K


class RecordingSampler:
    """Stands in for a parapolicy sampler: returns a fixed normalised plan, records its inputs."""

    def __init__(self, plan):
        self.plan, self.calls = plan, []

    def sample(self, denoise, x_T, noise=None, generator=None, init=None):
        from types import SimpleNamespace

        self.calls.append(x_T)
        eps = denoise(x_T[None], torch.tensor([5]))  # exercise the callback once
        assert eps.shape == (1, *x_T.shape)
        return SimpleNamespace(sample=self.plan.expand_as(x_T).clone(), rounds=3, model_evals=7,
                               converged=True, errors=[0.1], trajectory=None)


def test_predict_action_slices_and_unnormalises():
    policy = tiny_policy()
    plan = torch.linspace(-1, 1, 16 * ACTION_DIM).reshape(1, 16, ACTION_DIM)
    policy._sampler = RecordingSampler(plan)
    out = policy.predict_action(torch.zeros(2, 2, OBS_DIM))
    expected = policy.normalizer.action.unnormalize(plan).expand(2, -1, -1)
    torch.testing.assert_close(out["action_pred"], expected)
    torch.testing.assert_close(out["action"], expected[:, 1:9])  # DP: start = n_obs_steps - 1
    assert (out["rounds"], out["model_evals"], out["converged"]) == (3, 7, True)
    with pytest.raises(ValueError, match=r"\[B, 2, 23\]"):
        policy.predict_action(torch.zeros(2, 3, OBS_DIM))
    with pytest.raises(ValueError, match="NaN"):
        policy.predict_action(torch.full((1, 2, OBS_DIM), float("nan")))


def test_sampling_through_parapolicy_samplers():
    """At tau = 1e-6 the parallel plan is the sequential one to float32 rounding (3.5e-6 measured on this
    policy), converged; a round budget below what the sampler needs is reported as not converged."""
    policy = tiny_policy()
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(3, 2, OBS_DIM)
    x_T, noise = torch.randn(3, 16, ACTION_DIM, generator=g), torch.randn(10, 3, 16, ACTION_DIM, generator=g)
    sequential = policy.predict_action(obs, x_T=x_T, noise=noise)
    assert sequential["action"].shape == (3, 8, ACTION_DIM) and sequential["model_evals"] == 10
    assert sequential["rounds"] == 10 and sequential["converged"] is True
    assert torch.isfinite(sequential["action_pred"]).all()
    policy.set_sampler("paraddpm", window=4, tolerance=1e-6)
    parallel = policy.predict_action(obs, x_T=x_T, noise=noise)
    assert parallel["converged"] is True
    # windows of 4 over 10 steps: at least 3 rounds, each evaluating at most 4 (and at least 1) points
    assert 3 <= parallel["rounds"] <= 10 and parallel["rounds"] < parallel["model_evals"] <= 4 * parallel["rounds"]
    torch.testing.assert_close(parallel["action_pred"], sequential["action_pred"], atol=2e-5, rtol=0)
    torch.testing.assert_close(parallel["action"], sequential["action"], atol=2e-5, rtol=0)

    policy.set_sampler("paraddpm", window=4, tolerance=1e-6, max_rounds=2)
    cut = policy.predict_action(obs, x_T=x_T, noise=noise)
    assert cut["converged"] is False and cut["rounds"] == 2
    assert (cut["action_pred"] - sequential["action_pred"]).abs().max() > 1e-3
    with pytest.raises(ValueError):
        policy.set_sampler("no-such-sampler")
    assert policy.sampler_name == "paraddpm"  # a failed swap keeps the previous sampler


# ------------------------------------------------------------------------------------------ act()
def obs_dict(value: float, extra: bool = True) -> dict:
    obs = {k: np.full(d, value) for k, d in KEY_DIMS.items()}
    if extra:
        obs["robot0_joint_pos"] = np.zeros(7)  # robosuite dicts carry many more keys: ignored
    return obs


class ScriptedPlans:
    """predict_action stand-in: plan number p has actions [p, step, 0, ...]; records obs histories."""

    def __init__(self):
        self.histories = []

    def __call__(self, obs_history, **_):
        p = len(self.histories)
        self.histories.append(obs_history.clone())
        action = torch.zeros(obs_history.shape[0], 8, ACTION_DIM)
        action[..., 0], action[..., 1] = p, torch.arange(8.0)
        return {"action": action, "action_pred": None, "rounds": 2, "model_evals": 5, "converged": True}


def test_act_replans_every_n_action_steps_and_keeps_history():
    policy = tiny_policy()
    policy.predict_action = ScriptedPlans()
    actions = [policy.act(obs_dict(float(i))) for i in range(20)]
    assert len(policy.predict_action.histories) == 3  # calls 0, 8 and 16 replan
    for i, action in enumerate(actions):
        assert action.shape == (ACTION_DIM,) and isinstance(action, np.ndarray)
        assert (action[0], action[1]) == (i // 8, i % 8)  # plan i // 8, its (i % 8)-th executed action
    first, second = policy.predict_action.histories[:2]
    assert torch.all(first[0, :, 0] == 0)  # first call: obs 0 repeated to fill the history
    assert first.shape == (1, 2, OBS_DIM)
    assert second[0, :, 0].tolist() == [7.0, 8.0]  # replanning at call 8 sees obs 7 and 8

    policy.act(obs_dict(20.0))
    assert policy.last_info["replanned"] is False and policy.last_info["model_evals"] == 0
    policy.reset()  # a new episode replans immediately from a fresh history
    policy.act(np.full(OBS_DIM, 42.0, dtype=np.float32))
    info = policy.last_info
    assert info["replanned"] and info["rounds"] == 2 and info["model_evals"] == 5 and info["latency_s"] >= 0
    assert torch.all(policy.predict_action.histories[-1] == 42.0)


def test_act_validates_observations():
    policy = tiny_policy()
    policy.predict_action = ScriptedPlans()
    partial = obs_dict(0.0)
    del partial["robot0_eef_quat"]
    with pytest.raises(ValueError, match="robot0_eef_quat"):
        policy.act(partial)
    bad_shape = obs_dict(0.0)
    bad_shape["object"] = np.zeros(10)
    with pytest.raises(ValueError, match="obs_dim=23"):
        policy.act(bad_shape)
    with pytest.raises(ValueError, match=r"shape \(23,\)"):
        policy.act(np.zeros(22))
    with pytest.raises(ValueError, match=r"shape \(23,\)"):
        policy.act(torch.zeros(2, OBS_DIM))
    nan_obs = obs_dict(0.0)
    nan_obs["robot0_eef_pos"] = np.array([0.0, np.inf, 0.0])
    with pytest.raises(ValueError, match="NaN or inf"):
        policy.act(nan_obs)
    with pytest.raises(ValueError):
        policy.act([0.0] * OBS_DIM)
    assert policy.predict_action.histories == []  # nothing was planned from invalid input
    policy.act(torch.zeros(OBS_DIM))  # tensors are accepted


def test_act_takes_robosuites_own_observation_dict():
    """robosuite names the object vector "object-state" (robomimic: "object"); act(env.raw_obs) must work."""
    policy = tiny_policy()
    policy.predict_action = ScriptedPlans()
    raw = obs_dict(3.0)
    raw["object-state"] = raw.pop("object")
    policy.act(raw)
    policy.reset()
    policy.act(obs_dict(3.0))
    first, second = policy.predict_action.histories
    assert torch.equal(first, second)
    del raw["object-state"]
    with pytest.raises(ValueError, match="lacks keys \\['object'\\]"):
        policy.act(raw)


def test_act_end_to_end_with_the_default_sampler():
    policy = tiny_policy()
    policy.reset()
    actions = [policy.act(obs_dict(0.1 * i, extra=False)) for i in range(9)]
    assert all(a.shape == (ACTION_DIM,) and np.isfinite(a).all() for a in actions)
    assert policy.last_info["replanned"] and policy.last_info["model_evals"] == 10


@pytest.mark.slow
def test_readme_control_loop_on_a_real_square_env():
    """The README's drop-in loop: act(env.raw_obs) (robosuite's dict) plans from the same history as act(obs)."""
    from parapolicy.envs import make_env

    env = make_env("square", max_episode_steps=3)
    obs, _ = env.reset(seed=0)
    from_dict, from_flat = tiny_policy(), tiny_policy()
    from_dict.predict_action, from_flat.predict_action = ScriptedPlans(), ScriptedPlans()
    for policy, observation in ((from_dict, env.raw_obs), (from_flat, obs)):
        policy.reset()
        assert policy.act(observation).shape == (ACTION_DIM,)
    torch.testing.assert_close(from_dict.predict_action.histories[0], from_flat.predict_action.histories[0])
    env.close()
