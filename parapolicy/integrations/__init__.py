"""Accelerate policies that live in other libraries in place (duck-typed: those libraries are not imported).

- ``lerobot``: swap a LeRobot ``DiffusionPolicy``'s sampling loop for a parapolicy sampler.
"""
