"""The shipped policies (``checkpoints/<name>/``: config.json + model.safetensors), installed as package data
so that ``load_policy("square")`` finds them from a wheel too (``parapolicy.policy.checkpoint.CHECKPOINTS_DIR``)."""
