"""Half-precision stored weights: loaded as their float32 upcast; the shipped checkpoints are stored so, small
enough for the GPU check's 64 MiB, with the measured action change on record (scripts/half_checkpoint.py)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from parapolicy.policy import checkpoint as ckpt
from parapolicy.policy import load_checkpoint, save_checkpoint
from policy_synthetic import OBS_DIM, tiny_policy

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "half_checkpoint.py"
torch.set_num_threads(1)  # two threads on a shared 2-core machine can take minutes for 100 tiny DDPM steps


@pytest.fixture(scope="module")
def half_script():
    spec = importlib.util.spec_from_file_location("half_checkpoint_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_stored_weights_load_as_their_float32_upcast(tmp_path, half_script, dtype):
    policy = tiny_policy(seed=2)
    folder = save_checkpoint(policy, tmp_path / "tiny")
    state = load_file(folder / "model.safetensors")
    rounded = half_script.rounded_state(state, dtype)
    assert rounded["model.final_conv.1.weight"].dtype == dtype and rounded["normalizer.obs.min"].dtype == torch.float32
    save_file(rounded, folder / "model.safetensors")

    loaded = load_checkpoint(folder)
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.float32, key
        torch.testing.assert_close(value, rounded[key].float(), rtol=0, atol=0)  # exactly the upcast
    changed = (loaded.model.final_conv[1].weight - policy.model.final_conv[1].weight).abs().max()
    assert 0 < changed < 1e-2  # rounded once, not left as it was


def test_action_change_is_measured_on_the_same_noise(tmp_path, half_script):
    folder = save_checkpoint(tiny_policy(seed=3), tmp_path / "tiny")
    obs = torch.randn(4, 2, OBS_DIM, generator=torch.Generator().manual_seed(0))
    change = half_script.action_change(folder, torch.float16, obs)
    assert set(change) == {"ddpm-100", "ddim-10"}
    assert all(0 < c["mean"] <= c["max"] < 0.05 for c in change.values()), change


@pytest.mark.parametrize("name", ["square", "lift", "can"])
def test_shipped_checkpoints_store_float16_with_the_change_on_record(name):
    folder = ckpt.CHECKPOINTS_DIR / name
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 10 * 2**20
    tensors = load_file(folder / "model.safetensors")
    assert {str(v.dtype) for k, v in tensors.items() if k.startswith("model.")} == {"torch.float16"}
    assert {str(v.dtype) for k, v in tensors.items() if k.startswith("normalizer.")} == {"torch.float32"}
    storage = json.loads((folder / "config.json").read_text())["storage"]
    assert storage["weights_dtype"] == "float16" and len(storage["float32_sha256"]) == 64
    change = storage["action_change_vs_float32"]
    assert change["ddpm-100"]["max"] < 0.02 and change["ddim-10"]["max"] < 0.02
    assert 0 < change["ddpm-100"]["mean"] < 1e-3
