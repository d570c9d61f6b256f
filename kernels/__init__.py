"""Pallas kernels, one folder per op (reference.py, pallas_gpu.py, pallas_tpu.py, api.py).

Installed as ``jaxkv.kernels``; always import it under that name.
"""
