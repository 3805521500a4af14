"""Fast path for an image policy's observation encoder (``FastPath.encoder``).

An image policy encodes its observation window once per ``predict_action`` call,
``global_condition(obs_history [B, T, D], images {key: uint8 [B, T, 3, H, W]}) -> [B, T * F]``
(low-dim normalisation, uint8 -> [-1, 1], crops, the cameras' networks). The batch B is its only shape
that changes (robots of a server batch), so each B (and image dtype) gets one static version:

- CPU: the fastest of the FastPath's backends (eager, trace, compile if asked), measured at the first
  call of that shape or at ``warm_up``, with the denoiser's rules: a traced or compiled version is
  kept only if it gives eager's conditioning within ``atol`` on that call's inputs and on random
  frames, else eager runs, with a note. ``backend="eager"`` keeps the plain path's result bit for bit;
- CUDA: a CUDA graph per B (side-stream warm-up, capture; the inputs are copied into static buffers
  and the graph replayed), eager with a warning if capture fails (an error with ``cuda_graph=True``).

The encoder runs in float32 whatever the FastPath's ``dtype`` (autocast is the denoiser's): its output
conditions every denoiser call of the plan. A traced or captured encoder holds the weights as they
were: it is rebuilt when a parameter or normaliser statistic changes in place or moves.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn


class ConditionModule(nn.Module):
    """``policy.global_condition`` with positional tensors, as tracing and graphs need them:
    ``forward(obs_history [B, T, D], *images)`` with one ``[B, T, 3, H, W]`` per camera in
    ``config.image_keys`` order. Holds the encoder and the normaliser as submodules (so that freezing
    turns their weights into constants), not the policy."""

    def __init__(self, policy: Any):
        super().__init__()
        self.obs_encoder, self.normalizer = policy.obs_encoder, policy.normalizer
        self.image_keys = list(policy.config.image_keys)
        self._condition = policy.global_condition  # a bound method: not registered as a submodule

    def forward(self, obs_history: torch.Tensor, *images: torch.Tensor) -> torch.Tensor:
        return self._condition(obs_history, dict(zip(self.image_keys, images)))


@dataclass
class _EncoderRunner:
    """One static shape: the chosen callable (CPU) or the graph and its buffers (CUDA)."""

    fn: Optional[Callable] = None
    inputs: Optional[tuple] = None  # CUDA: static input buffers
    graph: Any = None  # torch.cuda.CUDAGraph, or False when capture failed
    out: Optional[torch.Tensor] = None


class EncoderFastPath:
    """The encoder part of ``fast`` (a ``parapolicy.policy.accel.FastPath``: its backends, atol, CUDA-graph
    option, stats). ``__call__(policy, obs_history, images)`` returns what ``policy.global_condition``
    returns."""

    def __init__(self, fast: Any):
        self.fast = fast
        self._module: Optional[ConditionModule] = None
        self._key = None
        self._runners: dict = {}

    def reset(self) -> None:
        self._module, self._key = None, None
        self._runners.clear()

    @torch.inference_mode()
    def __call__(self, policy: Any, obs_history: torch.Tensor, images: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if policy.obs_encoder.training:  # random crops: nothing static to trace
            return policy.global_condition(obs_history, images)
        module = self._module_for(policy)
        inputs = (obs_history.float(), *(torch.as_tensor(images[key]) for key in module.image_keys))
        device = obs_history.device
        shape = (tuple(inputs[1].shape), inputs[1].dtype, device)
        runner = self._runners.get(shape)
        if runner is None:
            runner = self._runners[shape] = _EncoderRunner()
            label = f"encoder B{obs_history.shape[0]}"
            if device.type == "cuda" and self.fast.cuda_graph is not False:
                self._capture(module, runner, inputs)
            elif device.type == "cpu":
                gen = torch.Generator().manual_seed(0)
                probe = (inputs[0] + torch.randn(inputs[0].shape, generator=gen) * 0.1,
                         *(_random_like(x, gen) for x in inputs[1:]))
                _, runner.fn = self.fast.pick_backend(label, module, inputs, probe, self.fast.backends)
        if runner.graph:
            for buffer, value in zip(runner.inputs, inputs):
                buffer.copy_(value)
            runner.graph.replay()
            return runner.out.clone()  # the next replay overwrites the static output
        return (runner.fn or module)(*inputs)

    def _module_for(self, policy: Any) -> ConditionModule:
        """The policy's condition module; a new one (and no old traces or graphs) when the encoder or the
        normaliser is another object, moved, or changed in place."""
        tensors = [*policy.obs_encoder.parameters(), *policy.obs_encoder.buffers(), *policy.normalizer.buffers()]
        try:
            versions = sum(t._version for t in tensors)
        except RuntimeError:  # inference tensors have no version counter (and cannot change in place)
            versions = -1
        key = (id(policy.obs_encoder), id(policy.normalizer), tensors[0].device, tensors[0].data_ptr(), versions)
        if key != self._key:
            self.reset()
            self._module, self._key = ConditionModule(policy), key
        return self._module

    def _capture(self, module: ConditionModule, runner: _EncoderRunner, inputs: tuple) -> None:
        """Warm up on a side stream, then capture the encoder into a CUDA graph on static buffers."""
        stats = self.fast.stats
        try:
            runner.inputs = tuple(x.clone() for x in inputs)
            device = inputs[0].device
            stream = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(self.fast.warmup):
                    module(*runner.inputs)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                runner.out = module(*runner.inputs)
            runner.graph = graph
            stats.captures += 1
        except Exception as err:
            stats.capture_failures += 1
            if self.fast.cuda_graph is True:
                raise
            warnings.warn(f"fast path: CUDA graph capture of the image encoder failed ({type(err).__name__}: "
                          f"{err}); encoding this shape eagerly", RuntimeWarning, stacklevel=4)
            runner.graph, runner.inputs, runner.out = False, None, None


def _random_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random frames of ``x``'s shape and dtype (uint8 0..255 or float in [0, 1])."""
    if x.dtype == torch.uint8:
        return torch.randint(0, 256, x.shape, generator=gen, dtype=torch.uint8)
    return torch.rand(x.shape, generator=gen).to(x.dtype)
