"""Checkpoint folder round trip, validation errors and load_policy name resolution."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from parapolicy.policy import checkpoint as ckpt
from parapolicy.policy import load_checkpoint, load_policy, save_checkpoint
from policy_synthetic import ACTION_DIM, OBS_DIM, tiny_policy


@pytest.fixture
def saved(tmp_path):
    policy = tiny_policy(seed=1)
    folder = save_checkpoint(policy, tmp_path / "tiny", training={"iterations": 3, "final_loss": 0.5})
    return policy, folder


def test_round_trip_gives_identical_outputs(saved):
    policy, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["policy"]["obs_keys"] == policy.config.obs_keys and config["env"] == "square"
    assert config["scheduler"]["num_train_timesteps"] == 100 and config["scheduler"]["clip_sample"] is True
    assert config["sampler"]["name"] == "ddpm" and config["training"]["iterations"] == 3
    assert config["training"]["torch_version"] == torch.__version__ and "date" in config["training"]

    loaded = load_checkpoint(folder)
    assert loaded.config == policy.config and loaded.scheduler_config == policy.scheduler_config
    for key, value in policy.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x, t, cond = torch.randn(2, 16, ACTION_DIM), torch.tensor([3, 70]), torch.randn(2, 2 * OBS_DIM)
    with torch.no_grad():
        assert torch.equal(loaded.model(x, t, cond), policy.model(x, t, cond))
    assert loaded.training_info["final_loss"] == 0.5


def test_no_pickle_in_the_weights_file(saved):
    _, folder = saved
    tensors = load_file(folder / "model.safetensors")
    assert {"normalizer.obs.min", "normalizer.obs.max", "normalizer.action.min", "normalizer.action.max"} <= set(tensors)
    assert all(k.startswith(("model.", "normalizer.")) for k in tensors)


def test_rejects_truncated_weights(saved):
    _, folder = saved
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors is corrupted or truncated"):
        load_checkpoint(folder)


def test_rejects_missing_unexpected_and_misshapen_keys(saved):
    _, folder = saved
    weights = folder / "model.safetensors"
    original = load_file(weights)
    key = "model.mid_modules.0.blocks.0.block.0.weight"

    save_file({k: v for k, v in original.items() if k != key}, weights)
    with pytest.raises(ValueError, match=f"missing keys {key}"):
        load_checkpoint(folder)

    save_file({**original, "model.extra.weight": torch.zeros(2)}, weights)
    with pytest.raises(ValueError, match="unexpected keys model.extra.weight"):
        load_checkpoint(folder)

    bad = dict(original)
    bad["normalizer.obs.min"] = torch.zeros(OBS_DIM + 1)
    save_file(bad, weights)
    with pytest.raises(ValueError, match=rf"shape mismatch for normalizer.obs.min: file has \[{OBS_DIM + 1}\], "
                                         rf"config expects \[{OBS_DIM}\]"):
        load_checkpoint(folder)


def test_rejects_missing_files_and_bad_config(saved, tmp_path):
    _, folder = saved
    with pytest.raises(FileNotFoundError, match="folder not found"):
        load_checkpoint(tmp_path / "nowhere")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())

    config_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_checkpoint(folder)

    del config["policy"]["obs_dim"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lacks required fields \['obs_dim'\]"):
        load_checkpoint(folder)

    config_path.unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_checkpoint(folder)


def test_load_policy_resolves_names_and_sampler(saved, monkeypatch):
    _, folder = saved
    monkeypatch.setattr(ckpt, "CHECKPOINTS_DIR", folder.parent)
    policy = load_policy("tiny")
    assert policy.sampler_name == "ddpm" and policy.num_inference_steps == 10
    assert load_policy(str(folder)).config.obs_dim == OBS_DIM
    with pytest.raises(FileNotFoundError, match="available: \\['tiny'\\]"):
        load_policy("absent")
    fast = load_policy("tiny", sampler="paraddpm", num_inference_steps=8, window=4)
    assert fast.sampler_name == "paraddpm" and fast.num_inference_steps == 8
    assert fast.sampler_options == {"window": 4}


@pytest.mark.parametrize("name", ["square", "lift", "can"])
def test_shipped_checkpoint_loads_and_plans(name):
    """The checkpoints in git load by name, fit their env's observation/action layout and the size cap,
    record their provenance, and plan the same chunk with a parallel sampler as with DDPM."""
    from parapolicy.envs.robosuite_env import get_task

    task = get_task(name)  # what the env really emits (robosuite itself is not imported)
    folder = ckpt.CHECKPOINTS_DIR / name
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 25 * 2**20

    ddpm = load_policy(name, sampler="ddpm", num_inference_steps=10)
    assert ddpm.config.env == name and tuple(ddpm.config.obs_keys) == task.obs_keys
    assert ddpm.config.obs_dim == task.obs_dim
    training = ddpm.training_info
    assert training["iterations"] > 0 and len(training["dataset_sha256"]) == 64
    assert training["stages"][-1]["to_step"] == training["iterations"]

    obs = torch.zeros(2, ddpm.config.n_obs_steps, ddpm.config.obs_dim)
    obs[1] += 0.05
    parallel = load_policy(name, sampler="paraddpm", num_inference_steps=10, window=10, tolerance=1e-6)
    out = ddpm.predict_action(obs, generator=torch.Generator().manual_seed(0))
    par = parallel.predict_action(obs, generator=torch.Generator().manual_seed(0))
    action = out["action"]
    assert action.shape == (2, ddpm.config.n_action_steps, ddpm.config.action_dim)
    assert torch.isfinite(action).all() and action.abs().max() <= 1 + 1e-5
    assert torch.allclose(par["action"], action, atol=1e-3), (par["action"] - action).abs().max()
    assert int(par["rounds"]) <= 10  # parallel depth never exceeds the sequential count
