"""``--robot.type=pusht_gym``: gym-pusht's PushT-v0 as a LeRobot robot (tests only).

Observation: ``x.pos``, ``y.pos`` (the agent, pixels of the 512 x 512 table) and one camera ``top``
(``image_size`` x ``image_size`` x 3 uint8). Action: ``x.pos``, ``y.pos`` targets. An episode that ends is
reset (seed + episode number). ``action_log`` (a path) records every executed action, one JSON line each,
so a test can read what a LeRobot command executed.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import numpy as np

from lerobot.robots.config import RobotConfig
from lerobot.robots.robot import Robot


@RobotConfig.register_subclass("pusht_gym")
@dataclass
class PushtGymConfig(RobotConfig):
    seed: int = 0
    image_size: int = 96
    action_log: str | None = None


class PushtGym(Robot):
    config_class = PushtGymConfig
    name = "pusht_gym"

    def __init__(self, config: PushtGymConfig):
        super().__init__(config)
        self.config = config
        self.env = None
        self._obs = None
        self._episode = 0
        self._lock = threading.Lock()

    @property
    def observation_features(self) -> dict:
        size = self.config.image_size
        return {"x.pos": float, "y.pos": float, "top": (size, size, 3)}

    @property
    def action_features(self) -> dict:
        return {"x.pos": float, "y.pos": float}

    @property
    def is_connected(self) -> bool:
        return self.env is not None

    @property
    def is_calibrated(self) -> bool:
        return True

    def calibrate(self) -> None:
        pass

    def configure(self) -> None:
        pass

    def connect(self, calibrate: bool = True) -> None:
        import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)
        import gymnasium as gym

        size = self.config.image_size
        self.env = gym.make("gym_pusht/PushT-v0", obs_type="pixels_agent_pos", observation_width=size,
                            observation_height=size, max_episode_steps=300)
        self._obs, _ = self.env.reset(seed=self.config.seed)

    def get_observation(self) -> dict:
        with self._lock:
            obs = self._obs
        x, y = (float(v) for v in obs["agent_pos"])
        return {"x.pos": x, "y.pos": y, "top": np.ascontiguousarray(obs["pixels"])}

    def send_action(self, action: dict) -> dict:
        target = np.array([float(action["x.pos"]), float(action["y.pos"])], dtype=np.float64)
        with self._lock:
            obs, reward, terminated, truncated, _ = self.env.step(target)
            if terminated or truncated:
                self._episode += 1
                obs, _ = self.env.reset(seed=self.config.seed + self._episode)
            self._obs = obs
        if self.config.action_log:
            with open(self.config.action_log, "a") as f:
                f.write(json.dumps({"action": target.tolist(), "reward": float(reward)}) + "\n")
        return {"x.pos": float(target[0]), "y.pos": float(target[1])}

    def disconnect(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


__all__ = ["PushtGym", "PushtGymConfig"]
