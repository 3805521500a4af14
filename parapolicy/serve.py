"""Serve a Diffusion Policy over websockets (msgpack + numpy), batching requests of several robots.

    python -m parapolicy.serve checkpoint=square sampler=paraddpm port=8000
    python -m parapolicy.serve sampler=paraddpm sampler.warm_start=true max_batch=8 max_wait_ms=2

Protocol: ``parapolicy.serving.protocol``; client: ``parapolicy.serving.client.RemotePolicy``. SIGINT / SIGTERM
stop it gracefully (in-flight requests are answered) and print the counters.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("parapolicy.serve")


def build_server(cfg: DictConfig):
    """Load the policy with its sampler and build the ``PolicyServer`` (fails on bad values before listening)."""
    import torch

    from parapolicy.configs import sampler_kwargs
    from parapolicy.policy.checkpoint import resolve_checkpoint
    from parapolicy.devices import pick_device
    from parapolicy.policy import load_policy
    from parapolicy.serving.server import PolicyServer

    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    checkpoint = resolve_checkpoint(str(cfg.checkpoint))
    name, steps, options = sampler_kwargs(cfg.sampler)
    device = pick_device(str(cfg.device))
    policy = load_policy(str(checkpoint), sampler=name, device=str(device), num_inference_steps=steps,
                         fast_path=cfg.get("fast_path", "auto"), **options)
    return PolicyServer(
        policy, cfg.host, int(cfg.port), max_batch=int(cfg.max_batch), max_wait_ms=float(cfg.max_wait_ms),
        deadline_ms=None if cfg.deadline_ms is None else float(cfg.deadline_ms),
        max_message_bytes=int(cfg.max_message_bytes), token=None if cfg.token is None else str(cfg.token),
        checkpoint=checkpoint, shutdown_timeout_s=float(cfg.shutdown_timeout_s),
        sampler_config=OmegaConf.to_container(cfg.sampler, resolve=True))


async def _serve(server) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.request_stop)
    task = asyncio.create_task(server.run())
    while not server.ready.is_set() and not task.done():
        await asyncio.sleep(0.01)
    if server.ready.is_set() and not task.done():
        # one line a launcher can parse for the bound port (port=0 picks a free one)
        print(f"parapolicy.serve listening on ws://{server.host}:{server.port} "
              f"(sampler {server.metadata['sampler']['name']}; SIGINT or SIGTERM stops it)", flush=True)
    await task


@hydra.main(version_base=None, config_path="pkg://parapolicy.conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    server = build_server(cfg)
    asyncio.run(_serve(server))


if __name__ == "__main__":
    main()
