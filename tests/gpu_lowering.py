"""Lowering a function for an NVIDIA GPU on any machine: ``jax.export`` for ``platforms=["cuda"]``
under an abstract GPU mesh of the given card, which runs Pallas's Triton lowering of every kernel
inside (each op's lowering rule, the block shapes) without a GPU; what only Triton's compiler
checks on the card (registers, shared memory) is not covered."""
import jax


def lower_for_gpu(fn, *args, device_kind: str = "NVIDIA H200", **kwargs) -> str:
    """The StableHLO text of ``jax.jit(fn)`` exported for ``device_kind``; each Pallas kernel is in
    it as a Triton custom call."""
    from jax._src.mesh import AbstractDevice, AbstractMesh

    # Auto axes: under Explicit ones the avals carry shardings that Pallas Triton's reduction
    # lowering (jax 0.11.2) does not update when it drops an axis
    mesh = AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda"))
    with jax.sharding.use_abstract_mesh(mesh):
        triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
        return jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(*args, **kwargs
                                                                                             ).mlir_module()
