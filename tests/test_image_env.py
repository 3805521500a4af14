"""Camera observations on the robosuite envs (obs_mode image / hybrid) and image demonstrations."""

import json

import numpy as np
import pytest

from parapolicy.envs import GYM_IDS, get_task, make_env
from parapolicy.envs.opengl import available_gl_backend

pytestmark = pytest.mark.skipif(available_gl_backend() is None, reason="no offscreen OpenGL (EGL or OSMesa)")
CAMERAS = ("agentview_image", "robot0_eye_in_hand_image")
_ENV = {}


def lift_image():
    if "env" not in _ENV:  # suite.make with a renderer costs seconds: one env for the module
        _ENV["env"] = make_env("lift_image")
    return _ENV["env"]


def test_image_tasks_are_hybrid_with_two_cameras():
    spec = get_task("lift_image")
    assert spec.obs_mode == "hybrid" and spec.scene == "lift" and spec.robosuite_env == "Lift"
    assert spec.obs_keys == ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos") and spec.obs_dim == 9
    assert GYM_IDS["square_image"] == "parapolicy/SquareImage-v0"
    with pytest.raises(ValueError, match="obs_mode must be one of lowdim, image, hybrid"):
        make_env("lift", obs_mode="depth")


def test_camera_observations_are_uint8_channel_first_upright_and_seeded():
    env = lift_image()
    obs, _ = env.reset(seed=7)
    assert set(obs) == {*CAMERAS, "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"}
    assert env.observation_space.contains(obs)
    for key in CAMERAS:
        assert obs[key].shape == (3, 84, 84) and obs[key].dtype == np.uint8
        assert obs[key].std() > 5  # a scene, not a blank frame
        # raw_obs carries the same frame upright as [H, W, 3] (robomimic's layout) ...
        np.testing.assert_array_equal(env.raw_obs[key].transpose(2, 0, 1), obs[key])
    # ... which is robosuite's OpenGL frame (bottom row first) flipped
    env._make_render_context_current()
    rendered = env.sim.render(camera_name="agentview", width=84, height=84)
    np.testing.assert_array_equal(rendered[::-1].transpose(2, 0, 1), obs["agentview_image"])
    # right side up: agentview looks across the table, which fills the bottom of the frame (bright),
    # while the robot and the far wall are at the top
    agentview = obs["agentview_image"].astype(float)
    assert agentview[:, 60:].mean() > agentview[:, :20].mean() + 20

    again, _ = env.reset(seed=7)
    other, _ = env.reset(seed=8)
    for key in CAMERAS:
        np.testing.assert_array_equal(again[key], obs[key])
    assert np.abs(other["agentview_image"].astype(int) - obs["agentview_image"]).max() > 50  # the cube moved
    step_obs, _, _, _, info = env.step(np.zeros(7))
    assert "error" not in info and step_obs["agentview_image"].shape == (3, 84, 84)


def test_image_only_mode_and_a_named_camera():
    env = make_env("lift", obs_mode="image", cameras=["agentview"], camera_size=48)
    obs, _ = env.reset(seed=0)
    assert list(obs) == ["agentview_image"] and obs["agentview_image"].shape == (3, 48, 48)
    with pytest.raises(ValueError, match=r"cameras \['nope'\] in lift"):
        make_env("lift", obs_mode="image", cameras=["nope"])


def test_collect_records_robomimic_image_layout(tmp_path):
    import h5py

    from parapolicy.collect import collect_demos

    out = tmp_path / "lift_image.hdf5"
    stats = collect_demos("lift_image", 1, out, seed=0, progress=False)
    assert stats["n_success"] == 1
    with h5py.File(out, "r") as f:
        demo = f["data/demo_0"]
        length = demo.attrs["num_samples"]
        for key in CAMERAS:
            frames = demo["obs"][key]
            assert frames.shape == (length, 84, 84, 3) and frames.dtype == np.uint8
        assert demo["obs/robot0_eef_pos"].shape == (length, 3) and demo["actions"].shape == (length, 7)
        env_args = json.loads(f["data"].attrs["env_args"])
        assert env_args["env_kwargs"]["camera_names"] == ["agentview", "robot0_eye_in_hand"]
        assert env_args["env_kwargs"]["camera_heights"] == 84
        assert json.loads(f["data"].attrs["parapolicy"])["image_keys"] == list(CAMERAS)
        first = demo["obs/agentview_image"][0]
    # the first frame is what the env shows after reset(seed) for the demo's seed
    np.testing.assert_array_equal(first, lift_image().reset(seed=0)[0]["agentview_image"].transpose(1, 2, 0))
