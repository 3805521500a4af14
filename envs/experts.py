"""Scripted experts on privileged simulator state, used to make demonstrations.

Each expert is a small phase machine (approach, descend, grasp, lift, carry, place, release) that
servos the end effector to waypoints computed from object sites every step. Actions are the task's
OSC_POSE delta commands in [-1, 1].

Demonstrations vary through ``noise_std`` in :func:`rollout`: the *executed* action is the expert's
plus Gaussian noise on the arm dims, the *recorded* action is the expert's own (DART-style), so the
data shows recoveries from perturbed states while its labels stay precise.
"""

from __future__ import annotations

import numpy as np

from parapolicy.envs.robosuite_env import TASKS, RobosuiteEnv

# Gripper pointing down (eef x = world x, eef z = -world z); the Panda fingers close along eef x.
_DOWN = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])
_OPEN, _CLOSE = -1.0, 1.0
_POS_SCALE, _ROT_SCALE = 0.05, 0.5  # metres / radians per unit action (robosuite OSC_POSE defaults)


def _wrap(angle):
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _axis_angle(rot: np.ndarray) -> np.ndarray:
    """Rotation matrix -> axis * angle (3,)."""
    cos = np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    return axis / (2.0 * np.sin(angle)) * angle


class ScriptedExpert:
    """Base: waypoint servoing, phase bookkeeping and action noise."""

    max_speed = 0.6  # cap on the position command, for smooth, trackable demonstrations

    def __init__(self, env: RobosuiteEnv):
        self.env = env
        self.reset()

    def reset(self) -> None:
        self.phase = "start"
        self.phase_steps = 0
        self.retries = 0

    def _goto(self, phase: str) -> None:
        self.phase, self.phase_steps = phase, 0

    # --- privileged state --------------------------------------------------------------------------
    def site(self, name: str) -> np.ndarray:
        sim = self.env.sim
        return np.array(sim.data.site_xpos[sim.model.site_name2id(name)])

    def body(self, name: str) -> np.ndarray:
        sim = self.env.sim
        return np.array(sim.data.body_xpos[sim.model.body_name2id(name)])

    @property
    def eef_pos(self) -> np.ndarray:
        return np.asarray(self.env.raw_obs["robot0_eef_pos"], dtype=np.float64)

    @property
    def eef_mat(self) -> np.ndarray:
        robot = self.env.robosuite_env.robots[0]
        return np.array(self.env.sim.data.site_xmat[robot.eef_site_id["right"]]).reshape(3, 3)

    @property
    def eef_yaw(self) -> float:
        mat = self.eef_mat
        return float(np.arctan2(mat[1, 0], mat[0, 0]))

    # --- control ----------------------------------------------------------------------------------
    def servo(self, target_pos, target_yaw: float, gripper: float, speed: float | None = None) -> np.ndarray:
        """OSC delta command that moves the eef toward ``target_pos`` with the gripper down at ``target_yaw``."""
        speed = self.max_speed if speed is None else speed
        dpos = (np.asarray(target_pos) - self.eef_pos) / _POS_SCALE
        norm = np.linalg.norm(dpos)
        if norm > speed:
            dpos *= speed / norm
        rot_err = _axis_angle(_rot_z(target_yaw) @ _DOWN @ self.eef_mat.T)
        drot = np.clip(rot_err / _ROT_SCALE, -0.5, 0.5)
        return np.concatenate([dpos, drot, [gripper]])

    def near(self, target_pos, tol: float = 0.01) -> bool:
        return bool(np.linalg.norm(np.asarray(target_pos) - self.eef_pos) < tol)

    def act(self) -> np.ndarray:
        """The expert's action for the current state, float32 ``[7]`` in [-1, 1]."""
        action = self.policy()
        self.phase_steps += 1
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def policy(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


def _grasp_yaw(direction_yaw: float, current_yaw: float, symmetry: float = np.pi) -> float:
    """The gripper yaw equivalent to ``direction_yaw`` (mod ``symmetry``) closest to ``current_yaw``."""
    return current_yaw + _wrap_mod(direction_yaw - current_yaw, symmetry)


def _wrap_mod(angle: float, period: float) -> float:
    return (angle + period / 2) % period - period / 2


_HANDLE_YAWS = (np.pi / 2, np.pi, -np.pi / 2)


class SquareExpert(ScriptedExpert):
    """NutAssemblySquare: grasp the nut's handle, carry its centre over the square peg, lower, release.

    The nut is carried with its yaw snapped to a multiple of 90 deg so that it slides over the square
    peg. If the nut jams on the peg top (it stops sinking while still high), lift, re-centre and retry.
    """

    lift_z = 1.02  # nut carried above the peg top (peg top at 0.95)
    hover_z = 0.975  # nut centre height for the final alignment before lowering
    max_retries = 3

    def reset(self) -> None:
        super().reset()
        self.grasp_yaw = 0.0
        self.aligned_steps = 0
        self.lower_z_history: list[float] = []

    @staticmethod
    def _xy_boost(target, center, peg, gain: float = 1.0):
        """Overshoot the xy target by ``gain`` x the nut's xy error: the OSC controller sags a few mm
        under the nut's load, and a few mm is the peg's clearance."""
        target = np.array(target)
        target[:2] += gain * (peg[:2] - center[:2])
        return target

    def handle_yaw(self) -> float:
        d = self.site("SquareNut_handle_site") - self.site("SquareNut_center_site")
        return float(np.arctan2(d[1], d[0]))

    def carry_target(self, center_z: float) -> tuple[np.ndarray, float]:
        """eef pose that puts the nut centre over the peg at height ``center_z``, nut yaw snapped."""
        peg = self.body("peg1")
        center = self.site("SquareNut_center_site")
        handle_yaw = self.handle_yaw()
        # Snap to a multiple of 90 deg, but never with the handle pointing away from the robot (+x):
        # holding the handle beyond the peg would need the arm at full stretch.
        snapped = min(_HANDLE_YAWS, key=lambda yaw: abs(_wrap(yaw - handle_yaw)))
        target_yaw = self.eef_yaw + _wrap(snapped - handle_yaw)
        offset = self.eef_pos - center  # rigid while grasped
        target = np.array([peg[0], peg[1], center_z]) + offset
        return target, target_yaw

    def policy(self) -> np.ndarray:
        handle = self.site("SquareNut_handle_site")
        center = self.site("SquareNut_center_site")
        table_z = self.env.robosuite_env.table_offset[2]
        if self.phase == "start":
            # Wait a few steps for the nut to settle on the table before reading its pose.
            if self.phase_steps >= 5:
                # fingers (along eef x) close across the handle, i.e. perpendicular to it
                self.grasp_yaw = _grasp_yaw(self.handle_yaw() + np.pi / 2, self.eef_yaw)
                self._goto("approach")
            return self.servo(self.eef_pos, self.eef_yaw, _OPEN)
        if self.phase == "approach":
            target = handle + [0, 0, 0.08]
            if self.near(target, 0.015) and abs(_wrap(self.eef_yaw - self.grasp_yaw)) < 0.05:
                self._goto("descend")
            return self.servo(target, self.grasp_yaw, _OPEN)
        if self.phase == "descend":
            target = handle + [0, 0, 0.0]
            if self.near(target, 0.008) or self.phase_steps > 40:
                self._goto("grasp")
            return self.servo(target, self.grasp_yaw, _OPEN, speed=0.4)
        if self.phase == "grasp":
            if self.phase_steps >= 12:
                self._goto("lift")
            return self.servo(handle, self.grasp_yaw, _CLOSE)
        if self.phase == "lift":
            target = np.array([self.eef_pos[0], self.eef_pos[1], self.lift_z + (self.eef_pos[2] - center[2])])
            if center[2] > self.lift_z - 0.02:
                self._goto("carry")
            return self.servo(target, self.eef_yaw, _CLOSE)
        if self.phase == "carry":
            # Carry high, then hover just above the peg top until the nut is centred to a few mm.
            peg = self.body("peg1")
            dxy = np.linalg.norm(center[:2] - peg[:2])
            hover_z = self.hover_z if dxy < 0.02 else self.lift_z
            target, yaw = self.carry_target(hover_z)
            aligned = dxy < 0.0025 and abs(_wrap(yaw - self.eef_yaw)) < 0.02 and abs(center[2] - hover_z) < 0.01
            self.aligned_steps = self.aligned_steps + 1 if aligned else 0
            if self.aligned_steps >= 3 or (self.phase_steps > 80 and dxy < 0.006):
                self.lower_z_history = []
                self._goto("lower")
            return self.servo(self._xy_boost(target, center, peg), yaw, _CLOSE)
        if self.phase == "lower":
            peg = self.body("peg1")
            target, yaw = self.carry_target(table_z + 0.01)
            self.lower_z_history.append(center[2])
            jammed = (len(self.lower_z_history) > 12 and self.lower_z_history[-12] - center[2] < 0.003
                      and center[2] > table_z + 0.045)
            if jammed and self.retries < self.max_retries:
                self.retries += 1
                self.aligned_steps = 0
                self._goto("carry")  # back up to the hover height, re-centre, lower again
            elif center[2] < table_z + 0.035 or self.phase_steps > 80:
                self._goto("release")
            return self.servo(self._xy_boost(target, center, peg), yaw, _CLOSE, speed=0.35)
        if self.phase == "release":
            if self.phase_steps >= 8:
                self._goto("retreat")
            return self.servo(self.eef_pos, self.eef_yaw, _OPEN)
        # retreat: move straight up, gripper open, until the episode ends on success
        return self.servo(self.eef_pos + [0, 0, 0.1], self.eef_yaw, _OPEN)


class LiftExpert(ScriptedExpert):
    """Lift: grasp the cube (yaw aligned mod 90 deg) and raise it."""

    def reset(self) -> None:
        super().reset()
        self.grasp_yaw = 0.0

    def cube_yaw(self) -> float:
        quat = np.asarray(self.env.raw_obs["cube_quat"])  # xyzw
        x, y, z, w = quat
        return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))

    def policy(self) -> np.ndarray:
        cube = np.asarray(self.env.raw_obs["cube_pos"], dtype=np.float64)
        if self.phase == "start":
            if self.phase_steps >= 3:
                self.grasp_yaw = _grasp_yaw(self.cube_yaw(), self.eef_yaw, np.pi / 2)
                self._goto("approach")
            return self.servo(self.eef_pos, self.eef_yaw, _OPEN)
        if self.phase == "approach":
            target = cube + [0, 0, 0.06]
            if self.near(target, 0.015) and abs(_wrap(self.eef_yaw - self.grasp_yaw)) < 0.06:
                self._goto("descend")
            return self.servo(target, self.grasp_yaw, _OPEN)
        if self.phase == "descend":
            target = cube + [0, 0, -0.005]
            if self.near(target, 0.008) or self.phase_steps > 40:
                self._goto("grasp")
            return self.servo(target, self.grasp_yaw, _OPEN, speed=0.4)
        if self.phase == "grasp":
            if self.phase_steps >= 10:
                self._goto("lift")
            return self.servo(self.eef_pos, self.grasp_yaw, _CLOSE)
        return self.servo(np.array([self.eef_pos[0], self.eef_pos[1], 1.05]), self.eef_yaw, _CLOSE)


class CanExpert(ScriptedExpert):
    """PickPlaceCan: grasp the can from above, carry it over its target bin, lower and release."""

    carry_z = 1.0

    def target_xy(self) -> np.ndarray:
        """A reachable point inside the can's target quadrant of bin 2 (robosuite's success region):
        the quadrant's centre in x, 5 cm in from its edge nearest the robot's base in y (the
        quadrant's centre is at the edge of the Panda's reach at carry height)."""
        env = self.env.robosuite_env
        centre = np.array(env.target_bin_placements[env.object_to_id["can"]][:2])
        half_y = env.bin_size[1] / 4.0
        return np.array([centre[0], centre[1] - np.sign(centre[1]) * (half_y - 0.05)])

    def policy(self) -> np.ndarray:
        can = np.asarray(self.env.raw_obs["Can_pos"], dtype=np.float64)
        yaw = 0.0
        if self.phase == "start":
            if self.phase_steps >= 5:
                self._goto("approach")
            return self.servo(self.eef_pos, yaw, _OPEN)
        if self.phase == "approach":
            target = can + [0, 0, 0.08]
            if self.near(target, 0.015):
                self._goto("descend")
            return self.servo(target, yaw, _OPEN)
        if self.phase == "descend":
            target = can + [0, 0, 0.0]
            if self.near(target, 0.008) or self.phase_steps > 40:
                self._goto("grasp")
            return self.servo(target, yaw, _OPEN, speed=0.4)
        if self.phase == "grasp":
            if self.phase_steps >= 10:
                self._goto("lift")
            return self.servo(self.eef_pos, yaw, _CLOSE)
        if self.phase == "lift":
            target = np.array([self.eef_pos[0], self.eef_pos[1], self.carry_z])
            if self.eef_pos[2] > self.carry_z - 0.03:
                self._goto("carry")
            return self.servo(target, yaw, _CLOSE)
        if self.phase == "carry":
            offset = self.eef_pos[:2] - can[:2]
            target = np.concatenate([self.target_xy() + offset, [self.carry_z]])
            if self.near(target, 0.015):
                self._goto("lower")
            return self.servo(target, yaw, _CLOSE)
        if self.phase == "lower":
            offset = self.eef_pos[:2] - can[:2]
            bin_z = self.env.robosuite_env.bin2_pos[2]
            target = np.concatenate([self.target_xy() + offset, [bin_z + 0.12]])
            if self.near(target, 0.015) or self.phase_steps > 60:
                self._goto("release")
            return self.servo(target, yaw, _CLOSE, speed=0.4)
        if self.phase == "release":
            if self.phase_steps >= 8:
                self._goto("retreat")
            return self.servo(self.eef_pos, yaw, _OPEN)
        return self.servo(self.eef_pos + [0, 0, 0.1], yaw, _OPEN)


EXPERTS = {"square": SquareExpert, "lift": LiftExpert, "can": CanExpert}


def make_expert(task: str, env: RobosuiteEnv, **kwargs) -> ScriptedExpert:
    scene = TASKS[task].scene if task in TASKS else None  # an image task shares its scene's expert
    try:
        return EXPERTS[scene or task](env, **kwargs)
    except KeyError:
        raise ValueError(f"no scripted expert for env {task!r}; known: {', '.join(sorted(EXPERTS))}") from None


def rollout(env: RobosuiteEnv, expert: ScriptedExpert, seed: int, noise_std: float = 0.0,
            record: bool = False) -> dict:
    """Run one expert episode from ``env.reset(seed=seed)``.

    ``noise_std`` perturbs the executed arm command (noise drawn from a generator seeded by ``seed``,
    so an episode is reproducible); the recorded action is the expert's. Returns success, length and,
    with ``record``, the per-step raw observations, actions, states, rewards and dones.
    """
    if getattr(env, "control", "delta") != "delta":  # the expert's deltas would be read as poses
        raise ValueError(f"the scripted experts command OSC_POSE deltas; env {env.spec_task.name!r} takes absolute "
                         f"poses: collect with its delta task (drive it with env.delta_to_absolute(expert.act()))")
    obs, info = env.reset(seed=seed)
    expert.reset()
    noise_rng = np.random.default_rng([seed, 7])
    steps = {"raw_obs": [], "actions": [], "states": [], "rewards": [], "dones": []}
    success, error = False, None
    for _ in range(env.max_episode_steps):
        action = expert.act()
        if record:
            steps["raw_obs"].append({k: np.array(v) for k, v in env.raw_obs.items()})
            steps["states"].append(env.get_state())
        executed = action.copy()
        if noise_std > 0:
            executed[:6] = np.clip(executed[:6] + noise_rng.normal(0.0, noise_std, 6), -1.0, 1.0)
        obs, reward, terminated, truncated, info = env.step(executed)
        if record:
            steps["actions"].append(action)
            steps["rewards"].append(reward)
            steps["dones"].append(int(terminated))
        success = info["is_success"]
        error = info.get("error")
        if terminated or truncated:
            break
    return {"success": bool(success), "length": env.elapsed_steps,
            "error": error, "phase": expert.phase, "retries": expert.retries, **(steps if record else {})}
