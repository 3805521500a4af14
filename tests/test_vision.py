"""Vision encoders (parapolicy.policy.vision) and image-conditioned policies."""

import numpy as np
import pytest
import torch

from parapolicy.policy.configuration import DiffusionPolicyConfig
from parapolicy.policy.dataset import Demo, SequenceDataset
from parapolicy.policy.diffusion_policy import DiffusionPolicy
from parapolicy.policy.vision import (ConvTrunk, CropRandomizer, ImageObsEncoder, MultiImageObsEncoder, ResNet18Conv,
                                      SpatialSoftmax, VisualCore, count_parameters, resnet18)

CAMERAS = ["agentview_image", "robot0_eye_in_hand_image"]


def test_resnet18_parameter_counts_and_torchvision_names():
    # torchvision's resnet18(): 11,689,512 parameters; without its 1000-class fc: 11,176,512
    assert count_parameters(resnet18()) == 11_689_512
    assert count_parameters(resnet18(num_classes=None)) == 11_176_512
    gn = resnet18(num_classes=None, norm="group")
    assert count_parameters(gn) == 11_176_512  # GroupNorm has BatchNorm's affine parameters, no running stats
    keys = set(resnet18().state_dict())
    for key in ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.bias", "layer4.1.bn2.weight", "fc.weight", "fc.bias"]:
        assert key in keys, key
    assert isinstance(gn.layer3[0].bn1, torch.nn.GroupNorm) and gn.layer3[0].bn1.num_groups == 256 // 16
    assert resnet18()(torch.zeros(2, 3, 64, 64)).shape == (2, 1000)
    assert gn(torch.zeros(2, 3, 76, 76)).shape == (2, 512)


def test_resnet18_conv_has_robomimic_layout():
    trunk = ResNet18Conv(norm="group")
    keys = set(trunk.state_dict())
    assert {"nets.0.weight", "nets.1.weight", "nets.4.0.conv1.weight", "nets.7.1.bn2.bias"} <= keys
    assert trunk(torch.zeros(1, 3, 76, 76)).shape == (1, 512, 3, 3) and trunk.output_shape([3, 76, 76]) == [512, 3, 3]


def test_spatial_softmax_finds_a_synthetic_peak():
    height, width = 7, 9
    pool = SpatialSoftmax([2, height, width], num_kp=None)
    maps = torch.full((1, 2, height, width), -50.0)
    maps[0, 0, 2, 6] = 50.0  # row 2, column 6
    maps[0, 1, 5, 1] = 50.0
    keypoints = pool(maps)  # [1, 2, 2]: (x, y) per map, in [-1, 1]
    xs, ys = torch.linspace(-1, 1, width), torch.linspace(-1, 1, height)
    torch.testing.assert_close(keypoints[0, 0], torch.stack([xs[6], ys[2]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(keypoints[0, 1], torch.stack([xs[1], ys[5]]), atol=1e-5, rtol=0)
    # a flat map's expectation is the centre; a high temperature flattens the peak towards it
    assert pool(torch.zeros(1, 2, height, width)).abs().max() < 1e-6
    hot = SpatialSoftmax([2, height, width], num_kp=None, temperature=1e4)(maps)
    assert hot.abs().max() < 0.05
    with_kp = SpatialSoftmax([64, 10, 10], num_kp=32)
    assert with_kp(torch.randn(3, 64, 10, 10)).shape == (3, 32, 2)
    assert "nets.weight" in with_kp.state_dict() and "pos_x" in with_kp.state_dict()


def test_crop_is_random_in_training_and_centred_in_eval():
    images = torch.arange(4 * 3 * 84 * 84, dtype=torch.float32).reshape(4, 3, 84, 84)
    crop = CropRandomizer([3, 84, 84], 76, 76).eval()
    torch.testing.assert_close(crop(images), images[:, :, 4:80, 4:80])
    crop.train()
    crop.generator = torch.Generator().manual_seed(0)
    crops = crop(images.repeat(8, 1, 1, 1))  # 32 images
    offsets = set()
    for k in range(len(crops)):
        top = int(crops[k, 0, 0, 0] - images[k % 4, 0, 0, 0]) // 84
        left = int(crops[k, 0, 0, 0] - images[k % 4, 0, 0, 0]) % 84
        assert 0 <= top <= 8 and 0 <= left <= 8
        torch.testing.assert_close(crops[k], images[k % 4, :, top:top + 76, left:left + 76])
        offsets.add((top, left))
    assert len(offsets) > 10  # independent per image
    with pytest.raises(ValueError, match="does not fit"):
        CropRandomizer([3, 84, 84], 90, 76)
    # an odd margin: robomimic floors the top row, torchvision (so LeRobot) rounds half to even
    odd = CropRandomizer([3, 84, 84], 77, 79, centre="round").eval()  # margins 7 and 5: round 4 and 2
    torch.testing.assert_close(odd(images), images[:, :, 4:81, 2:81])
    torch.testing.assert_close(CropRandomizer([3, 84, 84], 77, 79).eval()(images), images[:, :, 3:80, 2:81])
    # a 1-row feature map: the keypoint grid is its own memory (it loads in place)
    SpatialSoftmax([8, 1, 2], num_kp=4).load_state_dict(SpatialSoftmax([8, 1, 2], num_kp=4).state_dict())


def test_visual_core_stores_each_weight_once():
    core = VisualCore([3, 38, 38], ConvTrunk(), num_kp=32, feature_dim=64)
    keys = list(core.state_dict())
    assert "nets.0.nets.0.weight" in keys and "nets.1.nets.weight" in keys and "nets.3.weight" in keys
    assert not any(k.startswith("backbone.") for k in keys)
    assert core.backbone is core.nets[0] and core(torch.zeros(5, 3, 38, 38)).shape == (5, 64)


def test_multi_image_obs_encoder_sorts_keys_and_shares_models():
    shape_meta = {"b_image": {"shape": [3, 84, 84], "type": "rgb"}, "pos": {"shape": [3], "type": "low_dim"},
                  "a_image": {"shape": [3, 84, 84], "type": "rgb"}}
    torch.manual_seed(0)
    model = resnet18(num_classes=None, norm="group")
    shared = MultiImageObsEncoder(shape_meta, model, crop_shape=[76, 76], share_rgb_model=True, imagenet_norm=True).eval()
    separate = MultiImageObsEncoder(shape_meta, model, crop_shape=[76, 76], imagenet_norm=True).eval()
    assert shared.rgb_keys == ["a_image", "b_image"] and separate.low_dim_keys == ["pos"]
    assert set(separate.key_model_map) == {"a_image", "b_image"} and set(shared.key_model_map) == {"rgb"}
    obs = {"a_image": torch.rand(2, 3, 84, 84) * 2 - 1, "b_image": torch.rand(2, 3, 84, 84) * 2 - 1,
           "pos": torch.randn(2, 3)}
    with torch.no_grad():
        out_shared, out_separate = shared(obs), separate(obs)
        alone = model((obs["b_image"][:, :, 4:80, 4:80] - shared.imagenet_mean) / shared.imagenet_std)
    assert out_shared.shape == (2, 512 * 2 + 3)
    torch.testing.assert_close(out_shared, out_separate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_shared[:, 512:1024], alone, atol=1e-5, rtol=1e-5)  # b after a
    torch.testing.assert_close(out_shared[:, -3:], obs["pos"])


def _image_policy(**overrides) -> DiffusionPolicy:
    vision = dict(backbone="conv", resize_shape=[42, 42], crop_shape=[38, 38], num_kp=8, feature_dim=16)
    config = DiffusionPolicyConfig(obs_dim=9, obs_keys=["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"],
                                   image_keys=CAMERAS, vision=vision, down_dims=[16, 32], diffusion_step_embed_dim=16,
                                   horizon=8, n_action_steps=4, num_inference_steps=10, **overrides)
    torch.manual_seed(0)
    return DiffusionPolicy(config).eval()


def _raw_obs(rng, size=84):
    obs = {"robot0_eef_pos": rng.normal(size=3), "robot0_eef_quat": rng.normal(size=4),
           "robot0_gripper_qpos": rng.normal(size=2)}
    obs.update({key: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for key in CAMERAS})
    return obs


def test_image_policy_conditions_on_its_encoder_once_per_call_across_a_parallel_sampler():
    policy = _image_policy()
    assert policy.config.global_cond_dim == 2 * (2 * 16 + 9)
    encoder_calls, unet_calls = [], []
    policy.obs_encoder.register_forward_hook(lambda *args: encoder_calls.append(1))
    policy.model.register_forward_hook(lambda *args: unet_calls.append(1))
    policy.set_sampler("paraddpm", window=4, tolerance=1e-3)
    rng = np.random.default_rng(0)
    history = torch.randn(3, 2, 9)
    images = {key: torch.randint(0, 256, (3, 2, 3, 84, 84), dtype=torch.uint8) for key in CAMERAS}
    out = policy.predict_action(history, images=images, generator=torch.Generator().manual_seed(0))
    assert len(encoder_calls) == 1 and len(unet_calls) == out["rounds"] > 1  # one encode, many Picard rounds
    assert out["action"].shape == (3, 4, 7) and out["encode_ms"] > 0 and out["sample_ms"] > 0

    # the parallel sampler plans what the sequential one plans from the same images and noise
    policy.set_sampler("ddpm")
    sequential = policy.predict_action(history, images=images, generator=torch.Generator().manual_seed(0))
    assert (sequential["action_pred"] - out["action_pred"]).abs().max() < 0.05
    # different images, different plan
    other = {key: 255 - value for key, value in images.items()}
    changed = policy.predict_action(history, images=other, generator=torch.Generator().manual_seed(0))
    assert (changed["action_pred"] - sequential["action_pred"]).abs().max() > 1e-4

    # act(): robosuite's obs dict with upright [H, W, 3] frames; replans every n_action_steps
    policy.reset()
    encoder_calls.clear()
    actions = [policy.act(_raw_obs(rng)) for _ in range(8)]
    assert len(encoder_calls) == 2 and all(a.shape == (7,) for a in actions)
    assert policy.last_info["replanned"] is False
    policy.reset()
    policy.act(_raw_obs(rng))
    assert policy.last_info["encode_ms"] > 0 and policy.last_info["sample_ms"] > 0


def test_image_policy_refuses_bad_images_by_name():
    policy = _image_policy()
    rng = np.random.default_rng(1)
    obs = _raw_obs(rng)
    del obs["robot0_eye_in_hand_image"]
    with pytest.raises(ValueError, match="robot0_eye_in_hand_image"):
        policy.act(obs)
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        policy.act(_raw_obs(rng, size=64))
    with pytest.raises(ValueError, match="pass images"):
        policy.predict_action(torch.zeros(1, 2, 9))
    with pytest.raises(ValueError, match="must have shape"):
        policy.predict_action(torch.zeros(1, 2, 9), images={k: torch.zeros(1, 1, 3, 84, 84) for k in CAMERAS})


def test_image_policy_trains_on_image_windows_and_round_trips_a_checkpoint(tmp_path):
    from parapolicy.policy.checkpoint import load_checkpoint, save_checkpoint

    rng = np.random.default_rng(0)
    demos = [Demo(f"demo_{i}", rng.normal(size=(12, 9)).astype(np.float32), rng.normal(size=(12, 7)).astype(np.float32),
                  {key: rng.integers(0, 256, (12, 3, 42, 42), dtype=np.uint8) for key in CAMERAS}) for i in range(2)]
    dataset = SequenceDataset(demos, horizon=8, n_obs_steps=2, n_action_steps=4)
    batch = dataset.sample(4, torch.Generator().manual_seed(0))
    assert batch["images"]["agentview_image"].shape == (4, 2, 3, 42, 42)
    policy = _image_policy().train()
    before = [p.detach().clone() for p in policy.obs_encoder.parameters()]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    loss = policy.compute_loss(batch)
    loss.backward()
    optimizer.step()
    assert all(p.grad is not None for p in policy.obs_encoder.parameters() if p.requires_grad)
    assert any((a - b).abs().max() > 0 for a, b in zip(before, policy.obs_encoder.parameters()))

    save_checkpoint(policy, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config.image_keys == CAMERAS and not loaded.training
    images = {key: torch.randint(0, 256, (1, 2, 3, 84, 84), dtype=torch.uint8) for key in CAMERAS}
    policy.eval()
    a = policy.predict_action(torch.zeros(1, 2, 9), images=images, generator=torch.Generator().manual_seed(3))
    b = loaded.predict_action(torch.zeros(1, 2, 9), images=images, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a["action_pred"], b["action_pred"])


def test_shipped_lift_image_policy_loads_and_plans():
    """checkpoints/lift_image: the image task's layout, small on disk, parallel = sequential on real frames."""
    from parapolicy.envs.robosuite_env import get_task
    from parapolicy.policy import load_policy
    from parapolicy.policy.checkpoint import CHECKPOINTS_DIR

    task = get_task("lift_image")
    folder = CHECKPOINTS_DIR / "lift_image"
    assert sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) <= 5 * 2**20
    ddpm = load_policy("lift_image", sampler="ddpm", num_inference_steps=10)
    cfg = ddpm.config
    assert cfg.env == "lift_image" and tuple(cfg.obs_keys) == task.obs_keys and cfg.obs_dim == task.obs_dim
    assert cfg.image_keys == [f"{camera}_image" for camera in task.cameras] and cfg.image_shape == [3, 84, 84]
    assert ddpm.training_info["iterations"] > 0 and len(ddpm.training_info["dataset_sha256"]) == 64
    g = torch.Generator().manual_seed(0)
    images = {key: torch.randint(0, 256, (2, 2, 3, 84, 84), generator=g, dtype=torch.uint8) for key in CAMERAS}
    obs = torch.zeros(2, 2, 9)
    obs[..., 3] = 1.0  # a unit quaternion
    out = ddpm.predict_action(obs, images=images, generator=torch.Generator().manual_seed(1))
    parallel = load_policy("lift_image", sampler="paraddpm", num_inference_steps=10, window=10, tolerance=1e-6)
    par = parallel.predict_action(obs, images=images, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out["action"]).all() and out["action"].abs().max() <= 1 + 1e-5
    assert torch.allclose(par["action"], out["action"], atol=1e-3), (par["action"] - out["action"]).abs().max()
