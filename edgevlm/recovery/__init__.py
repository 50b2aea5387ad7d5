"""Recovering what pruning costs: `edgevlm heal` (docs/methods.md section 5).

data.py     the training split of a calibration spec and a seeded share of it
losses.py   the recipes (projector, sft, sft+hidden-kd, logit-kd) and their losses
heal.py     trainable parameters (full or LoRA), the training run, the saved checkpoint
commands.py the CLI command
"""
