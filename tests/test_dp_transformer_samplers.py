"""Every sampler, warm start and prefix constraint on Diffusion Policy's transformer (DP-T), parallel against
sequential in float64 at tau -> 0, and the denoiser fast path (bucketing, CPU backends) on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parapolicy.policy import DiffusionPolicy, DiffusionPolicyConfig
from parapolicy.samplers import make_sampler
from parapolicy.samplers.constraints import PrefixConstraint

pytestmark = pytest.mark.usefixtures("one_thread")

OBS_DIM, BATCH = 5, 2
NETWORKS = {  # name -> DiffusionPolicyConfig options
    "obs_tokens": dict(network={"class": "TransformerForDiffusion", "n_layer": 2, "n_head": 2, "n_emb": 16,
                                "p_drop_attn": 0.0}),
    "obs_tokens_encoder": dict(network={"class": "TransformerForDiffusion", "n_layer": 1, "n_head": 2, "n_emb": 16,
                                        "n_cond_layers": 1}),
    "inpaint": dict(network={"class": "TransformerForDiffusion", "n_layer": 2, "n_head": 2, "n_emb": 16,
                             "obs_as_cond": False}),
    "encoder_only": dict(network={"class": "TransformerForDiffusion", "n_layer": 2, "n_head": 2, "n_emb": 16,
                                  "obs_as_cond": False, "time_as_cond": False}),
}
# (sequential, parallel, steps, parallel options)
PAIRS = [
    ("ddpm", "paraddpm", 20, {"window": 8}),
    ("ddim", "paraddim", 10, {}),
    ("ddim", "paraddim", 10, {"eta": 0.5}),
    ("dpmsolver", "paradpmsolver", 8, {}),
    ("ddpm", "parasrdsddpm", 20, {"num_blocks": 4}),
    ("ddim", "parasrdsddim", 10, {}),
    ("ddpm", "parataaddpm", 20, {"window": 8}),
    ("ddim", "parataaddim", 10, {}),
]
TINY = 1e-10


def tiny_policy(network: str, seed: int = 0, **options) -> DiffusionPolicy:
    config = DiffusionPolicyConfig(**{**dict(obs_dim=OBS_DIM, action_dim=3, horizon=8, n_obs_steps=2, n_action_steps=4),
                                      **NETWORKS[network], **options})
    torch.manual_seed(seed)
    policy = DiffusionPolicy(config)
    with torch.no_grad():  # off DP's near-zero initial weights, so the network's output matters
        for p in policy.model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    lo = torch.linspace(-2, -0.5, OBS_DIM)
    policy.normalizer.obs.set_stats(lo, lo + 3)
    policy.normalizer.action.set_stats(-torch.ones(3), torch.ones(3) * 2)
    return policy.eval()


def float64_denoiser(policy: DiffusionPolicy, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    global_cond = torch.randn(BATCH, policy.config.global_cond_dim, generator=g, dtype=torch.float64)
    policy.model.double()
    return policy.make_denoise_fn(global_cond)


def draws(policy: DiffusionPolicy, n: int, seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    shape = (BATCH, policy.config.horizon, policy.config.sample_dim)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn((n, *shape), generator=g, dtype=torch.float64)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@torch.no_grad()
def check_pair(policy, seq, par, n, options, wrap=None, init_rule=None):
    denoise = float64_denoiser(policy)
    if wrap is not None:
        denoise = wrap(denoise)
    sequential = make_sampler(seq, policy.scheduler_config, n, **{k: v for k, v in options.items() if k == "eta"})
    parallel = make_sampler(par, policy.scheduler_config, n, tolerance=TINY, **options)
    x_T, noise = draws(policy, n)
    expected = sequential.sample(denoise, x_T, noise=noise)
    init = None
    if init_rule is not None:  # a warm start from a wrong guess of the clean chunk
        guess = expected.sample + 0.3 * torch.randn_like(expected.sample)
        init = parallel.guess_trajectory(x_T, guess, noise if parallel.is_stochastic else None, rule=init_rule)
    out = parallel.sample(denoise, x_T, noise=noise, init=init)
    assert out.converged
    assert rel_err(out.sample, expected.sample) < 1e-6, (seq, par, rel_err(out.sample, expected.sample))
    assert expected.sample.std() > 0.1
    return out, expected


@pytest.mark.parametrize("network", ["obs_tokens", "inpaint"])
@pytest.mark.parametrize("seq, par, n, options", PAIRS, ids=[f"{p[1]}{'-eta' if 'eta' in p[3] else ''}" for p in PAIRS])
def test_parallel_matches_sequential_on_the_transformer(network, seq, par, n, options):
    check_pair(tiny_policy(network), seq, par, n, options)


@pytest.mark.parametrize("network", ["obs_tokens_encoder", "encoder_only"])
@pytest.mark.parametrize("seq, par, n, options", [PAIRS[0], PAIRS[5]], ids=["paraddpm", "parasrdsddim"])
def test_parallel_matches_sequential_on_the_other_variants(network, seq, par, n, options):
    check_pair(tiny_policy(network), seq, par, n, options)


@pytest.mark.parametrize("network, rule, par", [
    ("obs_tokens", "rollout", "paraddpm"), ("obs_tokens", "marginal", "parataaddpm"),
    ("inpaint", "rollout", "parataaddpm"), ("inpaint", "marginal", "paraddpm"), ("obs_tokens", "rollout", "parasrdsddpm"),
])
def test_warm_start_converges_to_the_cold_result(network, rule, par):
    options = {"num_blocks": 4} if "srds" in par else {"window": 8}
    check_pair(tiny_policy(network), "ddpm", par, 20, options, init_rule=rule)


@pytest.mark.parametrize("par, n", [("paraddpm", 20), ("paraddim", 10), ("parataaddpm", 20), ("parasrdsddim", 10)])
@pytest.mark.parametrize("weights", ["hard", "soft"])
def test_prefix_constraint_parallel_matches_sequential(par, n, weights):
    policy = tiny_policy("obs_tokens")
    g = torch.Generator().manual_seed(9)
    length = 5
    prefix = torch.randn(BATCH, length, 3, generator=g, dtype=torch.float64)
    eta = torch.randn(BATCH, length, 3, generator=g, dtype=torch.float64)
    w = torch.ones(BATCH, length, dtype=torch.float64) if weights == "hard" else \
        torch.linspace(1, 0.2, length, dtype=torch.float64).expand(BATCH, -1)
    constraint = PrefixConstraint(prefix, w, eta, policy.noise_scheduler.alphas_cumprod)
    seq = "ddpm" if par.endswith("ddpm") else "ddim"
    out, expected = check_pair(policy, seq, par, n, {"num_blocks": 4} if "srds" in par else {}, wrap=constraint.wrap)
    if weights == "hard":  # the imposed positions are the prefix itself once finished
        assert torch.allclose(constraint.finish(out.sample)[:, :length], prefix)


# ------------------------------------------------------------------------------------------- policy level
def plan(policy, batch=3, seed=1, **kwargs):
    obs = torch.randn(batch, 2, OBS_DIM, generator=torch.Generator().manual_seed(seed))
    return policy.predict_action(obs, generator=torch.Generator().manual_seed(seed + 1), **kwargs)


@pytest.mark.parametrize("network", ["obs_tokens", "inpaint"])
def test_predict_action_paraddpm_matches_ddpm_and_act_runs(network):
    policy = tiny_policy(network)
    policy.set_sampler("ddpm", 30)
    reference = plan(policy)
    assert reference["action"].shape == (3, 4, 3) and reference["action_pred"].shape == (3, 8, 3)
    assert reference["sample"].shape == (3, 8, policy.config.sample_dim)
    policy.set_sampler("paraddpm", 30, window=16, tolerance=1e-6)
    parallel = plan(policy)
    torch.testing.assert_close(parallel["action_pred"], reference["action_pred"], rtol=0, atol=1e-4)
    policy.set_sampler("paraddpm", 30, warm_start=True, tolerance=1e-3)
    policy.reset()
    obs = np.linspace(-1, 1, OBS_DIM).astype(np.float32)
    actions = [policy.act(obs) for _ in range(5)]
    assert all(a.shape == (3,) and np.isfinite(a).all() for a in actions) and policy.last_info["warm"]


def test_pred_action_steps_only_executes_the_whole_chunk():
    policy = tiny_policy("obs_tokens", horizon=5, n_action_steps=4, n_latency_steps=1, pred_action_steps_only=True)
    out = plan(policy)
    assert policy.config.action_start == 1
    assert torch.equal(out["action"], out["action_pred"][:, 1:])


def test_inpainting_policy_refuses_a_prefix_by_name():
    policy = tiny_policy("inpaint")
    with pytest.raises(ValueError, match="in-painted observations"):
        plan(policy, prefix=torch.zeros(3, 2, 3))
    tokens = tiny_policy("obs_tokens").set_sampler("ddim", 10)
    assert torch.allclose(plan(tokens, prefix=torch.zeros(3, 2, 3))["action_pred"][:, :2], torch.zeros(3, 2, 3))


def test_delay_conditioning_is_a_unet_option():
    """The trained transition (delay-conditioned networks) is built for the U-Net's FiLM conditioning."""
    if "max_delay" not in DiffusionPolicyConfig.__dataclass_fields__:
        pytest.skip("no delay-conditioned policies in this tree")
    with pytest.raises(ValueError, match="U-Net option"):
        tiny_policy("obs_tokens", max_delay=2)


def test_training_loss_runs_and_inpainting_training_is_refused():
    policy = tiny_policy("obs_tokens").train()
    g = torch.Generator().manual_seed(0)
    batch = {"obs": torch.randn(4, 2, OBS_DIM, generator=g), "action": torch.rand(4, 8, 3, generator=g)}
    loss = policy.compute_loss(batch, generator=g)
    loss.backward()
    assert loss.item() > 0 and policy.model.input_emb.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="trained with Diffusion Policy"):
        tiny_policy("inpaint").compute_loss(batch, generator=g)


# ------------------------------------------------------------------------------------------- fast path
@pytest.mark.parametrize("network", ["obs_tokens", "inpaint"])
@pytest.mark.parametrize("name, options", [("ddpm", {}), ("paraddpm", {"window": 4, "tolerance": 0.1})])
def test_fast_path_bucketing_gives_the_plain_path_samples_bitwise(network, name, options):
    policy = tiny_policy(network)
    policy.set_sampler(name, 10, **options)
    policy.enable_fast_path(False)
    reference = plan(policy)
    policy.enable_fast_path(buckets="auto", backend="eager")
    fast = plan(policy)
    assert fast["rounds"] == reference["rounds"] and torch.equal(fast["action_pred"], reference["action_pred"])
    assert policy.fast_path.stats.calls == reference["rounds"] and policy.fast_path.stats.fallbacks == 0


@pytest.mark.parametrize("backend, network", [("trace", "obs_tokens"), ("trace", "inpaint"),
                                              ("onnxruntime", "obs_tokens"), ("openvino", "inpaint")])
def test_cpu_backends_match_eager_on_the_transformer(backend, network):
    """Each CPU backend, forced (TorchScript trace, ONNX Runtime, OpenVINO where installed), gives the plain
    path's rounds and plans within 1e-5 at every Picard bucket, with none dropped as inexact or failing."""
    from parapolicy.policy.accel_runtimes import RUNTIMES, missing

    if backend in RUNTIMES and missing(backend) is not None:
        pytest.skip(missing(backend))
    policy = tiny_policy(network)
    policy.set_sampler("paraddpm", 10, window=4, tolerance=0.1)
    policy.enable_fast_path(False)
    reference = plan(policy)
    policy.enable_fast_path(backend=backend, warmup_budget_s=600)
    fast = plan(policy)
    stats = policy.fast_path.stats
    assert fast["rounds"] == reference["rounds"]
    torch.testing.assert_close(fast["action_pred"], reference["action_pred"], rtol=0, atol=1e-5)
    assert stats.fallbacks == 0 and not [n for n in stats.notes if "does not import" not in n], stats.notes
    assert set(stats.backends.values()) == {backend} and "K4xB3" in stats.backends


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("network", ["obs_tokens", "inpaint"])
def test_cuda_graphs_match_eager_on_the_transformer(network):
    policy = tiny_policy(network).to("cuda")
    policy.set_sampler("paraddpm", 10, window=4, tolerance=0.1)
    policy.enable_fast_path(False)
    reference = plan(policy)
    policy.enable_fast_path(True)
    fast = plan(policy)
    assert fast["rounds"] == reference["rounds"] and policy.fast_path.stats.captures > 0
    torch.testing.assert_close(fast["action_pred"], reference["action_pred"], rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------- training
def test_training_config_trains_a_transformer_with_dps_optimiser_groups(tmp_path):
    """conf/train_transformer.yaml (DP-T's settings, shrunk here) trains and ships a transformer checkpoint;
    only Linear and attention weights decay, as in DP."""
    from hydra import compose, initialize_config_module

    from parapolicy.policy import load_checkpoint
    from parapolicy.train import optim_groups, train
    from policy_synthetic import learnable_hdf5

    learnable_hdf5(tmp_path / "demos.hdf5", n_demos=4, length=30)
    with initialize_config_module(config_module="parapolicy.conf", version_base=None):
        cfg = compose("train_transformer", overrides=[
            f"dataset={tmp_path / 'demos.hdf5'}", f"out={tmp_path / 'ckpt'}", "iters=6", "batch_size=8",
            "warmup_steps=2", "checkpoint_every=6", "val_ratio=0", "progress_bar=false", "torch_threads=1",
            "policy.network.n_layer=1", "policy.network.n_emb=16", "policy.num_inference_steps=5"])
    assert (cfg.lr, list(cfg.betas), cfg.weight_decay, cfg.policy.horizon) == (1e-4, [0.9, 0.95], 1e-3, 10)
    policy = load_checkpoint(train(cfg))
    assert policy.config.network["class"] == "TransformerForDiffusion" and policy.config.network["causal_attn"]
    assert policy.training_info["iterations"] == 6
    decay, no_decay = optim_groups(policy, 1e-3)
    names = {id(p): n for n, p in policy.named_parameters()}
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} >= {"model.input_emb.weight", "model.head.weight",
                                                       "model.decoder.layers.0.self_attn.in_proj_weight"}
    assert not {"model.pos_emb", "model.ln_f.weight", "model.head.bias"} & {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(policy.parameters()))
