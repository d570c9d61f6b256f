"""``jaxkv bench``: speed measured against the hardware ceiling in the same run.

``jaxkv bench decode`` times the jit decode loop of a model (real weights with ``--model``, else a
preset with random weights) and
reports tokens/s beside the memory roofline: each decode step must read every parameter once
(the LM head included) and the K/V of every cached token, so

    roofline tokens/s = batch * HBM bandwidth / (parameter bytes + batch * context * KV bytes/token)

with the bandwidth measured in the same process (a large reduction, read-only) and the context
averaged over the decoded tokens.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import sys
import time

from jaxkv.errors import UserError
from jaxkv.fileio import write_text_atomic

__all__ = ["main", "measure_read_bandwidth", "bench_decode", "bench_kernels"]


def _block(x):
    import jax

    return jax.block_until_ready(x)


def measure_read_bandwidth(gib: float = 4.0, repeats: int = 10) -> float:
    """Bytes/s of a read-only reduction over ``gib`` GiB of fp32 (median of ``repeats``)."""
    import jax
    import jax.numpy as jnp

    n = int(gib * 2**30) // 4
    x = _block(jnp.ones((n,), jnp.float32))
    f = jax.jit(jnp.sum)
    _block(f(x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _block(f(x))
        times.append(time.perf_counter() - t0)
    del x
    return n * 4 / statistics.median(times)


def bench_decode(*, config, params, name: str, batch: int, prompt_len: int, new_tokens: int, dtype: str,
                 repeats: int, bandwidth: float, method: str = "full", budget: float = 1.0) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxkv.cache import init_cache
    from jaxkv.eval.harness import policy_for
    from jaxkv.generate import decode, prefill

    jdtype = jnp.dtype(dtype)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, (batch, prompt_len), dtype=np.int32)
    positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), (batch, prompt_len)).copy()
    lengths = np.full((batch,), prompt_len, np.int32)
    max_len = prompt_len + new_tokens
    no_stop = np.array([-2], np.int32)

    policy = policy_for(method, budget, prompt_len).prepare(params, config)
    held = [0]

    def run():
        cache = init_cache(config, policy, batch=batch, max_len=max_len, dtype=jdtype)
        held[0] = cache.nbytes
        last, cache = prefill(params, tokens, positions, lengths, cache, config=config)
        _block(last)
        t0 = time.perf_counter()
        out, cache = decode(params, cache, last, lengths, jax.random.key(0), np.float32(0),
                            np.float32(1), no_stop, config=config, max_new_tokens=new_tokens)
        _block(out)
        return time.perf_counter() - t0

    run()  # compile
    seconds = statistics.median(run() for _ in range(repeats))
    steps = new_tokens - 1  # the first token comes from the prefill logits
    tokens_per_s = batch * steps / seconds

    param_bytes = config.num_params * jnp.dtype(jdtype).itemsize
    kv_token = config.kv_bytes_per_token(jnp.dtype(jdtype).itemsize)
    if method == "full":  # what a step must read: the K/V of the tokens cached so far
        kv_read = batch * (prompt_len + new_tokens / 2) * kv_token
    else:  # a compressed cache: the bytes it holds (the pure-jnp path reads every slot)
        kv_read = held[0]
    step_bytes = param_bytes + kv_read
    roofline = batch * bandwidth / step_bytes
    return {
        "bench": "decode", "model": name, "params": config.num_params, "dtype": dtype,
        "method": method, "budget": budget, "kv_bytes": held[0],
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "decode_s": seconds, "ms_per_step": 1e3 * seconds / steps,
        "tokens_per_s": tokens_per_s, "roofline_tokens_per_s": roofline,
        "fraction_of_roofline": tokens_per_s / roofline,
        "bytes_per_step": step_bytes, "bandwidth_bytes_per_s": bandwidth,
        "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
    }


def train_flops_per_token(config, seq_len: int) -> float:
    """Model FLOPs per trained token: 6 x (parameters in matmuls) + causal attention
    (6 x L x T x N*H: QK^T and PV, forward and backward, half the square). The embedding
    lookup is no matmul; a tied LM head is."""
    matmul_params = config.num_params - config.vocab_size * config.hidden_size
    if config.tie_word_embeddings:
        matmul_params += config.vocab_size * config.hidden_size
    attn = 6 * config.num_layers * seq_len * config.num_heads * config.head_dim
    return 6 * matmul_params + attn


def bench_train(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxkv.config import preset as get_preset
    from jaxkv.models.llama import init_params
    from jaxkv.training.config import DataConfig, OptimConfig
    from jaxkv.training.data import Batches, pack_documents
    from jaxkv.training.optim import make_optimizer, make_schedule
    from jaxkv.training.sharding import (batch_sharding, enable_collective_overlap, make_mesh, parse_mesh,
                                         state_shardings)
    from jaxkv.training.state import init_state
    from jaxkv.training.step import make_train_step

    mesh_shape = parse_mesh(args.mesh)
    overlap = getattr(args, "collective_overlap", True) and math.prod(mesh_shape) > 1
    overlap = overlap and enable_collective_overlap()  # before the first array: XLA reads its flags once

    config = get_preset(args.preset)
    optim = OptimConfig(lr=1e-4, warmup_steps=10, total_steps=1000)
    tx, schedule = make_optimizer(optim), make_schedule(optim)
    rng = np.random.default_rng(0)
    docs, total = [], 0
    while total < args.seq_len * args.batch_size * 2:
        n = int(rng.integers(args.seq_len // 16, args.seq_len))
        docs.append(rng.integers(3, config.vocab_size, n).astype(np.int32))
        total += n
    mode = getattr(args, "mode", "reset")
    batches = Batches(pack_documents(docs, DataConfig(seq_len=args.seq_len, attention=mode),
                                     anchor_id=config.bos_token_id), batch_size=args.batch_size,
                      grad_accum=args.grad_accum, seed=0)
    mesh = make_mesh(*mesh_shape)
    make = lambda k: init_state(init_params(config, k), tx, 0)  # noqa: E731
    shardings = state_shardings(jax.eval_shape(make, jax.random.key(0)), tx, mesh)
    state = jax.jit(make, out_shardings=shardings)(jax.random.key(0))
    attention = None if args.attention == "auto" else args.attention
    remat = getattr(args, "remat", "none")
    step = jax.jit(make_train_step(config, tx, schedule, compute_dtype=jnp.bfloat16, attention_implementation=attention,
                                   attention=mode, remat=None if remat == "none" else remat),
                   in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None),
                   donate_argnums=0)
    batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batches.get(0).items()}
    with jax.set_mesh(mesh):
        for _ in range(2):  # compile + warm-up
            state, m = step(state, batch)
        _block(m)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = step(state, batch)
        _block(m)
    seconds = (time.perf_counter() - t0) / args.steps
    tokens = args.batch_size * args.seq_len
    flops = train_flops_per_token(config, args.seq_len) * tokens / seconds
    n_dev = mesh.devices.size
    return {"bench": "train", "preset": args.preset, "params": config.num_params, "seq_len": args.seq_len,
            "mesh": list(mesh_shape), "devices": n_dev, "collective_overlap": bool(overlap), "remat": remat,
            "tokens_per_s_per_device": tokens / seconds / n_dev,
            "batch_size": args.batch_size, "grad_accum": args.grad_accum, "step_s": seconds,
            "tokens_per_s": tokens / seconds, "model_tflops": flops / 1e12,
            "mfu": flops / (n_dev * args.peak_tflops * 1e12), "loss": float(m["loss"]),
            "attention": args.attention, "mode": mode, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}


def _time_on_device(f, *xs, repeats: int, rounds: int = 3) -> float:
    """Seconds per call of ``f(*xs)`` with ``repeats`` calls chained inside one jitted loop
    (median of ``rounds`` loops): a kernel of tens of microseconds is timed without the host's
    dispatch and synchronisation in every call. Each call's first argument depends on the last
    call's output (``+ 0 * sum(out)``, which XLA does not fold for floats), so no call is hoisted
    and none computes only the part a smaller dependency would read."""
    import jax
    import jax.numpy as jnp

    def chained(x0, *rest):
        def body(_, x):
            out = jax.tree.leaves(f(x, *rest))[0]
            return x + (jnp.sum(out.astype(jnp.float32)) * 0).astype(x.dtype)  # all of it: no slice is sunk
        return jax.lax.fori_loop(0, repeats, body, x0)

    run = jax.jit(chained)
    _block(run(*xs))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        _block(run(*xs))
        times.append((time.perf_counter() - t0) / repeats)
    return statistics.median(times)


_HOST_LINES = ("XLA Modules", "XLA Ops", "Steps", "Source", "Framework Name Scope", "XLA TraceMe", "Launch Stats")


def device_kernel_times(f, *xs, calls: int = 10) -> dict[str, float] | None:
    """Seconds of GPU time per call of the compiled ``f(*xs)``, by kernel name: the durations of
    the kernels (and device copies) the profiler records on the GPU's streams over ``calls``
    calls, summed per name and divided by ``calls``; host launch gaps and loop synchronisation
    are not in it. None where no GPU plane is recorded (a CPU run)."""
    import glob
    import tempfile

    import jax

    if jax.default_backend() != "gpu":
        return None
    _block(f(*xs))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(calls):
                _block(f(*xs))
        files = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        if not files:
            return None
        data = jax.profiler.ProfileData.from_file(files[0])
    times: dict[str, float] = {}
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        lines = [ln for ln in plane.lines if ln.name not in _HOST_LINES]
        for line in [ln for ln in lines if ln.name.startswith("Stream")] or lines:
            for event in line.events:
                times[event.name] = times.get(event.name, 0.0) + event.duration_ns * 1e-9 / calls
        break
    return times or None


def bench_kernels(*, batch: int = 4, num_heads: int = 32, num_kv_heads: int = 8, head_dim: int = 128,
                  context: int = 131072, budget: int = 4096, block_size: int = 64, repeats: int = 20,
                  interpret: bool = False, seed: int = 0) -> list[dict]:
    """Decode-attention kernels against their baselines in one process: dense decode over a
    head-major bf16 cache (the Pallas kernel, XLA on the jnp reference, and cuDNN on its own
    sequence-major layout where there is a GPU), quantized decode over the same cache as packed
    per-token INT4 and INT2 codes (bytes and time also as ratios to the dense kernel's), then
    sparse decode of ``budget`` tokens chosen per (row, KV head) by ``page_select`` (Quest's bound
    from each page's key min/max; timed with the decode and alone, kernel and XLA, also over
    LServe's 16-token logical pages), and Squeezed's centroid scoring (one cluster per 20 keys,
    with its threshold).
    Each row: seconds (a call in a jitted loop of chained calls), kernel_seconds (the GPU's kernel
    time per call, from the profiler; None off a GPU) and kernel_breakdown (that time by kernel
    name), KV bytes it must read, bytes/s, and its
    largest deviation from
    the reference. ``interpret`` runs the Pallas kernel in interpret mode (a CPU check of the
    bench itself; its times mean nothing)."""
    import jax
    import jax.numpy as jnp

    from jaxkv.kernels.sparse_decode import dense_blocks, sparse_decode, sparse_decode_reference

    if num_heads % num_kv_heads or context % block_size or budget % block_size or not 0 < budget <= context:
        raise UserError("num_heads must be a multiple of num_kv_heads, context and budget multiples of "
                        f"block_size ({block_size}), 0 < budget <= context")
    b, kh, g, h, s = batch, num_kv_heads, num_heads // num_kv_heads, head_dim, context
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, kh, g, h), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, kh, s, h), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, kh, s, h), jnp.bfloat16)
    lengths = jnp.full((b,), s, jnp.int32)
    itemsize = 2
    impl = {"implementation": "pallas_gpu", "interpret": True} if interpret else {"implementation": "pallas_gpu"}
    all_idx, all_counts = dense_blocks(lengths, num_kv_heads=kh, num_slots=s, block_size=block_size)
    ref = jax.jit(lambda q, k, v: sparse_decode_reference(q, k, v, lengths, all_idx, all_counts,
                                                          block_size=block_size))
    want = ref(q, k, v)[0].astype(jnp.float32)
    rows = []

    def timed(f, *xs, repeats):  # interpret mode checks the bench itself: one round is enough
        loop = _time_on_device(f, *xs, repeats=repeats, rounds=1 if interpret else 3)
        return loop, (None if interpret else device_kernel_times(f, *xs))

    def row(name, times, nbytes, out=None, against=want, **extra):
        err = None if out is None else float(jnp.max(jnp.abs(out.astype(jnp.float32) - against)))
        seconds, by_kernel = times
        kernel_s = None if by_kernel is None else sum(by_kernel.values())
        r = {"kernel": name, "batch": b, "heads": f"{num_heads}/{kh}", "head_dim": h, "context": s,
             "seconds": seconds, "kernel_seconds": kernel_s, "kernel_breakdown": by_kernel, "kv_bytes": nbytes,
             "bytes_per_s": nbytes / seconds,
             "kernel_bytes_per_s": None if not kernel_s else nbytes / kernel_s, "max_abs_err": err,
             "device": jax.devices()[0].device_kind, "jax": jax.__version__, **extra}
        rows.append(r)
        return r

    dense_bytes = 2 * b * kh * s * h * itemsize
    dense = jax.jit(lambda q, k, v: sparse_decode(q, k, v, lengths, all_idx, all_counts, block_size=block_size,
                                                  **impl))
    row("dense decode, pallas_gpu", timed(dense, q, k, v, repeats=repeats), dense_bytes, dense(q, k, v)[0])
    row("dense decode, XLA (jnp reference)", timed(ref, q, k, v, repeats=repeats), dense_bytes, want)
    if jax.default_backend() == "gpu":
        ks_, vs_ = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, S, K, H]: cuDNN's own layout
        qs = q.reshape(b, 1, num_heads, h)
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
        out = cudnn(qs, ks_, vs_).reshape(b, kh, g, h)
        row("dense decode, cuDNN (sequence-major)", timed(cudnn, qs, ks_, vs_, repeats=repeats), dense_bytes, out)
        del ks_, vs_
    # quantized: the same cache as per-token packed INT4 / INT2 codes (MiKV's low tier), read packed
    from jaxkv.cache.quant import quantize
    from jaxkv.kernels.quantized_decode import quantized_decode, quantized_decode_reference

    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, kh, s))
    for bits in (4, 2):
        qk, qv = quantize(k, bits), quantize(v, bits)
        packed = (qk.codes, qk.scale[..., 0], qk.zero[..., 0], qv.codes, qv.scale[..., 0], qv.zero[..., 0], positions)
        q_ref = jax.jit(lambda q, *c: quantized_decode_reference(q, *c, bits=bits))
        q_kernel = jax.jit(lambda q, *c: quantized_decode(q, *c, bits=bits, block_size=block_size, **impl))
        q_want = q_ref(q, *packed)[0].astype(jnp.float32)
        nbytes = sum(int(a.size) * a.dtype.itemsize for a in packed)
        variants = [("", q_kernel)]
        if not interpret:  # the one-value-at-a-time unpack beside the default PTX one
            variants.append((", shift unpack", jax.jit(lambda q, *c: quantized_decode(
                q, *c, bits=bits, block_size=block_size, unpack="shift", **impl))))
        for label, fn in variants:
            r = row(f"quantized decode INT{bits}, pallas_gpu{label}", timed(fn, q, *packed, repeats=repeats),
                    nbytes, fn(q, *packed)[0], against=q_want)
            r["bytes_ratio_vs_dense"] = nbytes / dense_bytes
            r["time_ratio_vs_dense"] = r["seconds"] / rows[0]["seconds"]
            if r["kernel_seconds"] and rows[0]["kernel_seconds"]:
                r["kernel_time_ratio_vs_dense"] = r["kernel_seconds"] / rows[0]["kernel_seconds"]
        del qk, qv, packed
    # sparse: the top budget/block_size pages by Quest's bound from each page's key min/max (page_select)
    from jaxkv.kernels.page_select import page_select

    nb, pick = s // block_size, budget // block_size
    kb = k.reshape(b, kh, nb, block_size, h)
    kmin, kmax = jnp.min(kb, axis=3), jnp.max(kb, axis=3)  # kept current by the cache, not timed
    sub = max(1, block_size // 16)  # LServe's hierarchical paging: 16-token logical pages
    kb16 = k.reshape(b, kh, nb * sub, block_size // sub, h)
    kmin16, kmax16 = jnp.min(kb16, axis=3), jnp.max(kb16, axis=3)
    del kb, kb16
    sel_opts = {"interpret": True} if interpret else {}

    def select(q, kmin, kmax, implementation="pallas_gpu"):
        group = kmin.shape[2] // nb
        opts = sel_opts if implementation == "pallas_gpu" else {}
        return page_select(q, kmin, kmax, group=group, count=pick, implementation=implementation, **opts)

    counts = jnp.full((b, kh), pick, jnp.int32)
    sel = jax.jit(select)
    sel_ref = jax.jit(functools.partial(select, implementation="reference"))
    idx = sel(q, kmin, kmax)
    if not bool(jnp.all(idx == sel_ref(q, kmin, kmax))):
        raise AssertionError("page_select's kernel chose other pages than its reference")
    sparse = jax.jit(lambda q, k, v, idx: sparse_decode(q, k, v, lengths, idx, counts, block_size=block_size, **impl))
    both = jax.jit(lambda q, k, v, kmin, kmax: sparse_decode(q, k, v, lengths, select(q, kmin, kmax), counts,
                                                             block_size=block_size, **impl))
    sparse_want = sparse_decode_reference(q, k, v, lengths, idx, counts, block_size=block_size)[0].astype(jnp.float32)
    sparse_bytes = 2 * b * kh * budget * h * itemsize
    bound_bytes = 2 * b * kh * nb * h * itemsize
    row(f"sparse decode {budget} tokens, pallas_gpu", timed(sparse, q, k, v, idx, repeats=repeats), sparse_bytes,
        sparse(q, k, v, idx)[0], against=sparse_want)
    row(f"sparse decode {budget} tokens + selection, pallas_gpu",
        timed(both, q, k, v, kmin, kmax, repeats=repeats), sparse_bytes + bound_bytes,
        both(q, k, v, kmin, kmax)[0], against=sparse_want)
    row(f"selection alone ({block_size}-token pages), page_select pallas_gpu",
        timed(sel, q, kmin, kmax, repeats=repeats), bound_bytes)
    row(f"selection ({block_size}-token pages), XLA (bound, top_k)", timed(sel_ref, q, kmin, kmax, repeats=repeats),
        bound_bytes)
    if sub > 1:
        idx16 = sel(q, kmin16, kmax16)
        if not bool(jnp.all(idx16 == sel_ref(q, kmin16, kmax16))):
            raise AssertionError("page_select's kernel chose other pages than its reference")
        row(f"selection, LServe's {block_size // sub}-token logical pages, page_select pallas_gpu",
            timed(sel, q, kmin16, kmax16, repeats=repeats), bound_bytes * sub)
        row(f"selection, LServe's {block_size // sub}-token logical pages, XLA (bound, top_k)",
            timed(sel_ref, q, kmin16, kmax16, repeats=repeats), bound_bytes * sub)
        del kmin16, kmax16
    # Squeezed's centroid lookup: one cluster per 20 keys (its default centroid_share 0.05)
    from jaxkv.kernels.centroid_scores import centroid_scores, centroid_scores_reference

    n_c = max(1, s // 20)
    kc = jax.random.split(ks[0], 2)
    cent = jax.random.normal(kc[0], (b, kh, n_c, h), jnp.float32)
    counts = jax.random.randint(kc[1], (b, kh, n_c), 0, 40).astype(jnp.float32)
    thr = jnp.full((b,), 1.0 / s, jnp.float32)
    cs = jax.jit(lambda q, c, n: centroid_scores(q, c, n, thr, **impl))
    cs_ref = jax.jit(lambda q, c, n: centroid_scores_reference(q, c, n, thr))
    w_want = cs_ref(q, cent, counts)[0]
    cent_bytes = b * kh * n_c * (h + 1) * 4
    row(f"centroid scores + threshold, {n_c} clusters, pallas_gpu", timed(cs, q, cent, counts, repeats=repeats),
        cent_bytes, cs(q, cent, counts)[0], against=w_want)
    row(f"centroid scores + threshold, {n_c} clusters, XLA (jnp reference)",
        timed(cs_ref, q, cent, counts, repeats=repeats), cent_bytes, w_want, against=w_want)
    return rows


def bench_prefill(*, batch: int = 1, num_heads: int = 32, num_kv_heads: int = 8, head_dim: int = 128,
                  lengths: tuple[int, ...] = (8192, 32768), densities: tuple[float, ...] = (0.5, 0.25, 0.1),
                  documents: int = 8, block_q: int = 128, block_k: int = 64, num_warps: int = 4,
                  num_stages: int = 3, mask_block: int = 128, repeats: int = 5, interpret: bool = False,
                  implementations: tuple[str, ...] = ("pallas_gpu",), mosaic_block_k: int = 128,
                  mosaic_stages: int = 2, mosaic_programs: tuple[int | str | None, ...] = (None,),
                  seed: int = 0, progress=None) -> list[dict]:
    """Prefill attention (``jaxkv.kernels.block_sparse_attention``) against cuDNN in one process,
    bf16, token-major ``[B, T, N, H]``: (1) dense causal forward at each length; (2) block-sparse
    forward at each density (random ``mask_block``-square cells per row and KV head, non-causal)
    against cuDNN dense non-causal at the first length; (3) a packed row of ``documents`` ragged
    documents (segment ids), forward + backward, against cuDNN with the dense ``[B, 1, T, T]``
    mask and against cuDNN over each document alone (causal), at the first length. FLOPs are
    counted by hand over the visible blocks' share (4 B N H per visible query-key pair forward,
    3.5x that forward + backward). ``implementations``: the kernels' rows, each in turn
    (``pallas_gpu``: Triton, ``block_q x block_k``; ``mosaic_gpu``: Hopper, 128 x
    ``mosaic_block_k``, ``mosaic_stages`` K/V slots, the Triton backward; a row per entry of
    ``mosaic_programs``: None one CTA a tile, n persistent CTAs, ``"sms"`` one persistent CTA per
    streaming multiprocessor). Without a GPU the ``pallas_gpu`` rows run in interpret mode (a check
    of the bench); ``mosaic_gpu`` needs a Hopper GPU. ``progress``: called with each row as it is
    measured (the CLI prints it, so a run cut short keeps what it measured)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxkv.kernels.block_sparse_attention import MaskSpec, block_plan, block_sparse_attention

    if num_heads % num_kv_heads:
        raise UserError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if any(t % mask_block for t in lengths):
        raise UserError(f"every length must be a multiple of mask_block ({mask_block})")
    b, n, kh, h = batch, num_heads, num_kv_heads, head_dim
    gpu = jax.default_backend() == "gpu"
    bad = sorted(set(implementations) - {"pallas_gpu", "mosaic_gpu"})
    if bad or not implementations:
        raise UserError(f"implementations must be pallas_gpu and/or mosaic_gpu, got {list(implementations)}")
    kernels = {"pallas_gpu": {"implementation": "pallas_gpu", "block_q": block_q, "block_k": block_k,
                              "num_warps": num_warps, "num_stages": num_stages,
                              **({"interpret": True} if interpret else {})},
               "mosaic_gpu": {"implementation": "mosaic_gpu", "block_q": 128, "block_k": mosaic_block_k,
                              "stages": mosaic_stages, "num_warps": num_warps, "num_stages": num_stages}}
    sms = getattr(jax.devices()[0], "core_count", None) if gpu else None

    def programs(p):
        if p != "sms":
            return p
        if not sms:
            raise UserError("mosaic_programs 'sms' needs a GPU that reports its multiprocessor count")
        return int(sms)

    runs = [(name, programs(p)) for name in implementations
            for p in (mosaic_programs if name == "mosaic_gpu" else (None,))]
    kernels = {(name if p is None else f"{name}, {p} programs"):
               {**kernels[name], **({} if p is None else {"programs": p})} for name, p in runs}
    rows = []

    def timed(f, *xs):
        return _time_on_device(f, *xs, repeats=repeats, rounds=1 if interpret else 3)

    def row(name, t, seconds, flops, out=None, against=None, **extra):
        err = None if out is None else float(jnp.max(jnp.abs(out.astype(jnp.float32) - against.astype(jnp.float32))))
        rows.append({"kernel": name, "batch": b, "heads": f"{n}/{kh}", "head_dim": h, "length": t, "seconds": seconds,
                     "tflops": flops / seconds / 1e12, "max_abs_err": err, "device": jax.devices()[0].device_kind,
                     "jax": jax.__version__, **extra})
        if progress is not None:
            progress(rows[-1])
        return rows[-1]

    def inputs(t, key):
        ks = jax.random.split(jax.random.key(key), 3)
        return (jax.random.normal(ks[0], (b, t, n, h), jnp.bfloat16), jax.random.normal(ks[1], (b, t, kh, h), jnp.bfloat16),
                jax.random.normal(ks[2], (b, t, kh, h), jnp.bfloat16))

    cudnn = lambda **kw: jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kw))  # noqa: E731
    for t in lengths:  # (1) dense causal
        q, k, v = inputs(t, seed + t)
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        flops = 4 * b * n * h * t * (t + 1) / 2
        ref = cudnn(is_causal=True)(q, k, v) if gpu else None
        ours = []
        for impl, kernel in kernels.items():
            f = jax.jit(lambda q, k, v, kernel=kernel: block_sparse_attention(q, k, v, pos, pos, mask=MaskSpec(),
                                                                              **kernel))
            out = f(q, k, v)
            ours.append(row(f"causal forward, {impl}", t, timed(f, q, k, v), flops, out if gpu else None, ref))
        if gpu:
            r = row("causal forward, cuDNN", t, timed(cudnn(is_causal=True), q, k, v), flops)
            for o in ours:
                o["share_of_cudnn"] = o["tflops"] / r["tflops"]
        del q, k, v
    t = lengths[0]
    q, k, v = inputs(t, seed)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    dense_flops = 4 * b * n * h * t * t
    dense_s = timed(cudnn(), q, k, v) if gpu else None
    if gpu:
        row("non-causal forward, cuDNN", t, dense_s, dense_flops)
    rng = np.random.default_rng(seed)
    cells = t // mask_block
    for d in densities:  # (2) block-sparse
        sel = jnp.asarray(rng.random((b, kh, cells, cells)) < d)
        plan = block_plan(MaskSpec(causal=False), pos, pos, block_q=min(block_q, mask_block),
                          block_k=min(block_k, mask_block), block_mask=sel, mask_block=mask_block)
        real_d = float(jnp.mean(plan.density))
        want = block_sparse_attention(q, k, v, pos, pos, mask=MaskSpec(causal=False), block_mask=sel,
                                      mask_block=mask_block, implementation="reference") if t <= 8192 else None
        for impl, kernel in kernels.items():
            f = jax.jit(lambda q, k, v, sel, kernel=kernel: block_sparse_attention(
                q, k, v, pos, pos, mask=MaskSpec(causal=False), block_mask=sel, mask_block=mask_block, **kernel))
            out = f(q, k, v, sel)
            r = row(f"block-sparse forward, density {d}, {impl}", t, timed(f, q, k, v, sel), dense_flops * real_d,
                    out if want is not None else None, want, density=real_d)
            if gpu:
                r["time_vs_cudnn_dense"] = r["seconds"] / dense_s
                r["goal_time_vs_cudnn_dense"] = 1.25 * real_d
    # (3) a packed row of ragged documents, forward + backward
    cuts = np.sort(rng.choice(np.arange(1, t // 16), documents - 1, replace=False)) * 16
    lens = np.diff(np.concatenate([[0], cuts, [t]]))
    seg = jnp.asarray(np.broadcast_to(np.repeat(np.arange(documents), lens), (b, t)), jnp.int32)
    pairs = float(sum(int(m) * (int(m) + 1) / 2 for m in lens))
    flops = 3.5 * 4 * b * n * h * pairs  # backward: 2.5x the forward (five matmuls to two)
    w = jax.random.normal(jax.random.key(seed + 1), q.shape, jnp.bfloat16)

    def train(attend):  # dq, with dk and dv folded in (a timed call must compute all three)
        grad = jax.grad(lambda q, k, v: jnp.sum((attend(q, k, v) * w).astype(jnp.float32)), argnums=(0, 1, 2))

        def step(q, k, v):
            dq, dk, dv = grad(q, k, v)
            return dq + (0 * (jnp.sum(dk.astype(jnp.float32)) + jnp.sum(dv.astype(jnp.float32)))).astype(dq.dtype)
        return jax.jit(step)

    got = None
    for impl, kernel in kernels.items():
        ours = train(lambda q, k, v, kernel=kernel: block_sparse_attention(q, k, v, pos, pos, mask=MaskSpec(),
                                                                            q_segments=seg, k_segments=seg, **kernel))
        out = ours(q, k, v)[0]
        row(f"documents ({documents}) forward + backward, {impl}", t, timed(ours, q, k, v), flops,
            None if got is None else out, got, documents=[int(m) for m in lens])
        got = out if got is None else got
    if gpu:
        from jaxkv.attention import visibility_mask

        dmask = visibility_mask(pos, pos, q_segments=seg, k_segments=seg)  # [B, 1, T, T]
        dense_masked = train(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dmask, implementation="cudnn"))
        row(f"documents ({documents}) forward + backward, cuDNN dense mask", t, timed(dense_masked, q, k, v), flops,
            got, dense_masked(q, k, v)[0])
        starts = np.concatenate([[0], cuts])

        def separately(q, k, v):  # each document on its own, causal
            outs = [jax.nn.dot_product_attention(q[:, s:s + m], k[:, s:s + m], v[:, s:s + m], is_causal=True,
                                                 implementation="cudnn") for s, m in zip(starts, lens)]
            return jnp.concatenate(outs, axis=1)
        alone = train(separately)
        row(f"documents ({documents}) forward + backward, cuDNN per document", t, timed(alone, q, k, v), flops,
            got, alone(q, k, v)[0])
    return rows


def _parse_heads(text: str) -> tuple[int, int]:
    heads = text.split("/")
    try:
        q, kv = (int(h) for h in heads) if len(heads) == 2 else (0, 0)
    except ValueError:
        q = kv = 0
    if q < 1 or kv < 1 or q % kv:
        raise UserError(f"--heads must look like 32/8 (query/KV heads, positive, the query heads a multiple of "
                        f"the KV heads), got {text!r}")
    return q, kv


def _mosaic_programs(text: str) -> tuple[int | str | None, ...]:
    """``--mosaic-programs``: comma-separated ``tiles`` (one CTA a tile), ``sms`` (one persistent
    CTA per multiprocessor) or positive ints (that many persistent CTAs)."""
    out = []
    for item in text.split(","):
        if item in ("tiles", "sms"):
            out.append(None if item == "tiles" else item)
        elif item.isdigit() and int(item) > 0:
            out.append(int(item))
        else:
            raise UserError(f"--mosaic-programs must be comma-separated 'tiles', 'sms' or positive ints, got {text!r}")
    return tuple(out)


def _prefill_line(r: dict, file=None) -> None:
    """One ``bench prefill`` row as a line (to stderr while the bench runs, stdout in the table)."""
    err = "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.1e}"
    print(f"{r['kernel']:<56} {r['length']:>7} {r['seconds'] * 1e3:>9.3f} {r['tflops']:>8.1f} {err:>9}",
          file=sys.stderr if file is None else file, flush=True)


def _need_gpu(what: str) -> None:
    """The CLI's GPU benches refuse another backend by name (their library functions run a
    check of themselves in interpret mode instead)."""
    import jax

    if jax.default_backend() != "gpu":
        raise UserError(f"jaxkv bench {what} times GPU kernels; the backend here is {jax.default_backend()}")


def _main_prefill(args) -> int:
    _need_gpu("prefill")
    num_heads, num_kv = _parse_heads(args.heads)
    try:
        lengths = tuple(int(x) for x in args.lengths.split(","))
        densities = tuple(float(x) for x in args.densities.split(","))
    except (ValueError, IndexError):
        raise UserError(f"--lengths must look like 8192,32768 and --densities like 0.5,0.1; got "
                        f"{args.lengths!r}, {args.densities!r}") from None
    rows = bench_prefill(batch=args.batch, num_heads=num_heads, num_kv_heads=num_kv, head_dim=args.head_dim,
                         lengths=lengths, densities=densities, documents=args.documents, block_q=args.block_q,
                         block_k=args.block_k, num_warps=args.num_warps, num_stages=args.num_stages,
                         repeats=args.repeats, implementations=tuple(args.implementations.split(",")),
                         mosaic_block_k=args.mosaic_block_k, mosaic_stages=args.mosaic_stages,
                         mosaic_programs=_mosaic_programs(args.mosaic_programs), progress=_prefill_line)
    r0 = rows[0]
    print(f"device {r0['device']}, jax {r0['jax']}; batch {r0['batch']}, heads {r0['heads']}, head dim "
          f"{r0['head_dim']}, bf16")
    print(f"{'kernel':<56} {'length':>7} {'ms':>9} {'TFLOP/s':>8} {'max err':>9}")
    for r in rows:
        _prefill_line(r, file=sys.stdout)
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=2) + "\n")
    return 0


def kernel_ratios(rows: list[dict]) -> list[str]:
    """The goals' ratios from ``bench_kernels`` rows, by loop time and by kernel time: sparse
    decode (with its selection, and with the selection reused over 4 steps as LServe does) against
    cuDNN's dense decode, each quantized row's speed-up against the bytes it saves, and the
    centroid scoring's share of the sparse step."""
    def find(test):
        return next((r for r in rows if test(r["kernel"])), None)

    cudnn = find(lambda n: n.startswith("dense decode, cuDNN"))
    dense = find(lambda n: n.startswith("dense decode, pallas_gpu"))
    both = find(lambda n: n.startswith("sparse decode") and "+ selection" in n)
    sparse = find(lambda n: n.startswith("sparse decode") and "+ selection" not in n)
    sel = find(lambda n: n.startswith("selection alone"))
    cent = find(lambda n: n.startswith("centroid scores") and "pallas" in n)
    out = []
    for key, label in (("seconds", "loop"), ("kernel_seconds", "kernel")):
        if cudnn and both and sel and sparse and cudnn[key] and both[key] and sel[key] and sparse[key]:
            reused = sparse[key] + sel[key] / 4
            out.append(f"{label} time: cuDNN dense / (sparse + selection) = {cudnn[key] / both[key]:.1f}x; "
                       f"with the selection reused over 4 steps (sparse + selection / 4) {cudnn[key] / reused:.1f}x")
        for r in rows:
            if "quantized" in r["kernel"] and dense and r[key] and dense[key]:
                speed, saved = dense[key] / r[key], dense["kv_bytes"] / r["kv_bytes"]
                name = r["kernel"].replace(", pallas_gpu", "")
                out.append(f"{label} time: {name} {speed:.2f}x the bf16 kernel's speed for "
                           f"{saved:.2f}x fewer bytes (ratio {speed / saved:.2f}; goal >= 0.8)")
        if cent and sparse and cent[key] and sparse[key]:
            out.append(f"{label} time: centroid scoring {cent[key] / sparse[key]:.0%} of the sparse decode's time")
    return out


def _main_kernels(args) -> int:
    _need_gpu("kernels")
    num_heads, num_kv = _parse_heads(args.heads)
    rows = bench_kernels(batch=args.batch, num_heads=num_heads, num_kv_heads=num_kv, head_dim=args.head_dim,
                         context=args.context, budget=args.budget, block_size=args.block_size,
                         repeats=args.repeats)
    r0 = rows[0]
    print(f"device {r0['device']}, jax {r0['jax']}; batch {r0['batch']}, heads {r0['heads']}, head dim "
          f"{r0['head_dim']}, context {r0['context']}, bf16")
    print("us: a call inside a jitted loop of chained calls; kernel us: the GPU's kernel time per call "
          "(profiler), without the loop's launch gaps and synchronisation")
    print(f"{'kernel':<52} {'us':>9} {'kernel us':>10} {'KV MiB':>9} {'TB/s':>6} {'kernel TB/s':>11} {'max err':>9}")
    for r in rows:
        err = "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.1e}"
        ks = "-" if not r["kernel_seconds"] else f"{r['kernel_seconds'] * 1e6:.1f}"
        kb = "-" if not r["kernel_bytes_per_s"] else f"{r['kernel_bytes_per_s'] / 1e12:.2f}"
        print(f"{r['kernel']:<52} {r['seconds'] * 1e6:>9.1f} {ks:>10} {r['kv_bytes'] / 2**20:>9.1f} "
              f"{r['bytes_per_s'] / 1e12:>6.2f} {kb:>11} {err:>9}")
    for line in kernel_ratios(rows):
        print(line)
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=2) + "\n")
    return 0


def main(args) -> int:
    if getattr(args, "json", None):  # refused before any timing, not after a long run
        from jaxkv.fileio import check_output_path

        check_output_path(args.json, "--json")
    if args.bench == "kernels":
        return _main_kernels(args)
    if args.bench == "prefill":
        return _main_prefill(args)
    if args.bench in ("ssd", "mamba-decode"):
        from jaxkv.bench_mamba import main as mamba_main

        return mamba_main(args)
    if args.bench == "prepack":
        from jaxkv.bench_prepack import main as prepack_main

        return prepack_main(args)
    if args.bench == "train":
        row = bench_train(args)
        print(f"{row['devices']} x {row['device']} (mesh {args.mesh}): {row['tokens_per_s']:,.0f} tokens/s "
              f"({row['tokens_per_s_per_device']:,.0f} per device), step {row['step_s'] * 1e3:.1f} ms, "
              f"{row['model_tflops']:.0f} model TFLOP/s, MFU {row['mfu']:.1%} "
              f"(loss {row['loss']:.3f}; attention {row['attention']}, mode {row['mode']})")
        if args.json:
            write_text_atomic(args.json, json.dumps([row], indent=2) + "\n")
        return 0
    return _main_decode(args)


def bench_model(args):
    """``(name, config, params)`` of a bench command's ``--model`` (real weights) or ``--preset``
    (random weights), in ``--dtype``."""
    import jax
    import jax.numpy as jnp

    from jaxkv.checkpoints import load_checkpoint, resolve_model
    from jaxkv.config import preset as get_preset
    from jaxkv.models.llama import init_params

    jdtype = jnp.dtype(args.dtype)
    if args.model is not None:
        return str(args.model), *load_checkpoint(resolve_model(args.model), dtype=jdtype)
    config = get_preset(args.preset)
    return f"preset:{args.preset}", config, jax.jit(lambda k: init_params(config, k, dtype=jdtype))(jax.random.key(0))


def _main_decode(args) -> int:
    import jax

    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise UserError(f"--batch must be comma-separated integers, got {args.batch!r}") from None
    if any(b <= 0 for b in batches) or args.prompt_len <= 0 or args.new_tokens < 2 or args.repeats < 1:
        raise UserError("--batch, --prompt-len and --repeats must be positive, --new-tokens >= 2")
    name, config, params = bench_model(args)
    if args.prompt_len + args.new_tokens > config.max_position_embeddings:
        raise UserError(f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds the "
                        f"model's context of {config.max_position_embeddings} tokens")
    from jaxkv.cache import make_policy

    from jaxkv.cache.policy import split_policy_list

    methods = split_policy_list(args.methods)
    for m in methods:
        make_policy(m)  # an unknown policy is refused before any timing
    if not 0 < args.budget <= 1:
        raise UserError(f"--budget must be in (0, 1], got {args.budget}")
    bandwidth = measure_read_bandwidth()
    rows = []
    print(f"{name}: {config.num_params / 1e6:.1f} M params, {args.dtype}; "
          f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"measured read bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"{'method':<22} {'batch':>5} {'KV MiB':>9} {'ms/step':>8} {'tok/s':>9} {'roofline':>9} {'share':>6}")
    for m in methods:
        for b in batches:
            row = bench_decode(config=config, params=params, name=name, batch=b, prompt_len=args.prompt_len,
                               new_tokens=args.new_tokens, dtype=args.dtype, repeats=args.repeats,
                               bandwidth=bandwidth, method=m, budget=1.0 if m == "full" else args.budget)
            rows.append(row)
            print(f"{m:<22} {b:>5} {row['kv_bytes'] / 2**20:>9.2f} {row['ms_per_step']:>8.3f} "
                  f"{row['tokens_per_s']:>9.1f} {row['roofline_tokens_per_s']:>9.1f} "
                  f"{row['fraction_of_roofline']:>6.1%}", flush=True)
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=2) + "\n")
    return 0
