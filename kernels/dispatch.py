"""The one dispatch rule every op's ``api.py`` follows (``implementation=``)."""
from __future__ import annotations

import warnings
from typing import Callable, Iterable

IMPLEMENTATIONS = ("pallas_gpu", "pallas_tpu", "reference")


def use_tpu_kernel(implementation: str | None, kernel_options: dict, allowed: Iterable[str]) -> bool:
    """True to run the Pallas TPU kernel: only when asked for by name (``"pallas_tpu"``; the TPU
    kernels are tested in the TPU interpreter and lowered for the TPU, not yet run on one, so
    None never picks them). Options other than ``allowed`` raise, naming them, and so does a
    backend that is not a TPU unless ``interpret`` is set."""
    if implementation != "pallas_tpu":
        return False
    other = sorted(set(kernel_options) - set(allowed))
    if other:
        raise ValueError(f"kernel options {other} are not the TPU kernel's (it takes {sorted(allowed)})")
    import jax

    if not kernel_options.get("interpret") and jax.default_backend() != "tpu":
        raise ValueError(f"implementation='pallas_tpu' cannot run: the backend is {jax.default_backend()}, "
                         "not tpu (interpret=True runs it on any backend)")
    return True


def use_kernel(op: str, implementation: str | None, kernel_options: dict, why_not: Callable[[], str | None]) -> bool:
    """True to run the Pallas GPU kernel, False for the reference. ``implementation``: one of
    ``IMPLEMENTATIONS`` or None; ``why_not()`` says why the kernel cannot run here (None if it
    can; not asked in interpret mode). An explicit ``pallas_gpu`` that cannot run raises; None
    falls back to the reference with a warning; kernel options for the reference raise."""
    if implementation not in (None,) + IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
    if implementation in (None, "pallas_gpu"):
        why = None if kernel_options.get("interpret") else why_not()
        if why is None:
            return True
        if implementation == "pallas_gpu":
            raise ValueError(f"implementation='pallas_gpu' cannot run: {why}")
        warnings.warn(f"{op}: the Pallas GPU kernel cannot run ({why}); using the jnp reference", stacklevel=3)
    if kernel_options:
        raise ValueError(f"kernel options {sorted(kernel_options)} need a kernel, not the reference")
    return False
