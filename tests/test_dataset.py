"""SequenceDataset: reading robomimic-style HDF5, obs concatenation, DP's window padding."""

import numpy as np
import pytest
import torch

from parapolicy.policy.dataset import SequenceDataset, list_demos, load_demos, split_demos
from policy_synthetic import ACTION_DIM, OBS_DIM, OBS_KEYS, known_demo, write_hdf5

HORIZON, N_OBS, N_ACT = 16, 2, 8


@pytest.fixture
def known_file(tmp_path):
    # demo_10 written before demo_2 to check numeric (not lexicographic / insertion) ordering.
    demos = {"demo_10": known_demo(10, 25), "demo_2": known_demo(2, 30), "demo_1": known_demo(1, 20)}
    return write_hdf5(tmp_path / "known.hdf5", demos, masks={"train": ["demo_1", "demo_10"]})


def expected_obs(demo, frames):
    return demo * 1000 + np.asarray(frames)[:, None] + np.arange(OBS_DIM)[None, :] / 100


def expected_actions(demo, frames):
    return -(demo * 1000 + np.asarray(frames)[:, None]) - np.arange(ACTION_DIM)[None, :] / 100


def test_demo_order_and_obs_concatenation(known_file):
    assert list_demos(known_file) == ["demo_1", "demo_2", "demo_10"]
    demos = load_demos(known_file, OBS_KEYS)
    assert [d.name for d in demos] == ["demo_1", "demo_2", "demo_10"]
    assert demos[1].obs.shape == (30, OBS_DIM) and demos[1].obs.dtype == np.float32
    np.testing.assert_allclose(demos[1].obs, expected_obs(2, range(30)), rtol=1e-6)
    # Key order matters: swapping two keys must swap their columns.
    swapped = load_demos(known_file, ["robot0_eef_pos", "object", "robot0_eef_quat", "robot0_gripper_qpos"])
    np.testing.assert_allclose(swapped[0].obs[:, :3], demos[0].obs[:, 14:17])


def test_filter_key_and_errors(known_file, tmp_path):
    assert list_demos(known_file, filter_key="train") == ["demo_1", "demo_10"]
    with pytest.raises(ValueError, match="mask/valid"):
        list_demos(known_file, filter_key="valid")
    with pytest.raises(ValueError, match="lacks keys \\['cube_pos'\\]"):
        load_demos(known_file, ["cube_pos"])
    with pytest.raises(FileNotFoundError):
        load_demos(tmp_path / "nope.hdf5", OBS_KEYS)


def test_windows_pad_like_diffusion_policy(known_file):
    ds = SequenceDataset.from_hdf5(known_file, OBS_KEYS, HORIZON, N_OBS, N_ACT)
    lengths = [20, 30, 25]  # demo_1, demo_2, demo_10
    # DP's SequenceSampler: starts from -pad_before to L - horizon + pad_after per episode.
    per_demo = [L - HORIZON + (N_OBS - 1) + (N_ACT - 1) + 1 for L in lengths]
    assert len(ds) == sum(per_demo)

    first = ds[0]
    assert first["obs"].shape == (N_OBS, OBS_DIM) and first["action"].shape == (HORIZON, ACTION_DIM)
    # The first window starts one frame before the episode: frame 0 repeated.
    np.testing.assert_allclose(first["obs"], expected_obs(1, [0, 0]), rtol=1e-6)
    np.testing.assert_allclose(first["action"], expected_actions(1, [0] + list(range(15))), rtol=1e-6)

    last = ds[per_demo[0] - 1]  # last window of demo_1 (length 20): starts at 20 - 16 + 7 = 11
    np.testing.assert_allclose(last["obs"], expected_obs(1, [11, 12]), rtol=1e-6)
    frames = [min(t, 19) for t in range(11, 11 + HORIZON)]  # last action repeated 7 times
    np.testing.assert_allclose(last["action"], expected_actions(1, frames), rtol=1e-6)

    # Windows never mix episodes: demo_2's first window pads with demo_2's frame 0.
    np.testing.assert_allclose(ds[per_demo[0]]["obs"], expected_obs(2, [0, 0]), rtol=1e-6)


def test_sample_is_batched_and_seeded(known_file):
    ds = SequenceDataset.from_hdf5(known_file, OBS_KEYS, HORIZON, N_OBS, N_ACT)
    a = ds.sample(64, torch.Generator().manual_seed(3))
    b = ds.sample(64, torch.Generator().manual_seed(3))
    assert a["obs"].shape == (64, N_OBS, OBS_DIM) and a["action"].shape == (64, HORIZON, ACTION_DIM)
    assert torch.equal(a["obs"], b["obs"]) and torch.equal(a["action"], b["action"])
    # Obs history frames are consecutive (or repeated at the start): delta 0 or 1 within an episode.
    delta = a["obs"][:, 1, 0] - a["obs"][:, 0, 0]
    assert set(delta.round().tolist()) <= {0.0, 1.0}


def test_split_demos_holds_out_whole_demos(known_file):
    demos = load_demos(known_file, OBS_KEYS)
    train, val = split_demos(demos, 0.05, seed=0)
    assert len(val) == 1 and len(train) == 2
    assert {d.name for d in train} | {d.name for d in val} == {"demo_1", "demo_2", "demo_10"}
    assert split_demos(demos, 0.0)[1] == []
