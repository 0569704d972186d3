"""The training script's helpers: what `train.py` calls for checkpoints and argument checks.

Not installed (setup.cfg installs `modeling_nanovlm` only): `train.py` imports it from the repository root.
"""
