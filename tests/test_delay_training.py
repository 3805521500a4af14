"""Policies trained for delay: the committed actions as a clean, masked prefix (``transition=trained``).

What must hold, each checked where it can fail:
- fine-tuning starts exactly from the original policy (the known-actions columns start at zero);
- the known-actions conditioning carries the first ``L`` actions and a mask of those positions;
- the loss leaves the known positions out, and nothing else;
- sampling with the trained prefix is a fixed function of (point, step): every parallel family equals its
  sequential twin in float64 at tau -> 0, warm start included; the prefix noise is drawn once per call;
- the runner gives the network positions ``[0, start + d)``, and a policy not trained for delay refuses
  ``transition=trained`` by name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parapolicy.policy import load_checkpoint
from parapolicy.realtime.transitions import Transition, auto_transition
from parapolicy.realtime.runner import PolicyRunner
from parapolicy.train import train, widen_condition
from policy_synthetic import ACTION_DIM, learnable_hdf5, tiny_config, tiny_policy
from test_realtime import START, LabelledPolicy, run_fake, vector_env
from test_train import config as train_config

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_DELAY = 6


def delay_policy(seed=0, **overrides):
    return tiny_policy(seed, max_delay=MAX_DELAY, **overrides)


def obs_batch(policy, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = policy.normalizer.obs.min, policy.normalizer.obs.max
    return lo + (hi - lo) * torch.rand(batch, policy.config.n_obs_steps, policy.config.obs_dim, generator=g)


# ------------------------------------------------------------------ configuration and conditioning
def test_config_sizes_the_known_actions_conditioning():
    plain, trained = tiny_config(), tiny_config(max_delay=MAX_DELAY)
    assert plain.known_cond_dim == 0 and not plain.delay_conditioned
    assert trained.known_positions == START + MAX_DELAY
    assert trained.global_cond_dim == plain.global_cond_dim + (START + MAX_DELAY) * (ACTION_DIM + 1)
    assert tiny_config(max_delay=40).known_positions == 15  # at least one position is left to plan
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_delay"):
            tiny_config(max_delay=bad)


def test_known_condition_carries_the_first_positions_and_their_mask():
    policy = delay_policy()
    P, A = policy.config.known_positions, ACTION_DIM
    actions = torch.arange(2 * 16 * A, dtype=torch.float32).reshape(2, 16, A) + 1
    cond = policy.known_condition(actions, torch.tensor([3, 5]))
    values, mask = cond[:, : P * A].reshape(2, P, A), cond[:, P * A :]
    assert cond.shape == (2, P * (A + 1))
    assert torch.equal(mask, (torch.arange(P)[None] < torch.tensor([[3], [5]])).float())
    assert torch.equal(values[0, :3], actions[0, :3]) and torch.equal(values[1, :5], actions[1, :5])
    assert not values[0, 3:].any() and not values[1, 5:].any()  # unknown positions tell nothing
    # the mask is what tells a known zero action from an unknown one
    zeros = torch.zeros(1, 16, A)
    assert not torch.equal(policy.known_condition(zeros, 4), policy.known_condition(zeros, 0))
    assert not policy.known_condition(None, torch.zeros(3, dtype=torch.long)).any()


def test_widened_policy_computes_what_the_original_did():
    """Fine-tuning for delay starts from the original policy: same actions, with or without a prefix told."""
    original = tiny_policy(3).eval()
    widened = delay_policy(9)
    widened.load_state_dict(widen_condition(original.state_dict(), widened.state_dict()))
    obs = obs_batch(original)
    x_T = torch.randn(2, 16, ACTION_DIM, generator=torch.Generator().manual_seed(1))
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731 - DDPM's step noise, the same for both
    plain = original.predict_action(obs, x_T=x_T, generator=gen())["action_pred"]
    torch.testing.assert_close(widened.predict_action(obs, x_T=x_T, generator=gen())["action_pred"], plain,
                               rtol=0, atol=1e-5)
    # told a prefix, the widened network (still ignoring it) equals the original with the same inpainting
    prefix, eta = plain[:, :4] * 0.5, torch.randn(2, 4, ACTION_DIM, generator=torch.Generator().manual_seed(2))
    told = widened.predict_action(obs, x_T=x_T, generator=gen(), prefix=prefix, prefix_noise=eta,
                                  prefix_mode="trained")
    inpainted = original.predict_action(obs, x_T=x_T, generator=gen(), prefix=prefix, prefix_noise=eta)
    torch.testing.assert_close(told["action_pred"], inpainted["action_pred"], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="widen"):
        widen_condition(delay_policy().state_dict(), original.state_dict())


def test_the_trained_network_sees_the_prefix():
    """Once the known-actions columns are non-zero, the plan depends on the prefix and on its length."""
    policy = delay_policy()
    policy.set_sampler("ddim", 10)
    obs = obs_batch(policy)
    x_T = torch.randn(2, 16, ACTION_DIM, generator=torch.Generator().manual_seed(1))
    prefix = torch.full((2, 5, ACTION_DIM), 0.3)
    eta = torch.zeros(2, 5, ACTION_DIM)
    trained = policy.predict_action(obs, x_T=x_T, prefix=prefix, prefix_noise=eta, prefix_mode="trained")
    inpaint = policy.predict_action(obs, x_T=x_T, prefix=prefix, prefix_noise=eta, prefix_mode="inpaint")
    assert (trained["action_pred"][:, 5:] - inpaint["action_pred"][:, 5:]).abs().max() > 1e-4
    auto = policy.predict_action(obs, x_T=x_T, prefix=prefix, prefix_noise=eta)
    assert torch.equal(auto["action_pred"], trained["action_pred"])  # auto: trained where it applies
    assert torch.equal(trained["action_pred"][:, :5], prefix)  # the committed positions are kept exactly


def test_trained_prefix_mode_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="trained for delay"):
        tiny_policy().predict_action(obs_batch(tiny_policy()), prefix=torch.zeros(2, 3, ACTION_DIM),
                                     prefix_mode="trained")
    policy = delay_policy()
    with pytest.raises(ValueError, match="known exactly"):
        policy.predict_action(obs_batch(policy), prefix=torch.zeros(2, 3, ACTION_DIM),
                              prefix_weights=torch.full((2, 3), 0.5), prefix_mode="trained")
    with pytest.raises(ValueError, match="prefix_mode"):
        policy.predict_action(obs_batch(policy), prefix_mode="clean")


# ------------------------------------------------------------------ the loss
def test_loss_leaves_the_known_positions_out():
    """Whatever the network predicts at the committed positions, the loss does not move; elsewhere it does."""
    policy = delay_policy().train()
    policy.delay_none_prob = 0.0
    batch = {"obs": obs_batch(policy, 8), "action": torch.rand(8, 16, ACTION_DIM) - 0.5}
    lengths = policy.draw_known_lengths(8, torch.Generator().manual_seed(5))
    assert (lengths >= START).all() and (lengths <= START + MAX_DELAY).all() and len(set(lengths.tolist())) > 1

    policy.draw_known_lengths = lambda *args, **kwargs: lengths  # the lengths the offsets are placed by
    forward = policy.model.forward

    def loss_with(offset_known: float, offset_free: float) -> float:
        def shifted(x, t, cond):
            out = forward(x, t, cond)
            known = (torch.arange(out.shape[1])[None] < lengths[:, None]).float()[..., None]
            return out + offset_known * known + offset_free * (1 - known)

        policy.model.forward = shifted
        try:
            return float(policy.compute_loss(batch, torch.Generator().manual_seed(5)).detach())
        finally:
            del policy.model.forward

    base = loss_with(0.0, 0.0)
    assert loss_with(10.0, 0.0) == pytest.approx(base, rel=1e-6)
    assert loss_with(0.0, 10.0) > base + 10


def test_draw_known_lengths_covers_every_delay_and_nothing_known():
    policy = delay_policy()
    lengths = policy.draw_known_lengths(4000, torch.Generator().manual_seed(0)).tolist()
    assert set(lengths) == {0, *range(START, START + MAX_DELAY + 1)}
    assert 0.06 < lengths.count(0) / 4000 < 0.14  # delay_none_prob = 0.1


def test_a_plain_policy_keeps_the_unmasked_loss():
    policy = tiny_policy().train()
    batch = {"obs": obs_batch(policy, 4), "action": torch.rand(4, 16, ACTION_DIM) - 0.5}
    g = torch.Generator().manual_seed(0)
    loss = policy.compute_loss(batch, g)
    # the same draws by hand: noise, timesteps, then DP's plain MSE over every position
    g = torch.Generator().manual_seed(0)
    actions = policy.normalizer.action.normalize(batch["action"])
    noise = torch.randn(actions.shape, generator=g)
    t = torch.randint(100, (4,), generator=g)
    pred = policy.model(policy.noise_scheduler.add_noise(actions, noise, t), t,
                        policy.global_condition(batch["obs"]))
    assert float(loss.detach()) == pytest.approx(float(((pred - noise) ** 2).mean().detach()), rel=1e-6)


# ------------------------------------------------------------------ exact under parallel sampling
FAMILIES = [("ddpm", "paraddpm", 30), ("ddim", "paraddim", 15), ("ddpm", "parasrdsddpm", 30),
            ("ddim", "parasrdsddim", 15), ("ddpm", "parataaddpm", 30), ("ddim", "parataaddim", 15)]


@pytest.mark.parametrize("sequential, parallel, steps", FAMILIES, ids=[f[1] for f in FAMILIES])
def test_parallel_equals_sequential_under_the_trained_transition(sequential, parallel, steps):
    """float64, tau = 1e-9: the known actions condition the network and are imposed (noised once per call)
    at every step, a fixed function of (point, step), so every family solves the sequential problem,
    warm-started too; and the conditioning really changes the plan."""
    from parapolicy.samplers import make_sampler
    from parapolicy.samplers.constraints import PrefixConstraint

    policy = delay_policy(1)
    policy.model.double()
    _wake_known_columns(policy)
    g = torch.Generator().manual_seed(4)
    x_T = torch.randn(2, 16, ACTION_DIM, generator=g, dtype=torch.float64)
    noise = torch.randn(steps, 2, 16, ACTION_DIM, generator=g, dtype=torch.float64)
    prefix = torch.rand(2, START + 4, ACTION_DIM, generator=g, dtype=torch.float64) - 0.5
    eta = torch.randn(2, START + 4, ACTION_DIM, generator=g, dtype=torch.float64)
    obs_cond = policy.global_condition(obs_batch(policy)).double()
    constraint = PrefixConstraint(prefix, torch.ones(2, START + 4, dtype=torch.float64), eta,
                                  policy.noise_scheduler.alphas_cumprod)

    def denoiser(known):
        return constraint.wrap(policy.make_denoise_fn(torch.cat([obs_cond, known], dim=-1)))

    told = denoiser(policy.known_condition(prefix, START + 4).double())
    seq = make_sampler(sequential, policy.scheduler_config, steps)
    par = make_sampler(parallel, policy.scheduler_config, steps, tolerance=1e-9)
    step_noise = noise if seq.is_stochastic else None
    expected = seq.sample(told, x_T, noise=step_noise)
    out = par.sample(told, x_T, noise=step_noise)
    assert bool(torch.as_tensor(out.converged).all())
    torch.testing.assert_close(out.sample, expected.sample, rtol=0, atol=1e-8)
    init = par.guess_trajectory(x_T, expected.sample * 0.9, step_noise)
    warm = par.sample(told, x_T, noise=step_noise, init=init)
    torch.testing.assert_close(warm.sample, expected.sample, rtol=0, atol=1e-8)
    untold = seq.sample(denoiser(policy.known_condition(None, torch.zeros(2, dtype=torch.long)).double()),
                        x_T, noise=step_noise)
    assert (untold.sample - expected.sample)[:, START + 4 :].abs().max() > 1e-3


@pytest.mark.parametrize("parallel", ["paraddpm", "parasrdsddpm", "parataaddpm"])
def test_predict_action_with_the_trained_prefix_is_the_sequential_plan(parallel):
    """The same through predict_action (float32, tau = 1e-6), warm start included: the prefix noise is one
    draw per call from the generator, so the parallel solve sees the sequential one's problem."""
    policy = delay_policy(1)
    _wake_known_columns(policy)
    obs = obs_batch(policy)
    prefix = torch.rand(2, START + 3, ACTION_DIM, generator=torch.Generator().manual_seed(2))

    def plan(name, **kwargs):
        policy.set_sampler(name, 30, **({"tolerance": 1e-6} if name.startswith("para") else {}))
        return policy.predict_action(obs, generator=torch.Generator().manual_seed(3), prefix=prefix,
                                     prefix_mode="trained", **kwargs)

    expected = plan("ddpm")
    torch.testing.assert_close(plan(parallel)["action_pred"], expected["action_pred"], rtol=0, atol=1e-4)
    warm = plan(parallel, warm_from=expected["sample"], warm_shift=2)
    torch.testing.assert_close(warm["action_pred"], expected["action_pred"], rtol=0, atol=1e-4)


def test_clean_committed_positions_in_training_and_at_every_step():
    """committed_in_sample='clean' (training-time RTC): the network sees the committed positions at noise
    level 0, in the loss's input and at every denoising step of a plan, and stays exact under Picard."""
    policy = delay_policy(committed_in_sample="clean").train()
    policy.delay_none_prob = 0.0
    seen = []
    hook = policy.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    batch = {"obs": obs_batch(policy, 8), "action": torch.rand(8, 16, ACTION_DIM) - 0.5}
    lengths = policy.draw_known_lengths(8, torch.Generator().manual_seed(5))
    policy.draw_known_lengths = lambda *args, **kwargs: lengths
    policy.compute_loss(batch, torch.Generator().manual_seed(5))
    actions = policy.normalizer.action.normalize(batch["action"])
    for row, length in enumerate(lengths.tolist()):
        assert torch.equal(seen[0][row, :length], actions[row, :length])  # clean where committed
        assert not torch.equal(seen[0][row, length:], actions[row, length:])  # noised elsewhere
    del policy.draw_known_lengths

    policy.eval()
    _wake_known_columns(policy)
    seen.clear()
    prefix = torch.rand(2, START + 3, ACTION_DIM, generator=torch.Generator().manual_seed(2))
    policy.set_sampler("ddim", 6)
    out = policy.predict_action(obs_batch(policy), generator=torch.Generator().manual_seed(3), prefix=prefix)
    clean = policy.normalizer.action.normalize(prefix)
    assert len(seen) == 6 and all(torch.allclose(x[:, : START + 3], clean, atol=1e-6) for x in seen)
    torch.testing.assert_close(out["action_pred"][:, : START + 3], prefix)
    policy.set_sampler("paraddim", 6, tolerance=1e-7)
    parallel = policy.predict_action(obs_batch(policy), generator=torch.Generator().manual_seed(3), prefix=prefix)
    torch.testing.assert_close(parallel["action_pred"], out["action_pred"], rtol=0, atol=1e-4)
    hook.remove()
    with pytest.raises(ValueError, match="committed_in_sample"):
        tiny_config(max_delay=4, committed_in_sample="fresh")


def _wake_known_columns(policy):
    """Make the (randomly initialised) network depend clearly on the known-actions columns."""
    known = policy.config.known_cond_dim
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if name.endswith("cond_encoder.1.weight"):
                param[:, -known:] = torch.randn_like(param[:, -known:]) * 0.5


# ------------------------------------------------------------------ the runner and AsyncPolicy
class DelayLabelledPolicy(LabelledPolicy):
    class config(LabelledPolicy.config.__class__):
        max_delay = 8
        image_keys = []


def test_runner_gives_the_committed_positions_to_a_trained_policy():
    """transition=trained: the second plan (request at t = 8, d = 4) gets positions [0, start + d) of what
    the robot did and will do, exactly, with prefix_mode='trained'; the first plan gets none."""
    policy = DelayLabelledPolicy()
    envs = vector_env(60)
    PolicyRunner(envs, policy, timing="async", latency=200, transition="trained").run_batch([7])
    second = policy.kwargs[1]
    prefix = second["prefix"][0].numpy()
    assert prefix.shape == (START + 4, 3)
    assert [(int(p[0]), int(p[1])) for p in prefix] == [(0, 8 + j) for j in range(START + 4)]
    assert second["prefix_mode"] == "trained" and torch.all(second["prefix_weights"] == 1)
    assert "prefix" not in policy.kwargs[0]
    labels = [(int(a[0]), int(a[1])) for a in envs.envs[0].actions]
    assert labels[12] == (1, START + 4)  # the new chunk takes over after the committed positions


def test_trained_transition_is_refused_by_a_policy_not_trained_for_delay():
    with pytest.raises(ValueError, match="trained for delay"):
        PolicyRunner(vector_env(), LabelledPolicy(), timing="async", latency=200, transition="trained")
    with pytest.raises(ValueError, match="trained for delay"):
        run_fake("async", 200, transition="trained")


def test_auto_transition_picks_by_policy():
    assert auto_transition(tiny_config(max_delay=4)) == "trained"
    assert auto_transition(tiny_config()) == "forecast"
    image = type("Image", (), {"max_delay": 0, "image_keys": ["agentview_image"]})()
    assert auto_transition(image) == "naive"  # forecast hurts image policies
    assert Transition.parse("auto", tiny_config(max_delay=4)).trained
    assert Transition.parse("auto").name == "auto"
    runner = PolicyRunner(vector_env(), DelayLabelledPolicy(), timing="async", latency=200, transition="auto")
    assert runner.transition.name == "trained"


def test_async_policy_plans_with_the_trained_prefix():
    """AsyncPolicy's default (auto) is trained for a delay policy: later plans get the committed actions with
    prefix_mode='trained'; locally and through a server, which announces max_delay."""
    from parapolicy.serving.client import RemotePolicy
    from parapolicy.realtime import AsyncPolicy
    from parapolicy.serving.server import PolicyServer, ServerThread
    from test_async_policy import SlowPlanner, run_loop

    class DelayPlanner(SlowPlanner):
        config = type("Config", (SlowPlanner.config.__class__,), {"max_delay": 8, "image_keys": []})()

    planner = DelayPlanner(plan_s=0.12)
    with AsyncPolicy(planner, control_hz=20) as policy:
        assert policy.transition.trained
        run_loop(policy, 30)
    later = planner.kwargs[2]
    assert later["prefix_mode"] == "trained" and later["prefix"].shape[1] >= START + 3
    assert torch.all(later["prefix_weights"] == 1)
    with pytest.raises(ValueError, match="trained for delay"):
        AsyncPolicy(tiny_policy(), control_hz=20, transition="trained")

    served = delay_policy()
    served.set_sampler("ddim", 4)
    with ServerThread(PolicyServer(served, "127.0.0.1", 0)) as server:
        remote = RemotePolicy(server.url)
        assert remote.metadata["max_delay"] == MAX_DELAY
        with AsyncPolicy(remote, control_hz=20) as policy:
            assert policy.transition.trained
        remote.close()
    with ServerThread(PolicyServer(tiny_policy(), "127.0.0.1", 0)) as server:
        remote = RemotePolicy(server.url)
        with pytest.raises(ValueError, match="trained for delay"):
            AsyncPolicy(remote, control_hz=20, transition="trained")
        remote.close()


# ------------------------------------------------------------------ training end to end
def test_fine_tuning_for_delay_records_it_and_starts_from_the_original(tmp_path):
    learnable_hdf5(tmp_path / "demos.hdf5", n_demos=6, length=40)
    common = ["batch_size=8", "val_ratio=0", "log_every=1", "warmup_steps=2"]
    source = train(train_config(tmp_path, "iters=4", *common, f"out={tmp_path / 'source'}"))
    frozen = train(train_config(tmp_path, "iters=6", "lr=0", *common, "policy.max_delay=5", "policy.horizon=24",
                                f"out={tmp_path / 'delay'}", f"init_from={source}"))
    policy, original = load_checkpoint(frozen), load_checkpoint(source)
    assert policy.config.max_delay == 5 and policy.config.horizon == 24
    info = policy.training_info
    assert info["delay"] == {"max_delay": 5, "none_prob": 0.1, "known_positions": START + 5,
                             "committed_in_sample": "noised"}
    assert info["stages"][-1]["init_from"] == str(source)
    # lr = 0: the U-Net's weights are the source's, the new FiLM columns zero
    theirs, ours = original.state_dict(), policy.state_dict()
    for key, value in theirs.items():
        if value.shape == ours[key].shape:
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
        else:
            torch.testing.assert_close(ours[key][:, : value.shape[1]], value, rtol=0, atol=0, msg=key)
            assert not ours[key][:, value.shape[1]:].any()


def test_fast_path_warms_up_and_plans_a_delay_policy():
    """The fast path's warm-up builds the network's full conditioning (observation + known actions)."""
    from parapolicy.policy.accel import warm_up

    policy = delay_policy()
    policy.set_sampler("ddim", 4)
    obs, prefix = obs_batch(policy, 1), torch.zeros(1, START + 2, ACTION_DIM)
    plain = policy.predict_action(obs, generator=torch.Generator().manual_seed(0), prefix=prefix)["action_pred"]
    policy.enable_fast_path(backend=["eager", "trace"])
    assert warm_up(policy, 1)["backends"]
    fast = policy.predict_action(obs, generator=torch.Generator().manual_seed(0), prefix=prefix)["action_pred"]
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)


def test_the_eval_records_the_transition_auto_chose():
    from parapolicy.evaluation.realtime_options import describe

    options = {"timing": "async", "latency": "200", "transition": "auto", "execution_horizon": None}
    assert describe(options, "ddim-10", "ddim", tiny_config(max_delay=4))["transition"] == "trained"
    assert describe(options, "ddim-10", "ddim", tiny_config())["transition"] == "forecast"
    assert describe(options, "ddim-10", "ddim")["transition"] == "auto"  # no policy to choose by
