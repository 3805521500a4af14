"""LeRobot plugin: every ``diffusion`` policy a LeRobot command loads samples with parapolicy.

LeRobot's ``register_third_party_plugins()`` imports this module in ``lerobot-eval``, ``lerobot-rollout``,
``lerobot-record``, ``lerobot-train`` and the async ``robot_client``; ``python -m
lerobot_policy_parapolicy.policy_server`` imports it itself. On import it calls
``parapolicy.integrations.lerobot.install`` on LeRobot's ``DiffusionPolicy`` / ``DiffusionModel`` classes, so
policies built through any bound ``get_policy_class`` are reached, and logs one line saying what was swapped.

Knobs (environment variables): ``PARAPOLICY_SAMPLER`` = paraddpm (default) | paraddim | srds | parataa | ddpm |
ddim | off, ``PARAPOLICY_WINDOW``, ``PARAPOLICY_TOLERANCE``, ``PARAPOLICY_MAX_ROUNDS``. A bad value stops the
command (a typo must not run the stock sampler unnoticed). Under ``lerobot-train`` nothing is swapped, and a
model in training mode always runs LeRobot's own loop.
"""

from __future__ import annotations

import logging
import os
import sys

__version__ = "0.1.0"
logger = logging.getLogger("lerobot_policy_parapolicy")
INSTALLED: str | None = None  # the log line, once swapped


def _say(message: str, level: int = logging.INFO) -> None:
    if logger.isEnabledFor(level) and (logging.getLogger().handlers or logger.handlers):
        logger.log(level, message)
    else:  # logging not set up yet (lerobot-rollout loads plugins first) or filtered: still one line on stderr
        print(f"[lerobot_policy_parapolicy] {message}", file=sys.stderr)


def _training() -> bool:
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    return "lerobot.scripts.lerobot_train" in sys.modules or script in ("lerobot-train", "lerobot_train.py")


def activate() -> str | None:
    """Install the swap from the environment's knobs (idempotent); returns the log line or None."""
    global INSTALLED
    if INSTALLED is not None:
        return INSTALLED
    if _training():
        _say("lerobot-train: nothing swapped (training keeps LeRobot's sampler)")
        return None
    try:
        from parapolicy.integrations.lerobot import install, settings_from_env
    except ImportError as err:
        _say(f"parapolicy is not importable here ({err}); install it beside lerobot: "
             "pip install --no-deps -e <parapolicy checkout>. Nothing swapped.", logging.ERROR)
        return None
    try:
        sampler, options = settings_from_env()
    except ValueError as err:
        raise SystemExit(f"lerobot_policy_parapolicy: {err}") from None
    if sampler is None:
        _say("PARAPOLICY_SAMPLER=off: nothing swapped")
        return None
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionModel, DiffusionPolicy

    try:
        INSTALLED = install(DiffusionPolicy, sampler, model_class=DiffusionModel, **options)
    except ValueError as err:
        raise SystemExit(f"lerobot_policy_parapolicy: {err}") from None
    _say(INSTALLED)
    return INSTALLED


activate()
