"""Mamba-2's SSD scan: ``reference.py`` (jnp: the recurrence as a scan, and the chunked form of
the paper's minimal listing). GPU and TPU kernels are not written yet."""
from jaxkv.kernels.ssd.reference import segsum, ssd_chunked, ssd_recurrent

__all__ = ["segsum", "ssd_chunked", "ssd_recurrent"]
