"""Robosuite manipulation tasks as gymnasium environments with Diffusion Policy's observations.

The environment side of parapolicy: it knows nothing of diffusion. ``obs_mode`` picks what a step returns:

- ``lowdim``: the flat concatenation of robosuite observables in Diffusion Policy's order
  (``TaskSpec.obs_keys``), float32 ``[obs_dim]``;
- ``image``: a dict of camera frames ``{"<camera>_image": uint8 [3, H, W]}``, right side up;
- ``hybrid``: the camera frames plus the robot's proprioception (``PROPRIO_KEYS``, float32), the inputs of
  Diffusion Policy's robomimic image tasks.

``control`` picks what an action means, at 20 Hz, 7 dims either way:

- ``delta`` (default): robosuite's OSC_POSE delta command in [-1, 1] (dx, dy, dz in 5 cm units,
  axis-angle in 0.5 rad units, gripper -1 open / +1 close);
- ``absolute`` (the ``*_abs`` tasks): the target end-effector pose in the world frame, position (m) and
  axis-angle (rad), then the gripper: the OSC_POSE controller with ``input_type="absolute"`` and
  ``input_ref_frame="world"``, which is what Diffusion Policy's ``abs_action`` policies were trained for
  (robosuite 1.4's ``control_delta=False``). ``info["hold_action"]`` is the command that keeps the arm
  where it is.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace

import gymnasium as gym
import numpy as np


@dataclass(frozen=True)
class TaskSpec:
    name: str
    robosuite_env: str
    obs_keys: tuple[str, ...]
    obs_dims: tuple[int, ...]
    max_episode_steps: int = 400
    obs_mode: str = "lowdim"      # what make_env(name) observes; image tasks see cameras (+ obs_keys if hybrid)
    cameras: tuple[str, ...] = ()
    scene: str | None = None      # the low-dim task whose robosuite scene and scripted expert it shares
    control: str = "delta"        # what make_env(name) takes as actions: OSC_POSE "delta" or "absolute" poses

    @property
    def obs_dim(self) -> int:
        return sum(self.obs_dims)


_LOW_DIM = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
# What the robot knows of itself: the low-dim part of Diffusion Policy's hybrid image observations.
PROPRIO_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
PROPRIO_DIMS = (3, 4, 2)
OBS_MODES = ("lowdim", "image", "hybrid")
DEFAULT_CAMERAS = ("agentview", "robot0_eye_in_hand")  # robomimic's and Diffusion Policy's image tasks
CONTROLS = ("delta", "absolute")

TASKS: dict[str, TaskSpec] = {
    "square": TaskSpec("square", "NutAssemblySquare", _LOW_DIM, (14, 3, 4, 2)),
    "lift": TaskSpec("lift", "Lift", _LOW_DIM, (10, 3, 4, 2)),
    "can": TaskSpec("can", "PickPlaceCan", _LOW_DIM, (14, 3, 4, 2)),
    # Diffusion Policy's image tasks: two cameras and the proprioception, no object state
    "lift_image": TaskSpec("lift_image", "Lift", PROPRIO_KEYS, PROPRIO_DIMS, obs_mode="hybrid",
                           cameras=DEFAULT_CAMERAS, scene="lift"),
    "square_image": TaskSpec("square_image", "NutAssemblySquare", PROPRIO_KEYS, PROPRIO_DIMS, obs_mode="hybrid",
                             cameras=DEFAULT_CAMERAS, scene="square"),
}
# The same tasks driven by absolute end-effector poses (Diffusion Policy's abs_action policies): <task>_abs.
TASKS.update({f"{name}_abs": replace(spec, name=f"{name}_abs", scene=spec.scene or name, control="absolute")
              for name, spec in list(TASKS.items())})


def get_task(name: str) -> TaskSpec:
    """Look a task up by name, with an error that lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown env {name!r}; known envs: {', '.join(sorted(TASKS))}") from None


def flatten_obs(raw: dict, obs_keys) -> np.ndarray:
    """Concatenate robosuite observables in ``obs_keys`` order -> float32 ``[obs_dim]``.

    robosuite names the object vector ``object-state``; robomimic datasets and Diffusion Policy call it
    ``object``. Both spellings are accepted.
    """
    parts = []
    for key in obs_keys:
        value = raw.get(key)
        if value is None and key == "object":
            value = raw.get("object-state")
        if value is None:
            raise KeyError(f"observation has no key {key!r}")
        parts.append(np.asarray(value, dtype=np.float32).reshape(-1))
    return np.concatenate(parts)


# Start-up lines robosuite logs in every process that imports it, none about our tasks: no private macro
# file (3 lines), optional robot models / whole-body IK not installed, the controller config it loads.
_STARTUP_NOISE = ("private macro file", "setup_macros.py", "robosuite_models", "mink-based whole-body IK",
                  "Loading controller configuration")


class _DropStartupNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING or not any(text in record.getMessage() for text in _STARTUP_NOISE)


def quiet_robosuite_logging() -> None:
    """Print each robosuite log line once, without its start-up chatter. Call before importing robosuite.

    robosuite logs through its own console handler (stderr) and also propagates to the root logger,
    which Hydra gives a stdout handler: every line came twice, once in the eval table's stream. Its
    logger stops propagating (its own handler still prints real warnings once, on stderr), and a filter
    drops the start-up lines above (they do not depend on the task or the run).
    """
    logger = logging.getLogger("robosuite_logs")  # robosuite's DefaultLogger name; it adds handlers later
    logger.propagate = False
    if not any(isinstance(f, _DropStartupNoise) for f in logger.filters):
        logger.addFilter(_DropStartupNoise())


def image_key(camera: str) -> str:
    """robosuite's (and robomimic's) observation name of a camera's RGB frame."""
    return f"{camera}_image"


def robosuite_kwargs(spec: TaskSpec, seed: int | None, cameras=(), camera_size: tuple[int, int] = (84, 84),
                     control: str = "delta") -> dict:
    """The ``suite.make`` arguments of our tasks (also stored as ``env_args`` in datasets).

    ``cameras``: robosuite renders each as an observation ``<camera>_image`` (uint8 ``[H, W, 3]``, rows
    bottom-up) at every control step; none means no renderer at all (~15x faster steps here).
    ``control="absolute"`` adds ``controller_configs``: the Panda's default composite controller with its
    arm's OSC_POSE taking absolute poses in the world frame (delta keeps robosuite's default, no key).
    """
    kwargs = dict(
        env_name=spec.robosuite_env,
        robots="Panda",
        has_renderer=False,
        has_offscreen_renderer=False,
        use_camera_obs=False,
        use_object_obs=True,
        control_freq=20,
        horizon=spec.max_episode_steps,
        ignore_done=True,  # the wrapper owns episode ends
        hard_reset=False,  # ~3 ms resets instead of ~250 ms
        reward_shaping=False,
        seed=seed,
    )
    if cameras:
        height, width = camera_size
        kwargs.update(has_offscreen_renderer=True, use_camera_obs=True, camera_names=list(cameras),
                      camera_heights=int(height), camera_widths=int(width), camera_depths=False)
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {', '.join(CONTROLS)}, got {control!r}")
    if control == "absolute":
        kwargs["controller_configs"] = absolute_controller_config(kwargs["robots"])
    return kwargs


def absolute_controller_config(robot: str = "Panda") -> dict:
    """robosuite 1.5's composite controller config for ``robot`` with every arm's OSC_POSE part set to
    absolute world-frame poses (``input_type="absolute"``, ``input_ref_frame="world"``; robosuite 1.4 had
    one flag, ``control_delta=False``, and world-frame goals). Gains and limits stay the defaults."""
    from robosuite.controllers import load_composite_controller_config

    config = load_composite_controller_config(robot=robot)
    arms = [part for part in config["body_parts"].values() if part.get("type") == "OSC_POSE"]
    if not arms:
        raise ValueError(f"{robot}'s default controller has no OSC_POSE arm: {sorted(config['body_parts'])}")
    for part in arms:
        part.update(input_type="absolute", input_ref_frame="world")
    return config


class RobosuiteEnv(gym.Env):
    """One robosuite task as a gymnasium environment.

    ``reset(seed=s)`` gives the same initial state for the same ``s``, in any instance or process:
    robosuite 1.5 samples object placement and joint noise from its own ``env.rng`` (``np.random.seed``
    does nothing), so the wrapper reseeds that generator in place. Episodes end on success (``terminated``) or after
    ``max_episode_steps`` (``truncated``); ``info["is_success"]`` reports the task's success check. A
    simulator error or a non-finite observation ends the episode with ``info["error"]`` instead of
    raising, so one unstable episode cannot take down a vector of environments.

    ``render_mode="rgb_array"``: ``render()`` returns the view of ``camera`` (a robosuite camera name:
    agentview, frontview, birdview, sideview, robot0_eye_in_hand, ...) as uint8 ``[H, W, 3]``, upright,
    ``render_size`` = H = W or (H, W). Rendering is offscreen (robosuite's own renderer; pick the OpenGL
    backend with ``MUJOCO_GL`` before robosuite is imported) and changes nothing in the simulation.

    Camera observations (``obs_mode`` image or hybrid; the task's default, e.g. ``lift_image``): robosuite
    renders ``cameras`` (default agentview and robot0_eye_in_hand) at ``camera_size`` (84) after every
    step, offscreen (EGL, then OSMesa, as the videos), ~10x the cost of a step without them. Frames are
    deterministic given the reset seed and the actions. ``raw_obs`` holds them upright ``[H, W, 3]``
    (robomimic's layout); the gym observation channel-first ``[3, H, W]``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, task: str = "square", max_episode_steps: int | None = None, model_seed: int = 0,
                 render_mode: str | None = None, camera: str = "agentview", render_size: int | tuple = 256,
                 obs_mode: str | None = None, cameras=None, camera_size: int | tuple = 84, control: str | None = None):
        self.spec_task = get_task(task)
        self.control = control or self.spec_task.control
        if self.control not in CONTROLS:
            raise ValueError(f"control must be one of {', '.join(CONTROLS)}, got {self.control!r}")
        obs_mode = obs_mode or self.spec_task.obs_mode
        if obs_mode not in OBS_MODES:
            raise ValueError(f"obs_mode must be one of {', '.join(OBS_MODES)}, got {obs_mode!r}")
        self.obs_mode = obs_mode
        cameras = cameras if cameras is not None else (self.spec_task.cameras or DEFAULT_CAMERAS)
        self.cameras = tuple(str(c) for c in cameras) if obs_mode != "lowdim" else ()
        if obs_mode != "lowdim" and not self.cameras:
            raise ValueError(f"obs_mode={obs_mode!r} needs at least one camera")
        self.camera_size = (int(camera_size), int(camera_size)) if isinstance(camera_size, int) else tuple(map(int, camera_size))
        quiet_robosuite_logging()  # before robosuite's import-time warnings
        if self.cameras or render_mode == "rgb_array":
            _choose_gl_backend()  # MuJoCo reads MUJOCO_GL once, when robosuite imports it
        import robosuite as suite  # heavy import (numba JIT on first make), kept out of module import

        self.max_episode_steps = int(max_episode_steps or self.spec_task.max_episode_steps)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode, self.camera = render_mode, str(camera)
        self.render_size = (int(render_size), int(render_size)) if isinstance(render_size, int) else tuple(render_size)
        # model_seed fixes construction-time randomness (Lift's cube size is drawn from env.rng in
        # suite.make), so that every instance builds the same model and reset(seed) alone decides.
        kwargs = robosuite_kwargs(self.spec_task, model_seed, self.cameras, self.camera_size, self.control)
        self._make_kwargs = kwargs
        make_kwargs = {k: v for k, v in kwargs.items() if k != "env_name"}
        if render_mode == "rgb_array":  # video frames come from render(), at their own size
            make_kwargs.update(has_offscreen_renderer=True)
        try:
            self.robosuite_env = suite.make(**make_kwargs, env_name=kwargs["env_name"])
        except ValueError as err:  # robosuite checks camera names while it builds the observables
            if not self.cameras:
                raise
            raise ValueError(f"cameras {list(self.cameras)} in {task}: {err} (robosuite's log line names the "
                             "cameras there are)") from err
        known = self.sim.model.camera_names
        for name in (*self.cameras, *([self.camera] if render_mode == "rgb_array" else [])):
            if name not in known:
                raise ValueError(f"camera {name!r} is not in {task}; cameras: {', '.join(known)}")
        self.observation_space = self._observation_space()
        if self.control == "absolute":  # position (m) and axis-angle (rad) unbounded, the gripper in [-1, 1]
            bound = np.array([np.inf] * 6 + [1.0], dtype=np.float32)
            self.action_space = gym.spaces.Box(-bound, bound, dtype=np.float32)
        else:
            self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(7,), dtype=np.float32)
        self._raw_obs: dict | None = None
        self._steps = 0
        self._gripper = -1.0  # the last gripper command; robosuite's gripper starts open

    # --- gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            # Reseed robosuite's generator in place: the placement samplers hold a reference to it.
            fresh = np.random.default_rng(seed)
            self.robosuite_env.rng.bit_generator.state = fresh.bit_generator.state
        self._make_render_context_current()
        self._raw_obs = self._upright(self.robosuite_env.reset())
        self._steps = 0
        self._gripper = -1.0
        return self._obs(), self._info(False)

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(7)
        if self.control == "absolute":  # a pose is not a normalised command: only the gripper is clipped
            action = np.concatenate([action[:6], np.clip(action[6:], -1.0, 1.0)])
        else:
            action = np.clip(action, -1.0, 1.0)
        self._gripper = float(action[6])
        self._steps += 1
        truncated = self._steps >= self.max_episode_steps
        try:
            self._make_render_context_current()
            raw_obs, reward, _, _ = self.robosuite_env.step(action)
            self._raw_obs = self._upright(raw_obs)
            obs = self._obs()
            if not all(np.all(np.isfinite(v)) for v in (obs.values() if isinstance(obs, dict) else [obs])):
                raise FloatingPointError("non-finite observation (simulation unstable)")
        except Exception as err:  # MuJoCo instability etc.: end this episode, keep the process alive
            obs = self._zero_obs()
            return obs, 0.0, True, truncated, {"is_success": False, "error": f"{type(err).__name__}: {err}"}
        success = bool(self.robosuite_env._check_success())
        return obs, float(reward), success, truncated, self._info(success)

    def render(self):
        """The current view of ``camera``, uint8 ``[H, W, 3]`` (``render_mode="rgb_array"``), else None."""
        if self.render_mode != "rgb_array":
            return None
        height, width = self.render_size
        self._make_render_context_current()
        frame = self.sim.render(width=width, height=height, camera_name=self.camera)
        return np.ascontiguousarray(frame[::-1])  # OpenGL's rows run bottom-up

    # --- extras for experts, datasets and policies ----------------------------------------------
    @property
    def hold_action(self) -> np.ndarray:
        """The command that keeps the arm where it is now, gripper as last commanded, float32 ``[7]``: a zero
        delta, or (``control="absolute"``) the observed pose of the controller's frame (the grip site:
        ``robot0_eef_pos``, ``robot0_eef_quat_site``) as position and axis-angle, about the goal a zero delta
        sets (that one is read one physics substep later, see ``_arm_pose``; refreshing the pose here, after
        the step, would itself change the next step by ~1e-5 m)."""
        if self.control == "delta":
            return np.array([0.0] * 6 + [self._gripper], dtype=np.float32)
        from parapolicy.observation import pose_hold_command  # the hold AsyncPolicy computes from the obs too

        return pose_hold_command(self._raw_obs, self._gripper)

    def delta_to_absolute(self, delta_action) -> np.ndarray:
        """The absolute command ``[7]`` that moves the arm now as the OSC_POSE delta command ``delta_action``
        ``[7]`` would (robosuite's delta mode: the goal is the current pose moved by the scaled delta, in the
        robot base's axes): how a scripted delta expert drives an absolute env. Gripper passed through."""
        from robosuite.utils.transform_utils import axisangle2quat, quat2mat

        delta = np.asarray(delta_action, dtype=np.float64).reshape(7)
        arm = self._arm()
        scaled = arm.scale_action(np.clip(delta[:6], -1.0, 1.0))  # m and rad, with the controller's own limits
        base = np.asarray(arm.origin_ori, dtype=np.float64)  # base -> world rotation
        position, rotation = self._arm_pose()
        turn = base @ quat2mat(axisangle2quat(scaled[3:6])) @ base.T  # the delta rotation, in world axes
        return np.concatenate([position + base @ scaled[:3], _axis_angle(turn @ rotation),
                               [np.clip(delta[6], -1.0, 1.0)]]).astype(np.float32)

    def _arm(self):
        return self.robosuite_env.robots[0].part_controllers["right"]

    def _arm_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """(position [3], rotation [3, 3]) of the controller's frame in the world as the next step's set_goal
        sees it (refreshed by sim.forward(), as set_goal refreshes it). The observation's eef pose predates
        the last physics substep's integration (~0.2 mm behind at 10 cm/s). Call it right before a step."""
        arm = self._arm()
        arm.update(force=True)
        return np.array(arm.ref_pos, dtype=np.float64), np.array(arm.ref_ori_mat, dtype=np.float64)

    def _info(self, success: bool) -> dict:
        info = {"is_success": success}
        if self.control == "absolute":  # a vector env's runner reads it to hold an arm still
            info["hold_action"] = self.hold_action
        return info

    @property
    def raw_obs(self) -> dict:
        """The last robosuite observation dict (what ``policy.act`` also accepts)."""
        return self._raw_obs

    @property
    def elapsed_steps(self) -> int:
        return self._steps

    @property
    def control_period_s(self) -> float:
        """Seconds of robot time per ``step`` (1 / control_freq): what real-time execution counts in."""
        return 1.0 / float(self._make_kwargs["control_freq"])

    @property
    def sim(self):
        return self.robosuite_env.sim

    def get_state(self) -> np.ndarray:
        """Flattened MuJoCo state, robomimic's ``states`` entry."""
        return np.asarray(self.sim.get_state().flatten())

    def env_args(self) -> str:
        """JSON for robomimic's ``data.attrs["env_args"]``."""
        kwargs = {k: v for k, v in self._make_kwargs.items() if k not in ("env_name", "seed")}
        return json.dumps({"env_name": self._make_kwargs["env_name"], "type": 1, "env_kwargs": kwargs,
                           "parapolicy_task": self.spec_task.name})

    def _obs(self):
        if self.obs_mode == "lowdim":
            return flatten_obs(self._raw_obs, self.spec_task.obs_keys)
        obs = {key: np.ascontiguousarray(self._raw_obs[key].transpose(2, 0, 1)) for key in self.image_keys}
        if self.obs_mode == "hybrid":
            obs.update({key: np.asarray(self._raw_obs[key], dtype=np.float32) for key in PROPRIO_KEYS})
        return obs

    @property
    def image_keys(self) -> tuple[str, ...]:
        return tuple(image_key(camera) for camera in self.cameras)

    def _observation_space(self) -> gym.Space:
        if self.obs_mode == "lowdim":
            return gym.spaces.Box(-np.inf, np.inf, shape=(self.spec_task.obs_dim,), dtype=np.float32)
        spaces = {key: gym.spaces.Box(0, 255, shape=(3, *self.camera_size), dtype=np.uint8) for key in self.image_keys}
        if self.obs_mode == "hybrid":
            spaces.update({key: gym.spaces.Box(-np.inf, np.inf, shape=(dim,), dtype=np.float32)
                           for key, dim in zip(PROPRIO_KEYS, PROPRIO_DIMS)})
        return gym.spaces.Dict(spaces)

    def _zero_obs(self):
        if isinstance(self.observation_space, gym.spaces.Dict):
            return {key: np.zeros(space.shape, space.dtype) for key, space in self.observation_space.items()}
        return np.zeros(self.observation_space.shape, np.float32)

    def _upright(self, raw_obs: dict) -> dict:
        """robosuite's camera frames come bottom row first (OpenGL): flip them, once, in the raw dict, so
        ``raw_obs`` images are upright ``[H, W, 3]`` like the gym observations (``[3, H, W]``)."""
        for key in self.image_keys:
            raw_obs[key] = np.ascontiguousarray(raw_obs[key][::-1])
        return raw_obs

    def _make_render_context_current(self) -> None:
        # robosuite renders into whichever GL context is current: make it this env's (several envs, or a
        # video renderer, may live in one process). The context exists once something has rendered.
        context = getattr(self.sim, "_render_context_offscreen", None)
        if context is not None:
            context.gl_ctx.make_current()


def _axis_angle(rotation: np.ndarray) -> np.ndarray:
    """A rotation matrix ``[3, 3]`` -> axis-angle ``[3]`` with the angle in [0, pi] (robosuite's helpers)."""
    from robosuite.utils.transform_utils import mat2quat, quat2axisangle

    quat = mat2quat(rotation)  # (x, y, z, w)
    quat *= np.sign(quat[3]) or 1.0
    return quat2axisangle(quat)


def _choose_gl_backend() -> None:
    """Pick the offscreen OpenGL backend the videos use (EGL, then OSMesa) unless robosuite is imported."""
    import sys

    if "robosuite" in sys.modules or os.environ.get("MUJOCO_GL"):
        return
    from parapolicy.envs.opengl import select_gl_backend  # probes each backend in a subprocess

    select_gl_backend()


def make_env(task: str = "square", **kwargs) -> RobosuiteEnv:
    return RobosuiteEnv(task=task, **kwargs)


GYM_IDS = {name: f"parapolicy/{name.title().replace('_', '')}-v0" for name in TASKS}


def register_envs() -> None:
    """Register ``parapolicy/Square-v0``, ``parapolicy/Lift-v0``, ``parapolicy/Can-v0``, the image
    tasks ``parapolicy/LiftImage-v0``, ``parapolicy/SquareImage-v0``, and each with absolute control
    (``parapolicy/SquareAbs-v0``, ..., ``parapolicy/SquareImageAbs-v0``)."""
    for name, env_id in GYM_IDS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point="parapolicy.envs.robosuite_env:RobosuiteEnv",
                         kwargs={"task": name}, disable_env_checker=True)
