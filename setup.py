"""Package discovery (the project's metadata is in pyproject.toml).

``parapolicy/`` and its subpackages are found automatically. Three folders stay at the repository's top
level, as the project's layout names them, and install under ``parapolicy``: ``envs/`` (the environment
side) as ``parapolicy.envs``, ``conf/`` (Hydra configs, ``pkg://parapolicy.conf``) as ``parapolicy.conf``
and ``checkpoints/`` (the shipped policies) as ``parapolicy.checkpoints``. pyproject.toml's
``packages.find`` cannot add packages from outside the folder it searches, hence this file.
"""

from setuptools import find_packages, setup

TOP_LEVEL = {"parapolicy.envs": "envs", "parapolicy.conf": "conf", "parapolicy.checkpoints": "checkpoints"}

setup(
    packages=find_packages(include=["parapolicy", "parapolicy.*"]) + list(TOP_LEVEL),
    package_dir={"parapolicy": "parapolicy", **TOP_LEVEL},
    package_data={
        "parapolicy.conf": ["*.yaml", "**/*.yaml"],
        # the weights and their config; the training logs stay in the source tree
        "parapolicy.checkpoints": ["*/config.json", "*/model.safetensors"],
    },
)
