"""Convert a trained Diffusion Policy into a parapolicy checkpoint folder (model.safetensors + config.json).

    python -m parapolicy.convert path/to/epoch=0100.ckpt --out checkpoints/dp_square [--weights ema|model]
    python -m parapolicy.eval checkpoint=checkpoints/dp_square env=square

SOURCE is a real-stanford/diffusion_policy workspace checkpoint (``.ckpt``) of the low-dim U-Net policy,
of the image policies (``parapolicy.importers.dp_image``) or of the low-dim transformer policy
(``parapolicy.importers.dp_transformer``), or a LeRobot state-only diffusion
checkpoint folder (``save_pretrained``: config.json, model.safetensors, normaliser statistics; see
``parapolicy.importers.lerobot``). A ``.ckpt`` is read without running any
code it contains (a restricted unpickler: tensors, plain containers and inert OmegaConf config objects
only); a file that asks for anything else is refused and nothing is written. See
``parapolicy.importers.diffusion_policy`` for what is supported and refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def convert(source: str | Path, out: str | Path, weights: str | None = None, overwrite: bool = False) -> Path:
    """Convert ``source`` into the checkpoint folder ``out``; returns ``out``."""
    source = Path(source)
    if source.is_dir():
        from parapolicy.importers.lerobot import convert_lerobot_checkpoint, is_lerobot_folder

        if not is_lerobot_folder(source):
            raise ValueError(f"{source} is a folder but not a LeRobot diffusion checkpoint (config.json with "
                             f"type 'diffusion' + model.safetensors); a Diffusion Policy checkpoint is a .ckpt file")
        return convert_lerobot_checkpoint(source, out, overwrite=overwrite)
    from parapolicy.importers.diffusion_policy import convert_dp_checkpoint
    from parapolicy.importers.dp_image import convert_dp_image_checkpoint
    from parapolicy.importers.dp_transformer import convert_dp_transformer_checkpoint

    return convert_dp_checkpoint(source, out, weights=weights, overwrite=overwrite,
                                 convert_image=convert_dp_image_checkpoint,
                                 convert_transformer=convert_dp_transformer_checkpoint)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parapolicy.convert", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="Diffusion Policy workspace checkpoint (.ckpt) or LeRobot diffusion folder")
    parser.add_argument("--out", required=True, help="output checkpoint folder (created; must be empty)")
    parser.add_argument("--weights", choices=("ema", "model"), default=None,
                        help="which weights to export (default: ema if the run trained with EMA, else model)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    args = parser.parse_args(argv)
    try:
        out = convert(args.source, args.out, weights=args.weights, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    config = json.loads((out / "config.json").read_text())
    policy, origin = config["policy"], config["training"]["converted_from"]
    weights = origin.get("weights", "the")
    space = policy.get("action_space", "delta")
    space = f" ({space}: run it on a *_abs env)" if space != "delta" else ""
    print(f"wrote {out}: {weights} weights of {origin['source']} (sha256 {origin['sha256'][:12]}...), "
          f"obs_dim {policy['obs_dim']}, action_dim {policy['action_dim']}{space}, horizon {policy['horizon']}, "
          f"{_network(config)}, {config['num_parameters']:,} parameters, sampler "
          f"{policy['sampler']}-{policy['num_inference_steps']}, env {policy['env']}")
    return 0


def _network(config: dict) -> str:
    network = config["policy"].get("network") or {}
    if network.get("class", "ConditionalUnet1D") == "ConditionalUnet1D":
        return f"down_dims {config['policy']['down_dims']}"
    return (f"TransformerForDiffusion ({network.get('n_layer')} layers, n_emb {network.get('n_emb')}, causal "
            f"{network.get('causal_attn')}, obs_as_cond {network.get('obs_as_cond')})")


if __name__ == "__main__":
    sys.exit(main())
