"""Load test of the policy server (``parapolicy.bench.serving``): N concurrent simulated robots on loopback.

    python -m parapolicy.serve_bench                                          # ddpm, paraddpm x 1/2/4/8 robots x on/off
    python -m parapolicy.serve_bench 'samplers=[paraddpm]' 'robots=[1,8]' requests_per_robot=30

Only the Hydra entry point (config ``conf/serve_bench.yaml``); the work is ``parapolicy.bench.serving.run_bench``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig


@hydra.main(version_base=None, config_path="pkg://parapolicy.conf", config_name="serve_bench")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from parapolicy.bench.serving import run_bench

    run_bench(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
