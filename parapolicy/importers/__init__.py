"""Importers for policies trained elsewhere (``python -m parapolicy.convert``).

- ``safe_pickle``: read torch / dill checkpoints without running pickled code.
- ``diffusion_policy``: real-stanford/diffusion_policy low-dim U-Net workspace checkpoints (``.ckpt``);
  ``dp_image`` its image policies, ``dp_transformer`` its transformer (DP-T) policies.
- ``lerobot``: LeRobot state-only diffusion checkpoint folders (``save_pretrained``).
"""

from parapolicy.importers.diffusion_policy import UnsupportedCheckpointError, convert_dp_checkpoint, read_dp_checkpoint
from parapolicy.importers.lerobot import convert_lerobot_checkpoint
from parapolicy.importers.safe_pickle import UnsafePickleError, safe_torch_load

__all__ = [
    "UnsafePickleError",
    "UnsupportedCheckpointError",
    "convert_dp_checkpoint",
    "convert_lerobot_checkpoint",
    "read_dp_checkpoint",
    "safe_torch_load",
]
