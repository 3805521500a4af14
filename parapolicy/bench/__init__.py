"""Latency benchmark (``python -m parapolicy.bench``): every sampler against its sequential twin, with the fast path off and on.

    python -m parapolicy.bench                                      # quick: ddpm vs paraddpm (its run time: docs/benchmark.md)
    python -m parapolicy.bench preset=full                          # every sampler, batch 1 and 8, full-size U-Net
    python -m parapolicy.bench 'samplers=[ddpm,paraddpm]' 'batch_sizes=[1]' 'windows=[]' fast_path=off
    python -m parapolicy.bench device=cuda fast_path=on '+fast_path_options.dtype=bfloat16'

Phases (each with warm-up calls first, then ``repetitions`` timed calls that go round-robin over the
samplers, so that machine drift hits all of them alike):

1. ``samplers``: each requested sampler (options from ``conf/sampler/<name>.yaml``) at every batch size,
   timing ``policy.predict_action`` (what a control loop pays). A parallel sampler's sequential twin
   (paraddpm -> ddpm, paraddim -> ddim, srds / parataa -> the solver they build on) is run with the
   same schedule length. With ``fast_path=both`` (the default) every sampler runs twice, on the plain
   path (eager PyTorch) and on the fast path (``parapolicy.policy.accel``: on CPU the fastest backend per
   shape, picked and warmed up before timing; label ``+fast``). ``speedup`` is the same-mode twin's p50
   over the sampler's p50 (eager vs eager, fast vs fast); ``speedup_vs_fastest_twin`` divides by the
   *fastest* variant of the twin instead, and ``headline`` holds, per parallel sampler, its fastest
   variant over the fastest twin: the honest figure. Call r of every sampler uses the same observations
   and the same noise (seed + r), so ``deviation_vs_twin`` (max |action difference|) is the parallel
   sampler's own error and ``deviation_vs_eager`` the fast path's.
2. ``windows``: the window sampler (paraddpm) at each window size (and tolerance, ``window_tolerances``),
   batch 1, with its twin, in every fast-path mode.
3. ``denoiser``: one bare ``denoise`` call with K stacked timesteps for K in ``denoiser.k`` (network
   rows = K * batch), for the checkpoint's network (and Diffusion Policy's full-size U-Net, down_dims
   256/512/1024, random weights, with ``denoiser.full_size``), in every mode: how much a Picard round
   costs over a sequential step. From it, every sampler / window row gets ``predicted_ms``, the
   rounds x per-call-cost model (``predict_latency``), next to what was measured.

Modules: ``jobs`` (what is timed, twins, sweeps), ``observations``, ``timing`` (timed calls, rows,
headline), ``denoiser`` (the K curve and the latency model), ``networks`` (Diffusion Policy-size
networks with random weights), ``report`` (tables), ``plots``, ``run`` (``run_bench``); ``__main__``
is the Hydra CLI.

Labels carry the schedule length when it differs from the sampler's config file (``ddim-100``).
Writes ``bench.json``, ``latency_vs_batch.png``, ``latency_vs_window.png``, ``denoiser_vs_k.png`` to
Hydra's run dir (``outputs/bench/<env>/<date>``) or ``out=<folder>``, and prints tables. On CUDA,
every timer brackets the call with ``torch.cuda.synchronize``.
"""

from parapolicy.bench.denoiser import add_predictions, denoiser_networks, interpolate, predict_latency, time_denoiser
from parapolicy.bench.jobs import (FAST_SUFFIX, PHASES, Job, build_jobs, expand_sampler_names, fast_modes,
                                   step_label, twin_name, with_sampler)
from parapolicy.bench.observations import load_observations
from parapolicy.bench.run import run_bench
from parapolicy.bench.timed_calls import headline, stats, summarize_phase, time_phase

__all__ = ["FAST_SUFFIX", "PHASES", "Job", "add_predictions", "build_jobs", "denoiser_networks", "expand_sampler_names",
           "fast_modes", "headline", "interpolate", "load_observations", "predict_latency", "run_bench", "stats",
           "step_label", "summarize_phase", "time_denoiser", "time_phase", "twin_name", "with_sampler"]
