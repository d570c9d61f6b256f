"""Mamba-2's SSD scan: ``reference.py`` (jnp: the recurrence as a scan, and the chunked form of
the paper's minimal listing; Stuffed Mamba's windowed form). GPU and TPU kernels are not written yet."""
from jaxkv.kernels.ssd.reference import segsum, ssd_chunked, ssd_recurrent, ssd_windowed

__all__ = ["segsum", "ssd_chunked", "ssd_recurrent", "ssd_windowed"]
