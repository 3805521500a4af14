"""Real-time execution of action chunks: latency in control steps, chunk transitions, a non-blocking loop.

- ``latency``: ``LatencyModel`` (measured, fixed ms, or a replayed profile) and ``delay_steps``.
- ``transitions``: how a new chunk takes over from the one being executed (``Transition``).
- ``async_policy``: ``AsyncPolicy``, a control loop that never waits for the planner.

The closed-loop simulation of all this is ``parapolicy.realtime.runner.PolicyRunner(timing=...)``.
"""

from parapolicy.realtime.async_policy import DEFAULT_TRANSITION, AsyncPolicy
from parapolicy.realtime.latency import LatencyModel, delay_steps
from parapolicy.realtime.transitions import TRANSITIONS, Transition

__all__ = ["AsyncPolicy", "DEFAULT_TRANSITION", "LatencyModel", "TRANSITIONS", "Transition", "delay_steps"]
