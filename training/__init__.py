"""Training: TrainState, optax chains, jitted steps, orbax checkpoints, packed data.

Installed as ``jaxkv.training``; always import it under that name.
"""
