"""Policy server: a Diffusion Policy served over websockets + msgpack, dynamic batching across robots.

    python -m parapolicy.serve checkpoint=square sampler=paraddpm port=8000   # the server
    from parapolicy.serving.client import RemotePolicy                                # the robot side

``codec`` (msgpack with numpy arrays), ``protocol`` (messages, version), ``server`` (``PolicyServer``,
``ServerThread``); the closed-loop eval through a server is ``parapolicy.evaluation.remote``.
"""

from parapolicy.serving.protocol import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
