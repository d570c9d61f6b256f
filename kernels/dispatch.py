"""The one dispatch rule every op's ``api.py`` follows (``implementation=``)."""
from __future__ import annotations

import warnings
from typing import Callable

IMPLEMENTATIONS = ("pallas_gpu", "reference")


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
