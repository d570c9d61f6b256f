"""Mamba-2's SSD scan: ``reference.py`` (jnp: the recurrence as a scan, and the chunked form of
the paper's minimal listing; Stuffed Mamba's windowed form), ``pallas_gpu.py`` (Pallas Triton,
forward and backward, the chunked form fused over chunks), ``pallas_tpu.py`` (Pallas Mosaic,
forward and backward, the state in VMEM across a sequential chunk axis; not yet run on a
TPU), ``api.py`` (``ssd``: the
dispatch)."""
from jaxkv.kernels.ssd.api import IMPLEMENTATIONS, ssd, why_no_kernel
from jaxkv.kernels.ssd.reference import segsum, ssd_chunked, ssd_recurrent, ssd_windowed

__all__ = ["IMPLEMENTATIONS", "segsum", "ssd", "ssd_chunked", "ssd_recurrent", "ssd_windowed", "why_no_kernel"]
