"""Shared fixtures. Parity fixtures come from ``tests/fixtures/make_parity_fixtures.py``."""

from __future__ import annotations

import getpass
import os
import tempfile
from pathlib import Path

# XLA's persistent compilation cache, shared by the test workers and the subprocesses the tests
# start: many tests build the same small programs through fresh jit wrappers (every CLI call, every
# subprocess), and loading them instead of compiling them again takes a third off the suite's time.
# Entries are keyed by the program and the jax/XLA versions, so a stale entry is never used. jax
# records its backend-compile event for a load from this cache too, so the compile counts hold.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"jaxkv-tests-xla-cache-{getpass.getuser()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Most of the suite's time is XLA:CPU compiling many small programs, and most of a compile is
# LLVM optimising the generated code. The tests' models are tiny, so unoptimised machine code
# costs little at run time while compiles take about half as long. The programs XLA builds (HLO,
# fusions) are the same; only LLVM's backend passes are skipped. Inherited by the subprocesses
# the tests start; a test or a user that sets the level itself keeps its own.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

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


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (config, params), loaded once per session."""
    from jaxkv.checkpoints import load_checkpoint, resolve_model

    return load_checkpoint(resolve_model("default"))
