"""Absolute-action policies (Diffusion Policy's ``abs_action=True``): the 6D rotation conversions against
scipy, the action adapter (10 -> 7 per arm), robosuite's OSC_POSE in absolute world-frame mode closed
loop, the runner holding the current pose, and the converter on DP-format abs-action checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from parapolicy.policy.action_space import check_action_space, env_action_dim, from_env_action, to_env_action
from parapolicy.policy.configuration import DiffusionPolicyConfig
from parapolicy.policy.rotation import (
    axis_angle_to_matrix,
    axis_angle_to_rotation_6d,
    matrix_to_axis_angle,
    matrix_to_quaternion,
    matrix_to_rotation_6d,
    rotation_6d_to_axis_angle,
    rotation_6d_to_matrix,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def gram_schmidt_reference(d6: np.ndarray) -> np.ndarray:
    """``[N, 6]`` -> ``[N, 3, 3]`` by numpy's QR: the rows a1, a2 as columns, Q's columns made to point like
    them (R's diagonal positive), the third row their cross product."""
    out = []
    for a in d6.reshape(-1, 2, 3):
        q, r = np.linalg.qr(a.T)
        q = q * np.sign(np.diag(r))
        out.append(np.stack([q[:, 0], q[:, 1], np.cross(q[:, 0], q[:, 1])]))
    return np.stack(out)


def rotation_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle (rad) of ``a b^T`` for matrices ``[N, 3, 3]``."""
    return (Rotation.from_matrix(a) * Rotation.from_matrix(b).inv()).magnitude()


# ------------------------------------------------------------------------------------------ rotation.py
def test_axis_angle_and_matrices_match_scipy_on_random_rotations():
    rotations = Rotation.random(500, random_state=0)
    matrices = torch.from_numpy(rotations.as_matrix())
    np.testing.assert_allclose(matrix_to_axis_angle(matrices).numpy(), rotations.as_rotvec(), atol=1e-12, rtol=0)
    np.testing.assert_allclose(axis_angle_to_matrix(torch.from_numpy(rotations.as_rotvec())).numpy(),
                               rotations.as_matrix(), atol=1e-12, rtol=0)
    quat = rotations.as_quat()[:, [3, 0, 1, 2]]  # scipy: (x, y, z, w)
    quat *= np.where(quat[:, :1] < 0, -1.0, 1.0)
    np.testing.assert_allclose(matrix_to_quaternion(matrices).numpy(), quat, atol=1e-12, rtol=0)


@pytest.mark.parametrize("angle", [0.0, 1e-12, 1e-7, 9.99e-5, 1e-4, 1.001e-4, 0.5, np.pi - 1e-4, np.pi - 1e-8, np.pi])
def test_small_angles_and_angles_near_pi(angle):
    axes = np.random.default_rng(1).normal(size=(200, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    rotvec = axes * angle
    reference = Rotation.from_rotvec(rotvec)
    matrices = axis_angle_to_matrix(torch.from_numpy(rotvec)).numpy()
    np.testing.assert_allclose(matrices, reference.as_matrix(), atol=1e-13, rtol=0)
    back = matrix_to_axis_angle(torch.from_numpy(reference.as_matrix())).numpy()
    assert rotation_distance(Rotation.from_rotvec(back).as_matrix(), reference.as_matrix()).max() < 1e-12
    assert np.linalg.norm(back, axis=1).max() <= np.pi + 1e-12
    if angle < np.pi - 1e-6:  # below pi the axis-angle is unique
        np.testing.assert_allclose(back, rotvec, atol=1e-12, rtol=0)


def test_six_d_is_the_first_two_rows_and_gram_schmidt_orthonormalises_any_input():
    rotations = Rotation.random(300, random_state=2).as_matrix()
    d6 = matrix_to_rotation_6d(torch.from_numpy(rotations)).numpy()
    np.testing.assert_array_equal(d6, rotations[:, :2, :].reshape(-1, 6))  # rows, not columns
    assert np.abs(d6 - np.swapaxes(rotations, 1, 2)[:, :2, :].reshape(-1, 6)).max() > 0.5
    np.testing.assert_allclose(rotation_6d_to_matrix(torch.from_numpy(d6)).numpy(), rotations, atol=1e-14, rtol=0)
    # what a network outputs: neither unit nor orthogonal rows
    noisy = d6 * np.random.default_rng(3).uniform(0.5, 2.0, (300, 1)) + np.random.default_rng(4).normal(0, 0.2, (300, 6))
    matrices = rotation_6d_to_matrix(torch.from_numpy(noisy)).numpy()
    np.testing.assert_allclose(matrices, gram_schmidt_reference(noisy), atol=1e-12, rtol=0)
    np.testing.assert_allclose(np.linalg.det(matrices), 1.0, atol=1e-12)
    np.testing.assert_allclose(matrices @ np.swapaxes(matrices, 1, 2), np.broadcast_to(np.eye(3), matrices.shape), atol=1e-12)


def test_dp_round_trip_over_two_turns():
    # DP's own check of RotationTransformer: rotvecs in [-2 pi, 2 pi] -> 6D -> back is the same rotation
    rotvec = np.random.default_rng(5).uniform(-2 * np.pi, 2 * np.pi, size=(1000, 3))
    back = rotation_6d_to_axis_angle(axis_angle_to_rotation_6d(torch.from_numpy(rotvec))).numpy()
    assert rotation_distance(Rotation.from_rotvec(back).as_matrix(), Rotation.from_rotvec(rotvec).as_matrix()).max() < 1e-12


def test_batch_shapes_dtypes_and_bad_shapes():
    d6 = torch.randn(2, 4, 5, 6, dtype=torch.float32)
    assert rotation_6d_to_matrix(d6).shape == (2, 4, 5, 3, 3)
    assert rotation_6d_to_axis_angle(d6).shape == (2, 4, 5, 3) and rotation_6d_to_axis_angle(d6).dtype == torch.float32
    assert axis_angle_to_rotation_6d(torch.randn(3)).shape == (6,)
    single = rotation_6d_to_axis_angle(d6[1, 2, 3].double())
    torch.testing.assert_close(rotation_6d_to_axis_angle(d6.double())[1, 2, 3], single)
    for fn, bad in ((rotation_6d_to_matrix, torch.zeros(2, 5)), (matrix_to_axis_angle, torch.zeros(3, 4)),
                    (axis_angle_to_matrix, torch.zeros(4))):
        with pytest.raises(ValueError, match="must have shape"):
            fn(bad)


# ---------------------------------------------------------------------------------------- the adapter
def test_absolute_rot6d_becomes_position_axis_angle_gripper():
    rng = np.random.default_rng(6)
    actions = rng.normal(size=(3, 16, 10)).astype(np.float32)  # [B, H, 10], rot6d anything
    command = to_env_action(actions, "absolute_rot6d")
    assert command.shape == (3, 16, 7) and command.dtype == np.float32
    np.testing.assert_array_equal(command[..., :3], actions[..., :3])
    np.testing.assert_array_equal(command[..., 6], actions[..., 9])
    reference = Rotation.from_matrix(gram_schmidt_reference(actions[..., 3:9].reshape(-1, 6).astype(np.float64)))
    np.testing.assert_allclose(command[..., 3:6].reshape(-1, 3), reference.as_rotvec(), atol=2e-6, rtol=0)
    # torch in, torch out, same values
    torch_command = to_env_action(torch.from_numpy(actions), "absolute_rot6d")
    assert isinstance(torch_command, torch.Tensor) and torch_command.dtype == torch.float32
    np.testing.assert_array_equal(torch_command.numpy(), command)


def test_two_arms_convert_arm_by_arm_and_commands_round_trip():
    rng = np.random.default_rng(7)
    two = rng.normal(size=(5, 20))
    command = to_env_action(two, "absolute_rot6d")
    assert command.shape == (5, 14) and env_action_dim("absolute_rot6d", 20) == 14
    np.testing.assert_array_equal(command[:, :7], to_env_action(two[:, :10], "absolute_rot6d"))
    np.testing.assert_array_equal(command[:, 7:], to_env_action(two[:, 10:], "absolute_rot6d"))
    # a robosuite command -> the policy's terms -> the same command (what the runner's hold does)
    commands = np.concatenate([rng.normal(size=(50, 3)), Rotation.random(50, random_state=8).as_rotvec(),
                               rng.uniform(-1, 1, (50, 1))], axis=1)
    policy_terms = from_env_action(commands, "absolute_rot6d")
    assert policy_terms.shape == (50, 10)
    np.testing.assert_allclose(to_env_action(policy_terms, "absolute_rot6d"), commands, atol=1e-12, rtol=0)


def test_delta_passes_through_and_bad_spaces_are_refused_by_name():
    actions = np.ones((2, 7), np.float32)
    assert to_env_action(actions, "delta") is actions and env_action_dim("delta", 7) == 7
    with pytest.raises(ValueError, match="action_space must be one of delta, absolute_rot6d"):
        check_action_space("absolute_quat", 10)
    with pytest.raises(ValueError, match="10 values per arm"):
        to_env_action(np.zeros((2, 7)), "absolute_rot6d")
    with pytest.raises(ValueError, match="10 values per arm"):
        DiffusionPolicyConfig(obs_dim=23, action_dim=7, action_space="absolute_rot6d")
    old = DiffusionPolicyConfig(obs_dim=23).to_dict()
    del old["action_space"]  # a config.json written before the field existed
    assert DiffusionPolicyConfig.from_dict(old).action_space == "delta"


def abs_policy(target10: np.ndarray | None = None, seed: int = 0, **overrides):
    """A tiny absolute-action policy (lift's 19-dim observation). With ``target10``, every weight is zero and
    the U-Net predicts the clean sample (0): every plan is the action normaliser's centre, put at the target."""
    from parapolicy.policy.diffusion_policy import DiffusionPolicy

    torch.manual_seed(seed)
    kwargs = dict(obs_dim=19, action_dim=10, action_space="absolute_rot6d", down_dims=[16, 32],
                  diffusion_step_embed_dim=16, num_train_timesteps=20, sampler="ddim", num_inference_steps=4)
    kwargs.update(overrides)
    policy = DiffusionPolicy(DiffusionPolicyConfig(**kwargs))
    if target10 is not None:
        with torch.no_grad():
            for p in policy.model.parameters():
                p.zero_()
        centre = torch.as_tensor(target10, dtype=torch.float32)
        half = torch.tensor([0.2] * 3 + [1.0] * 6 + [1.0])
        policy.normalizer.action.set_stats(centre - half, centre + half)
    return policy.eval()


def test_act_returns_the_env_command_of_the_planned_action():
    policy = abs_policy(prediction_type="epsilon")
    policy.normalizer.action.set_stats(torch.tensor([-0.2, -0.3, 0.8] + [-1.0] * 7), torch.tensor([0.2, 0.3, 1.2] + [1.0] * 7))
    obs = np.random.default_rng(9).normal(size=19).astype(np.float32)
    torch.manual_seed(11)
    action = policy.act(obs)
    torch.manual_seed(11)
    plan = policy.predict_action(torch.from_numpy(np.stack([obs, obs]))[None])["action"][0]  # [n_action_steps, 10]
    assert action.shape == (7,)
    np.testing.assert_allclose(action, to_env_action(plan[0].numpy(), "absolute_rot6d"), atol=1e-6, rtol=0)
    assert np.abs(plan[0, 3:9].numpy()).max() > 0.05  # a real rotation part, not zeros


# ------------------------------------------------------------------------------ robosuite closed loop
_ENVS = {}


def env_for(task):
    from parapolicy.envs import make_env

    if task not in _ENVS:
        _ENVS[task] = make_env(task, max_episode_steps=80)
    return _ENVS[task]


def site_pose(env) -> tuple[np.ndarray, np.ndarray]:
    """The grip site's observed position and rotation matrix (robosuite's own quaternion convention)."""
    raw = env.raw_obs
    return np.asarray(raw["robot0_eef_pos"]), Rotation.from_quat(raw["robot0_eef_quat_site"]).as_matrix()


def test_absolute_env_drives_the_arm_to_a_commanded_rot6d_pose():
    env = env_for("lift_abs")
    assert env.control == "absolute" and env.spec_task.scene == "lift"
    _, info = env.reset(seed=0)
    position, rotation = site_pose(env)
    np.testing.assert_allclose(info["hold_action"][:3], position, atol=1e-6)
    target_position = position + np.array([0.04, -0.03, 0.05])  # z > 1 m: a pose, not a clipped command
    assert target_position[2] > 1.0
    target_rotation = Rotation.from_rotvec([0.1, -0.1, 0.3]).as_matrix() @ rotation
    d6 = target_rotation[:2].reshape(6) * np.array([1.7] * 3 + [0.6] * 3)  # rows, rescaled: GS must fix it
    d6[3:] += 0.3 * d6[:3]
    action10 = np.concatenate([target_position, d6, [-1.0]]).astype(np.float32)
    command = to_env_action(action10, "absolute_rot6d")
    np.testing.assert_allclose(Rotation.from_rotvec(command[3:6]).as_matrix(), target_rotation, atol=1e-6)
    for _ in range(60):  # the tilt takes the OSC ~2 s to settle (5 mm off after 30 steps)
        env.step(command)
    position, rotation = site_pose(env)
    assert np.linalg.norm(position - target_position) < 2e-3, position - target_position
    assert rotation_distance(rotation[None], target_rotation[None])[0] < 5e-3


def test_hold_action_keeps_the_arm_still():
    env = env_for("lift_abs")
    _, info = env.reset(seed=1)
    start, _ = site_pose(env)
    for _ in range(15):
        _, _, _, _, info = env.step(info["hold_action"])
    position, _ = site_pose(env)
    assert np.abs(position - start).max() < 1e-5
    assert info["hold_action"][6] == -1.0  # the gripper as last commanded


def test_scripted_delta_expert_through_absolute_commands_is_the_delta_episode():
    """The Lift expert's delta commands, sent as the absolute poses they mean, give the delta env's episode:
    robosuite's absolute world-frame mode and our reading of its delta mode agree."""
    from parapolicy.envs.experts import make_expert, rollout

    delta_env, abs_env = env_for("lift"), env_for("lift_abs")
    delta_expert, abs_expert = make_expert("lift", delta_env), make_expert("lift_abs", abs_env)
    delta_env.reset(seed=3), abs_env.reset(seed=3)
    delta_expert.reset(), abs_expert.reset()
    gap, ends = 0.0, []
    for step in range(80):
        delta_out = delta_env.step(delta_expert.act())
        abs_out = abs_env.step(abs_env.delta_to_absolute(abs_expert.act()))
        gap = max(gap, np.abs(delta_env.raw_obs["robot0_eef_pos"] - abs_env.raw_obs["robot0_eef_pos"]).max())
        if delta_out[2] or abs_out[2]:
            ends = [(delta_out[2], abs_out[2]), step]
            break
    assert ends and ends[0] == (True, True), ends  # both lifted the cube, at the same step
    assert gap < 1e-5, gap
    with pytest.raises(ValueError, match="take.*absolute poses.*delta task"):
        rollout(abs_env, abs_expert, seed=0)


def test_absolute_tasks_and_control_option():
    from parapolicy.envs import GYM_IDS, TASKS, make_env

    for name in ("square", "lift", "can", "square_image", "lift_image"):
        spec = TASKS[f"{name}_abs"]
        assert spec.control == "absolute" and spec.obs_keys == TASKS[name].obs_keys and spec.cameras == TASKS[name].cameras
    assert GYM_IDS["square_image_abs"] == "parapolicy/SquareImageAbs-v0"
    with pytest.raises(ValueError, match="control must be one of delta, absolute"):
        make_env("lift", control="joint")


# --------------------------------------------------------------------------------------- the runner
def test_runner_drives_an_absolute_policy_and_holds_the_current_pose():
    import gymnasium as gym

    from parapolicy.envs import make_env
    from parapolicy.evaluation.driver import check_policy_fits_task
    from parapolicy.realtime.runner import PolicyRunner

    probe = make_env("lift_abs")
    _, info = probe.reset(seed=4)
    target = info["hold_action"].astype(np.float64).copy()
    target[:3] += [0.03, 0.02, 0.04]
    target10 = from_env_action(target, "absolute_rot6d")
    policy = abs_policy(target10, prediction_type="sample")
    envs = gym.vector.SyncVectorEnv([lambda: make_env("lift_abs", max_episode_steps=40)],
                                    autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    try:
        runner = PolicyRunner(envs, policy, timing="hold", latency=120)  # d = 3 steps held per new chunk
        sent = []
        step = envs.step
        envs.step = lambda actions: (sent.append(np.array(actions)), step(actions))[1]
        (record,) = runner.run_batch([4])
        final = envs.envs[0].raw_obs["robot0_eef_pos"]
    finally:
        envs.close()
    assert record["length"] == 40 and record["error"] is None
    assert record["hold_steps"] > 0
    sent = np.concatenate(sent)
    assert sent.shape == (40, 7)  # the env got robosuite commands, not the policy's 10 numbers
    planned = sent[np.abs(sent[:, :3] - target[:3]).max(axis=1) < 1e-4]
    assert len(planned) >= 20  # the chunk steps command the target
    np.testing.assert_allclose(planned[:, 3:6], np.broadcast_to(target[3:6], planned[:, 3:6].shape), atol=1e-4)
    holds = sent[np.abs(sent[:, :3] - target[:3]).max(axis=1) >= 1e-4]
    assert len(holds) == record["hold_steps"]  # holds command where the arm was, not the origin
    assert np.abs(holds[:, :3] - target[:3]).max() < 0.06
    assert np.linalg.norm(final - target[:3]) < 5e-3

    config = policy.config
    with pytest.raises(ValueError, match="plans absolute poses.*use env=lift_abs"):
        check_policy_fits_task(config, "lift", "ckpt")
    check_policy_fits_task(config, "lift_abs", "ckpt")
    delta_envs = gym.vector.SyncVectorEnv([lambda: make_env("lift", max_episode_steps=3)],
                                          autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    try:
        with pytest.raises(ValueError, match="policy plans absolute poses.*_abs task"):
            PolicyRunner(delta_envs, policy).run_batch([0])
    finally:
        delta_envs.close()


# ---------------------------------------------------------------------------------------- the converter
def dp_abs_action_normaliser(actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DP's ``robomimic_abs_action_only_normalizer_from_stat``: position to [-1, 1] from the data's min / max,
    the 6D rotation and the gripper as they are (scale 1, offset 0)."""
    lo, hi = actions[:, :3].min(0).values, actions[:, :3].max(0).values
    pos_scale = 2.0 / (hi - lo)
    scale = torch.cat([pos_scale, torch.ones(7)])
    offset = torch.cat([-1.0 - pos_scale * lo, torch.zeros(7)])
    return scale, offset


def write_abs_checkpoint(path, task_name="square", action_dim=10, **task_extra):
    from omegaconf import OmegaConf

    from dp_format import dp_config, dp_limits, dp_state_dict, write_dp_checkpoint
    from parapolicy.policy.diffusion_policy import DiffusionPolicy

    torch.manual_seed(0)
    policy = DiffusionPolicy(DiffusionPolicyConfig(obs_dim=23, action_dim=action_dim, down_dims=[16, 32, 64],
                                                   diffusion_step_embed_dim=16))
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    obs_scale, obs_offset = dp_limits(torch.randn(23, generator=g) - 1, torch.randn(23, generator=g) + 1)
    poses = torch.cat([torch.randn(200, 3, generator=g) * 0.1 + torch.tensor([0.0, 0.0, 1.0]),
                       axis_angle_to_rotation_6d(torch.randn(200, 3, generator=g)).float(),
                       torch.randn(200, 1, generator=g).sign()], dim=1)
    scale, offset = dp_abs_action_normaliser(poses)
    if action_dim == 20:
        scale, offset = scale.repeat(2), offset.repeat(2)
    sd = dp_state_dict(policy, obs_scale, obs_offset, scale, offset)
    cfg = dp_config(action_dim=action_dim, down_dims=[16, 32, 64], diffusion_step_embed_dim=16, num_inference_steps=10,
                    task_name=task_name)
    OmegaConf.set_struct(cfg, False)
    cfg.task.abs_action = True
    cfg.task.update(task_extra)
    return write_dp_checkpoint(path, cfg, sd, sd), policy, sd


def test_dp_abs_action_lowdim_checkpoint_converts_with_its_normaliser(tmp_path):
    from dp_format import dp_predict_action, draws_in_dp_order
    from parapolicy.convert import convert
    from parapolicy.policy import load_policy

    source, original, sd = write_abs_checkpoint(tmp_path / "dp.ckpt")
    converted = load_policy(convert(source, tmp_path / "out"), sampler="ddpm")
    assert converted.config.action_space == "absolute_rot6d" and converted.config.action_dim == 10
    assert converted.config.env == "square_abs"
    # DP's affine action normaliser, rotation and gripper as the identity, reproduced exactly
    x = torch.randn(64, 10, dtype=torch.float32)
    scale, offset = sd["normalizer.params_dict.action.scale"], sd["normalizer.params_dict.action.offset"]
    torch.testing.assert_close(converted.normalizer.action.normalize(x), x * scale + offset, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(converted.normalizer.action.normalize(x)[:, 3:], x[:, 3:], atol=1e-6, rtol=0)
    # DP's sampling loop with the file's normaliser on the same U-Net weights: same plan, then DP's
    # undo_transform_action (computed here with scipy) is our env command
    obs = torch.randn(2, 2, 23, generator=torch.Generator().manual_seed(2)) * 0.3
    with torch.no_grad():
        reference = dp_predict_action(original.model, sd, converted.scheduler_config, obs, horizon=16, n_obs_steps=2,
                                      n_action_steps=8, num_inference_steps=10, oa_step_convention=True,
                                      generator=torch.Generator().manual_seed(5))
    x_T, noise = draws_in_dp_order(torch.Generator().manual_seed(5), 2, 16, 10, converted.sampler.timesteps)
    ours = converted.predict_action(obs, x_T=x_T, noise=noise)["action"]
    assert (ours - reference["action"]).abs().max() < 2e-5
    command = converted.env_action(ours.numpy()).reshape(-1, 7)
    reference_rot = Rotation.from_matrix(gram_schmidt_reference(reference["action"].numpy()[..., 3:9].reshape(-1, 6)))
    assert rotation_distance(Rotation.from_rotvec(command[:, 3:6]).as_matrix(), reference_rot.as_matrix()).max() < 1e-4
    np.testing.assert_allclose(command[:, :3], reference["action"].numpy()[..., :3].reshape(-1, 3), atol=2e-5)


@pytest.mark.parametrize("task_name,action_dim,extra,message", [
    ("transport", 20, {}, "two-arm absolute actions"),
    ("kitchen", 10, {"env_runner": {"_target_": "diffusion_policy.env_runner.kitchen_lowdim_runner.KitchenLowdimRunner"}},
     "not robosuite end-effector poses"),
    ("square", 10, {"dataset": {"rotation_rep": "quaternion"}}, "rotation_rep='quaternion'"),
])
def test_abs_action_variants_it_cannot_run_are_refused_by_name(tmp_path, task_name, action_dim, extra, message):
    from parapolicy.convert import convert
    from parapolicy.importers.diffusion_policy import UnsupportedCheckpointError

    source, _, _ = write_abs_checkpoint(tmp_path / "dp.ckpt", task_name=task_name, action_dim=action_dim, **extra)
    with pytest.raises(UnsupportedCheckpointError, match=message):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- served and real-time loops
def test_served_absolute_policy_acts_like_the_local_one():
    from parapolicy.serving.client import RemotePolicy
    from parapolicy.serving.server import PolicyServer, ServerThread

    policy = abs_policy(prediction_type="epsilon")
    policy.normalizer.action.set_stats(torch.tensor([-0.2, -0.3, 0.8] + [-1.0] * 7), torch.tensor([0.2, 0.3, 1.2] + [1.0] * 7))
    obs = np.random.default_rng(12).normal(size=(10, 19)).astype(np.float32)
    policy.reset()
    torch.manual_seed(13)
    local = np.stack([policy.act(o) for o in obs])
    with ServerThread(PolicyServer(policy, "127.0.0.1", 0)) as server, RemotePolicy(server.url) as remote:
        assert remote.metadata["action_space"] == "absolute_rot6d" and remote.metadata["action_dim"] == 10
        remote.reset(seed=13)  # the server draws this robot's noise as torch.manual_seed(13) does locally
        served = np.stack([remote.act(o) for o in obs])
    assert served.shape == (10, 7)
    np.testing.assert_array_equal(served, local)


def test_async_policy_returns_env_commands_of_an_absolute_policy():
    from parapolicy.realtime import AsyncPolicy

    target = np.array([0.05, -0.02, 1.02, 2.2, 2.1, 0.1, 1.0])
    target10 = from_env_action(target, "absolute_rot6d")
    obs = np.zeros(19, np.float32)  # a flat observation: the arm's pose for a hold comes with hold= (here: at the target)
    with AsyncPolicy(abs_policy(target10, prediction_type="sample"), control_hz=20) as loop:
        actions = np.stack([loop.act(obs, hold=target.astype(np.float32)) for _ in range(20)])
    assert actions.shape == (20, 7)
    np.testing.assert_allclose(actions[:, :6], np.broadcast_to(target[:6], (20, 6)), atol=1e-4)


@pytest.mark.slow  # a ~45 MB DP hybrid workspace file (ResNet-18 weights) written, read and converted
def test_dp_abs_action_hybrid_image_checkpoint_converts_for_the_abs_image_task(tmp_path):
    from omegaconf import OmegaConf

    from dp_format import write_dp_checkpoint
    from parapolicy.convert import convert
    from parapolicy.policy import load_policy
    from parapolicy.policy.unet import ConditionalUnet1D
    from test_dp_image_import import CAMERAS, DOWN, STEP_DIM, hybrid_config, hybrid_state_dict

    full = hybrid_state_dict()  # DPCHECK's DP-layout weights (7-dim U-Net): its encoder and normalisers kept
    cond_dim = full["model.mid_modules.0.cond_encoder.1.weight"].shape[1]  # step embedding + global conditioning
    sd = {k: v for k, v in full.items() if not k.startswith(("model.", "normalizer.params_dict.action."))}
    torch.manual_seed(1)
    unet = ConditionalUnet1D(input_dim=10, global_cond_dim=cond_dim - STEP_DIM, diffusion_step_embed_dim=STEP_DIM,
                             down_dims=DOWN, kernel_size=5, n_groups=8)
    sd.update({f"model.{k}": v.detach().clone() for k, v in unet.state_dict().items()})
    poses = torch.cat([torch.randn(100, 3) * 0.1, axis_angle_to_rotation_6d(torch.randn(100, 3)).float(),
                       torch.ones(100, 1)], dim=1)
    scale, offset = dp_abs_action_normaliser(poses)
    sd["normalizer.params_dict.action.scale"], sd["normalizer.params_dict.action.offset"] = scale, offset
    cfg = hybrid_config(abs_action=True)
    OmegaConf.set_struct(cfg, False)
    cfg.task.shape_meta.action.shape = [10]
    policy = load_policy(convert(write_dp_checkpoint(tmp_path / "dp.ckpt", cfg, sd, sd), tmp_path / "out"))
    config = policy.config
    assert (config.action_space, config.action_dim, config.env) == ("absolute_rot6d", 10, "lift_image_abs")
    assert config.image_keys == CAMERAS
    x = torch.randn(8, 10)
    torch.testing.assert_close(policy.normalizer.action.normalize(x), x * scale + offset, atol=1e-5, rtol=1e-5)
    frames = {key: np.random.default_rng(0).integers(0, 256, (84, 84, 3), dtype=np.uint8) for key in CAMERAS}
    obs = {**frames, "robot0_eef_pos": np.zeros(3), "robot0_eef_quat": np.array([0, 0, 0, 1.0]),
           "robot0_gripper_qpos": np.zeros(2)}
    assert policy.act(obs).shape == (7,)


def test_convert_cli_says_the_action_space(tmp_path, capsys):
    from parapolicy.convert import main

    source, _, _ = write_abs_checkpoint(tmp_path / "dp.ckpt")
    assert main([str(source), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "action_dim 10 (absolute_rot6d: run it on a *_abs env)" in out and out.rstrip().endswith("env square_abs")
