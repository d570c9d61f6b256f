"""Shared fixtures. Parity fixtures come from ``tests/fixtures/make_parity_fixtures.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = FIXTURES / "parity"
FAMILIES = ("llama3", "mistral", "qwen2")


@pytest.fixture(scope="session")
def parity_models():
    """family -> (config, params, expected arrays), loaded once per session."""
    from jaxkv.checkpoints import load_checkpoint

    out = {}
    for fam in FAMILIES:
        config, params = load_checkpoint(PARITY / fam)
        out[fam] = (config, params, dict(np.load(PARITY / fam / "expected.npz")))
    return out


@pytest.fixture(scope="session")
def tiny_model():
    import jax

    from jaxkv.config import preset
    from jaxkv.models.llama import init_params

    config = preset("tiny")
    return config, init_params(config, jax.random.key(0))
