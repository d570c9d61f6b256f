"""AlignIT: prompt alignment for customized text-to-image models by per-token cross-attention K/V
infusion (``jaxkv.alignit.kv``), and the procedural scenes of its small test bed
(``jaxkv.alignit.scenes``)."""

from jaxkv.alignit.kv import KVProvider, LinearKV, align_kv, align_kv_jit, concept_positions, kv_drift

__all__ = ["KVProvider", "LinearKV", "align_kv", "align_kv_jit", "concept_positions", "kv_drift"]
