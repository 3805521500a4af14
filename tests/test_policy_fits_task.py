"""The eval refuses a checkpoint whose observations the task cannot give, before any simulator starts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from parapolicy.evaluation.driver import check_policy_fits_task


def test_low_dim_policy_on_its_task_passes_and_on_another_fails():
    check_policy_fits_task(SimpleNamespace(obs_dim=23, image_keys=[]), "square", "ckpt")
    with pytest.raises(ValueError, match="expects obs_dim=23, env 'lift' gives 19"):
        check_policy_fits_task(SimpleNamespace(obs_dim=23, image_keys=[]), "lift", "ckpt")


def test_image_policy_needs_a_task_with_its_cameras():
    image = SimpleNamespace(obs_dim=9, image_keys=["agentview_image", "robot0_eye_in_hand_image"])
    check_policy_fits_task(image, "lift_image", "ckpt")  # proprioception (9) + both cameras
    with pytest.raises(ValueError, match="expects obs_dim=9, env 'lift' gives 19"):
        check_policy_fits_task(image, "lift", "ckpt")
    with pytest.raises(ValueError, match=r"reads the images \['sideview_image'\]"):
        check_policy_fits_task(SimpleNamespace(obs_dim=9, image_keys=["sideview_image"]), "lift_image", "ckpt")
