"""Lowering a function for the TPU on any machine: ``jax.export`` for ``platforms=["tpu"]``
under an abstract TPU mesh of the given chip, which runs Pallas's Mosaic lowering of every
kernel inside (the TPU's tile rules, the ops' lowering rules) without a TPU; what only Mosaic's
own compiler checks on a TPU is not covered."""
import jax


def lower_for_tpu(fn, *args, device_kind: str = "TPU v5 lite", **kwargs) -> str:
    """The StableHLO text of ``jax.jit(fn)`` exported for ``device_kind`` (e.g. "TPU v6 lite")."""
    from jax._src.mesh import AbstractDevice, AbstractMesh

    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind=device_kind, num_cores=1,
                                                                     platform="tpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args, **kwargs).mlir_module()
