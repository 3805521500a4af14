"""``python -m parapolicy.bench``: the Hydra entry point (config ``conf/bench.yaml``); the work is in
``parapolicy.bench.run.run_bench``."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from parapolicy.bench.run import run_bench


@hydra.main(version_base=None, config_path="pkg://parapolicy.conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(cfg.out) if cfg.out else Path(HydraConfig.get().runtime.output_dir)
    run_bench(cfg, out_dir)


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()
