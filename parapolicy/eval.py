"""Closed-loop evaluation: task success and per-call latency, parallel sampler vs sequential baseline.

    python -m parapolicy.eval env=square                          # paraddpm vs ddpm, shipped checkpoint
    python -m parapolicy.eval sampler=paraddim baseline=ddim n_episodes=50
    python -m parapolicy.eval -m sampler=paraddpm,paraddim sampler.tolerance=0.01,0.1

Both runs use the same episode seeds (``seed``, ``seed + 1``, ...) and the same per-call noise.
Writes ``episodes.jsonl`` (a line per finished episode; ``resume=true`` continues an interrupted run),
``summary.json``, ``latency.png`` into Hydra's run directory and prints a table. The eval itself is
``parapolicy.evaluation.run_eval``; this module is only its Hydra entry point.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig


@hydra.main(version_base=None, config_path="pkg://parapolicy.conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from parapolicy.evaluation import run_eval

    run_eval(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
