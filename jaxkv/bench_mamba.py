"""Mamba-2 benchmarks: the SSD scan's kernel against the XLA reference (``jaxkv bench ssd``) and
Mamba-2 decode tokens/s against its memory roofline (``jaxkv bench mamba-decode``). Every row
names the card, the jax version and the baseline measured in the same process."""
from __future__ import annotations

import json
import statistics
import sys
import time

from jaxkv.errors import UserError

__all__ = ["MAMBA2_SHAPES", "bench_ssd", "bench_mamba_decode", "main"]

# The published Mamba-2 shapes (state-spaces/mamba2-*: d_model, layers; headdim 64, N 128, expand
# 2, one group, a 50,288-token vocabulary, tied embeddings); random weights, real sizes.
MAMBA2_SHAPES = {"mamba2-130m": (768, 24), "mamba2-370m": (1024, 48), "mamba2-1.3b": (2048, 48),
                 "mamba2-2.7b": (2560, 64)}


def mamba2_shape(name: str):
    from jaxkv.models.mamba2 import Mamba2Config

    try:
        d, layers = MAMBA2_SHAPES[name]
    except KeyError:
        raise UserError(f"unknown Mamba-2 shape {name!r}; known: {sorted(MAMBA2_SHAPES)}") from None
    return Mamba2Config(vocab_size=50288, hidden_size=d, num_layers=layers, num_heads=2 * d // 64, head_dim=64,
                        state_size=128, n_groups=1, expand=2, tie_word_embeddings=True)


def bench_ssd(*, batch: int = 8, length: int = 2048, heads: int = 24, head_dim: int = 64, state: int = 128,
              groups: int = 1, configs=((64, 64, 4, False, 1), (64, 64, 4, False, 2), (64, 64, 4, False, 4),
                                        (64, 64, 4, False, 8), (64, 64, 4, False, 24), (64, 64, 8, False, 1),
                                        (64, 64, 8, False, 4), (64, 64, 8, False, 24), (64, 32, 4, False, 1),
                                        (64, 32, 4, False, 4), (64, 64, 4, True, 1), (128, 64, 8, False, 4)),
              repeats: int = 10, interpret: bool = False, seed: int = 0, progress=None) -> list[dict]:
    """The SSD scan at training shapes, bf16 inputs: the Pallas kernel (each ``(block_t,
    block_p, num_warps, split, backward_heads)`` of ``configs``; those whose ``backward_heads``
    does not divide the heads per group are left out) against the XLA reference (``ssd_chunked`` at the
    model's chunk of 256 and at 64), forward and forward + backward, in one process. The
    roofline is the bytes a forward must move (x, dt, B, C read once, y written, bf16 except dt)
    over the read bandwidth measured in the same run. On a GPU each kernel row also carries the
    profiler's GPU time of the forward + backward's eight longest kernels (``kernel_times_s``).
    ``progress``: called with each row as it is measured."""
    import functools

    import jax
    import jax.numpy as jnp

    from jaxkv.bench import _time_on_device, device_kernel_times, measure_read_bandwidth
    from jaxkv.kernels.ssd import ssd_chunked
    from jaxkv.kernels.ssd.pallas_gpu import ssd_pallas_gpu

    b, t, h, p, n, g = batch, length, heads, head_dim, state, groups
    if h % g:
        raise UserError(f"heads ({h}) must be a multiple of groups ({g})")
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (b, t, h, p), jnp.bfloat16)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, t, h), jnp.float32) - 2.0)
    A = -jnp.exp(jax.random.normal(ks[2], (h,), jnp.float32) * 0.5)
    B = jax.random.normal(ks[3], (b, t, g, n), jnp.bfloat16)
    C = jax.random.normal(ks[4], (b, t, g, n), jnp.bfloat16)
    wy = jax.random.normal(ks[5], (b, t, h, p), jnp.float32)
    gpu = jax.default_backend() == "gpu"
    bandwidth = measure_read_bandwidth() if gpu else float("nan")
    io_bytes = 2 * (2 * b * t * h * p) + 2 * (2 * b * t * g * n) + 4 * b * t * h
    rows = []

    def timed(f, *xs):
        return _time_on_device(f, *xs, repeats=1 if interpret else repeats, rounds=1 if interpret else 3)

    def with_grad(fn):  # wy an argument, not a closed-over constant XLA would try to fold
        def loss(x, dt, B, C, wy):
            y, final = fn(x, dt, A, B, C)
            return jnp.sum(y * wy) + jnp.sum(final)
        return jax.grad(loss, argnums=(0, 1, 2, 3))

    ref_y = None
    variants = [(f"reference (XLA), chunk {q}", functools.partial(ssd_chunked, chunk_size=q), None)
                for q in ((256, 64) if not interpret else (64,))]
    configs = [c for c in configs if (h // g) % c[4] == 0]
    variants += [(f"pallas_gpu {'split' if sp else 'fused'} block_t {bt} block_p {bp} warps {w} bwd heads {hb}",
                  functools.partial(ssd_pallas_gpu, block_t=bt, block_p=bp, split=sp, num_warps=w,
                                    backward_heads=hb, interpret=interpret),
                  (bt, bp, w, sp, hb)) for bt, bp, w, sp, hb in (configs if not interpret else configs[:1])]
    for name, fn, cfg in variants:
        y, _ = jax.jit(fn)(x, dt, A, B, C)
        if ref_y is None:
            ref_y = y
        err = float(jnp.max(jnp.abs(y - ref_y)) / jnp.max(jnp.abs(ref_y)))
        fwd = timed(lambda x, dt, B, C, fn=fn: fn(x, dt, A, B, C)[0], x, dt, B, C)
        both = timed(with_grad(fn), x, dt, B, C, wy)
        parts = device_kernel_times(jax.jit(with_grad(fn)), x, dt, B, C, wy) if cfg is not None and gpu else None
        rows.append({"bench": "ssd", "variant": name, "kernel": cfg is not None, "batch": b, "length": t,
                     "kernel_times_s": dict(sorted((parts or {}).items(), key=lambda kv: -kv[1])[:8]),
                     "heads": h, "head_dim": p, "state": n, "groups": g, "forward_s": fwd,
                     "forward_backward_s": both, "io_bytes": io_bytes, "bandwidth_bytes_per_s": bandwidth,
                     "roofline_forward_s": io_bytes / bandwidth, "max_rel_err_vs_reference": err,
                     "device": str(jax.devices()[0].device_kind), "jax": jax.__version__})
        if progress is not None:
            progress(rows[-1])
    base = rows[0]
    for r in rows:
        r["forward_speedup"] = base["forward_s"] / r["forward_s"]
        r["forward_backward_speedup"] = base["forward_backward_s"] / r["forward_backward_s"]
    return rows


def bench_mamba_decode(*, shape: str = "mamba2-130m", batch: int = 1, prompt_len: int = 1024,
                       new_tokens: int = 256, repeats: int = 3, bandwidth: float | None = None) -> dict:
    """Greedy decode of a Mamba-2 of ``shape`` (random weights, bf16), the whole loop in one jit
    ``while_loop``, tokens/s against the roofline: one step reads every parameter once and reads
    and writes the state (conv + SSM, ``Mamba2State.nbytes``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxkv.bench import _block, measure_read_bandwidth
    from jaxkv.generate import decode, init_model_cache, prefill
    from jaxkv.models import mamba2

    config = mamba2_shape(shape)
    if bandwidth is None:
        bandwidth = measure_read_bandwidth()
    params = jax.jit(lambda k: mamba2.init_params(config, k, dtype=jnp.bfloat16))(jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, (batch, prompt_len), dtype=np.int32)
    positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), (batch, prompt_len)).copy()
    lengths = np.full((batch,), prompt_len, np.int32)
    held = [0]

    def run():
        cache = init_model_cache(config, None, batch=batch, max_len=prompt_len + new_tokens, dtype=jnp.bfloat16)
        held[0] = cache.nbytes
        last, cache = prefill(params, tokens, positions, lengths, cache, config=config)
        _block(last)
        t0 = time.perf_counter()
        out, cache = decode(params, cache, last, lengths, jax.random.key(0), np.float32(0), np.float32(1),
                            np.array([-2], np.int32), config=config, max_new_tokens=new_tokens)
        _block(out)
        return time.perf_counter() - t0

    run()  # compile
    seconds = statistics.median(run() for _ in range(repeats))
    steps = new_tokens - 1
    param_bytes = config.num_params * 2
    step_bytes = param_bytes + 2 * held[0]
    tokens_per_s = batch * steps / seconds
    roofline = batch * bandwidth / step_bytes
    return {"bench": "mamba-decode", "shape": shape, "params": config.num_params, "state_bytes": held[0],
            "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "ms_per_step": 1e3 * seconds / steps,
            "tokens_per_s": tokens_per_s, "roofline_tokens_per_s": roofline,
            "fraction_of_roofline": tokens_per_s / roofline, "bytes_per_step": step_bytes,
            "bandwidth_bytes_per_s": bandwidth, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}


def _write(rows, path):
    if path:
        from jaxkv.fileio import write_text_atomic

        write_text_atomic(path, json.dumps(rows, indent=2) + "\n")


def main(args) -> int:
    if args.bench == "ssd":
        from jaxkv.bench import _need_gpu

        _need_gpu("ssd")
        def progress(r):  # each row to stderr as it is measured: a run cut short keeps what it measured
            print(f"{r['variant']}: fwd {r['forward_s'] * 1e3:.3f} ms, fwd+bwd {r['forward_backward_s'] * 1e3:.3f} ms",
                  file=sys.stderr, flush=True)

        rows = bench_ssd(batch=args.batch, length=args.length, heads=args.heads, head_dim=args.head_dim,
                         state=args.state, groups=args.groups, repeats=args.repeats, progress=progress)
        r0 = rows[0]
        print(f"device {r0['device']}, jax {r0['jax']}; batch {r0['batch']}, length {r0['length']}, heads "
              f"{r0['heads']} x {r0['head_dim']}, state {r0['state']}, groups {r0['groups']}, bf16; roofline "
              f"(forward bytes / {r0['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s) {r0['roofline_forward_s'] * 1e3:.3f} ms")
        print(f"{'variant':<64} {'fwd ms':>8} {'x':>6} {'fwd+bwd ms':>11} {'x':>6} {'rel err':>8}")
        for r in rows:
            print(f"{r['variant']:<64} {r['forward_s'] * 1e3:>8.3f} {r['forward_speedup']:>6.2f} "
                  f"{r['forward_backward_s'] * 1e3:>11.3f} {r['forward_backward_speedup']:>6.2f} "
                  f"{r['max_rel_err_vs_reference']:>8.1e}")
        for r in rows:
            if r["kernel_times_s"]:
                print(f"  {r['variant']}: " + ", ".join(f"{k} {v * 1e3:.3f} ms"
                                                         for k, v in r["kernel_times_s"].items()))
        _write(rows, args.json)
        return 0
    try:
        batches = [int(v) for v in args.batch.split(",")]
    except ValueError:
        raise UserError(f"--batch must be comma-separated integers, got {args.batch!r}") from None
    if any(v <= 0 for v in batches) or args.new_tokens < 2:
        raise UserError("--batch must be positive and --new-tokens >= 2")
    from jaxkv.bench import measure_read_bandwidth

    bandwidth = measure_read_bandwidth()
    rows = []
    for shape in args.shapes.split(","):
        for b in batches:
            r = bench_mamba_decode(shape=shape.strip(), batch=b, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                   repeats=args.repeats, bandwidth=bandwidth)
            rows.append(r)
            print(f"{r['shape']} ({r['params'] / 1e6:.0f} M params, state {r['state_bytes'] / 2**20:.1f} MiB) batch "
                  f"{b}: {r['ms_per_step']:.3f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, roofline "
                  f"{r['roofline_tokens_per_s']:,.0f} ({r['fraction_of_roofline']:.1%}); "
                  f"{r['device']}, bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    _write(rows, args.json)
    return 0
