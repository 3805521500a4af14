"""Training: the loss goes down, checkpoints load, resume continues exactly, the Hydra CLI runs."""

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file

from parapolicy.policy import load_checkpoint
from parapolicy.train import train
from policy_synthetic import OBS_DIM, learnable_hdf5

TINY = ["policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=16", "policy.num_inference_steps=10",
        "progress_bar=false", "torch_threads=1"]


def config(tmp_path, *overrides):
    with initialize_config_module(config_module="parapolicy.conf", version_base=None):
        return compose("train", overrides=[f"dataset={tmp_path / 'demos.hdf5'}", f"out={tmp_path / 'ckpt'}",
                                           *TINY, *overrides])


def read_log(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture
def demos(tmp_path):
    return learnable_hdf5(tmp_path / "demos.hdf5", n_demos=6, length=40)


def test_short_training_lowers_the_loss_and_ships_a_checkpoint(tmp_path, demos):
    cfg = config(tmp_path, "iters=80", "batch_size=64", "lr=4e-3", "warmup_steps=2", "lr_scheduler=constant",
                 "betas=[0.9,0.999]", "log_every=1",
                 "checkpoint_every=40", "val_ratio=0.2", "policy.down_dims=[32,64]")
    out = train(cfg)
    log = [r for r in read_log(out) if not r.get("checkpoint")]
    assert [r["step"] for r in log] == list(range(1, 81))
    first = sum(r["batch_loss"] for r in log[:10]) / 10
    last = sum(r["batch_loss"] for r in log[-10:]) / 10
    print(f"batch loss {first:.3f} -> {last:.3f}")
    assert last < 0.6 * first, (first, last)

    checkpoints = [r for r in read_log(out) if r.get("checkpoint")]
    assert [r["step"] for r in checkpoints] == [40, 80] and checkpoints[-1]["val_loss"] is not None
    policy = load_checkpoint(out)
    info = policy.training_info
    assert info["iterations"] == 80 and len(info["dataset_sha256"]) == 64 and info["val_demos"] == 1
    assert policy.config.obs_dim == OBS_DIM and policy.config.env == "square"
    # The normaliser was fitted on the data: demo actions are tanh(.) in (-1, 1).
    assert torch.all(policy.normalizer.action.min > -1) and torch.all(policy.normalizer.action.max < 1)


def test_resume_continues_exactly_where_it_stopped(tmp_path, demos):
    common = ["iters=12", "batch_size=16", "checkpoint_every=4", "log_every=4", "val_ratio=0"]
    straight = train(config(tmp_path, *common, f"out={tmp_path / 'straight'}"))
    train(config(tmp_path, *common, f"out={tmp_path / 'chunked'}", "stop_at=5"))
    state = json.loads((tmp_path / "chunked" / "training_state" / "state.json").read_text())
    assert state["step"] == 5
    chunked = train(config(tmp_path, *common, f"out={tmp_path / 'chunked'}"))  # resume=true by default

    a, b = load_file(straight / "model.safetensors"), load_file(chunked / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert load_checkpoint(chunked).training_info["iterations"] == 12
    # Provenance lists every invocation that trained, with its settings.
    stages = load_checkpoint(chunked).training_info["stages"]
    assert [(s["from_step"], s["to_step"], s["batch_size"], s["iters"]) for s in stages] == [(0, 5, 16, 12), (5, 12, 16, 12)]
    assert [(s["from_step"], s["to_step"]) for s in load_checkpoint(straight).training_info["stages"]] == [(0, 12)]
    # The training state is pickle-free: safetensors + JSON only.
    assert sorted(p.name for p in (chunked / "training_state").iterdir()) == ["state.json", "state.safetensors"]


def test_resume_refuses_a_different_network(tmp_path, demos):
    train(config(tmp_path, "iters=2", "batch_size=8", "val_ratio=0"))
    with pytest.raises(ValueError, match="policy config differs"):
        train(config(tmp_path, "iters=4", "batch_size=8", "val_ratio=0", "policy.kernel_size=3"))


def test_hydra_cli(tmp_path, demos):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "parapolicy.train", "env=lift", f"dataset={demos}", f"out={out}", "iters=2",
           "batch_size=8", "env.obs_dim=null", f"hydra.run.dir={tmp_path / 'hydra'}", *TINY]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[checkpoint] iter 2/2" in result.stdout + result.stderr
    assert load_checkpoint(out).config.env == "lift"


def test_init_from_continues_a_shipped_checkpoint_with_a_new_schedule(tmp_path, demos):
    """The training state stays out of git: init_from picks up a checkpoint's EMA weights instead."""
    common = ["batch_size=8", "val_ratio=0", "log_every=1", "warmup_steps=2"]
    source = train(config(tmp_path, "iters=6", *common, f"out={tmp_path / 'source'}"))
    # lr=0: the weights cannot move, so the continued checkpoint must equal its source exactly.
    frozen = train(config(tmp_path, "iters=9", "lr=0", *common, f"out={tmp_path / 'frozen'}", f"init_from={source}"))
    a, b = load_file(source / "model.safetensors"), load_file(frozen / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    info = load_checkpoint(frozen).training_info
    assert info["iterations"] == 9
    assert [(s["from_step"], s["to_step"]) for s in info["stages"]] == [(0, 6), (6, 9)]
    assert info["stages"][1]["init_from"] == str(source) and info["stages"][1]["schedule_start"] == 6

    # The stage's own warm-up restarts at the checkpoint's step: steps 7, 8 ramp up, 9 is the peak.
    moved = train(config(tmp_path, "iters=9", "lr=1e-3", "lr_scheduler=constant", *common,
                         f"out={tmp_path / 'moved'}", f"init_from={source}"))
    lrs = {r["step"]: r["lr"] for r in read_log(moved) if not r.get("checkpoint")}
    assert lrs == pytest.approx({7: 0.0, 8: 5e-4, 9: 1e-3})
    c = load_file(moved / "model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("model."))
    # Resuming that stage's training state keeps its schedule start.
    state = json.loads((moved / "training_state" / "state.json").read_text())
    assert state["schedule_start"] == 6


def test_init_from_refuses_a_different_network(tmp_path, demos):
    source = train(config(tmp_path, "iters=2", "batch_size=8", "val_ratio=0", f"out={tmp_path / 'source'}"))
    with pytest.raises(ValueError, match="down_dims"):
        train(config(tmp_path, "iters=4", "batch_size=8", "val_ratio=0", "policy.down_dims=[8,16]",
                     f"out={tmp_path / 'other'}", f"init_from={source}"))
