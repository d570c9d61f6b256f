"""Scratch probe: where does the batch-1 decode step of jaxkv spend its time?

Times variants of the decode loop (each from a randomly filled full cache, no prefill):
  baseline      jaxkv.generate.decode (while_loop with early stop + lax.cond sampling)
  greedy_while  same while_loop with early stop, argmax instead of the lax.cond
  greedy_fixed  lax.fori_loop with a static trip count, argmax, no early stop
and optionally the baseline at fewer layers, a jax.profiler trace of one decode (kernel count,
GPU busy time per step, idle gaps, top kernels), and the while-body op counts of the compiled HLO.

  PYTHONPATH=$PWD python benchmarks/probe_decode.py --variants baseline,greedy_fixed --profile
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache import init_cache
from jaxkv.cache.kv import KVCache
from jaxkv.config import preset as get_preset
from jaxkv.generate import decode
from jaxkv.models.llama import forward, init_params


def log(*a):
    print(*a, flush=True)


def make_cache_fn(config, batch, prompt_len, max_len, dtype):
    @jax.jit
    def make(key):
        cache = init_cache(config, "full", batch=batch, max_len=max_len, dtype=dtype)
        slots = jnp.arange(max_len, dtype=jnp.int32)
        pos = jnp.where(slots < prompt_len, slots, -1)
        layers = []
        for i, l in enumerate(cache.layers):
            k1, k2 = jax.random.split(jax.random.fold_in(key, i))
            layers.append(KVCache(
                k=jax.random.normal(k1, l.k.shape, dtype),
                v=jax.random.normal(k2, l.v.shape, dtype),
                positions=jnp.broadcast_to(pos, l.positions.shape),
            ))
        return cache.replace(layers=tuple(layers), prefilled=True)
    return make


def make_variant(kind, config, max_new_tokens):
    if kind == "baseline":
        def run(params, cache, first_logits, lengths):
            return decode(params, cache, first_logits, lengths, jax.random.key(0), np.float32(0),
                          np.float32(1), np.array([-2], np.int32), config=config,
                          max_new_tokens=max_new_tokens)
        run.lower = lambda *a: decode.lower(*a, jax.random.key(0), np.float32(0), np.float32(1),
                                            np.array([-2], np.int32), config=config,
                                            max_new_tokens=max_new_tokens)
        return run

    @functools.partial(jax.jit, donate_argnames=("cache",))
    def dec(params, cache, first_logits, lengths):
        b = first_logits.shape[0]
        first = jnp.argmax(first_logits, -1).astype(jnp.int32)
        out = jnp.full((b, max_new_tokens), -1, jnp.int32).at[:, 0].set(first)
        if kind == "greedy_while":
            def cond(c):
                step, _, _, done = c
                return (step < max_new_tokens) & ~jnp.all(done)

            def body(c):
                step, cache, out, done = c
                prev = out[:, step - 1]
                pos = jnp.where(done, -1, lengths + step - 1)
                logits, cache = forward(params, jnp.maximum(prev, 0)[:, None], pos[:, None], cache,
                                        config=config)
                tok = jnp.where(done, -1, jnp.argmax(logits[:, 0], -1).astype(jnp.int32))
                out = out.at[:, step].set(tok)
                return step + 1, cache, out, done | (tok == -2)

            done = jnp.zeros((b,), bool)
            _, cache, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, out, done))
        elif kind == "greedy_fixed":
            def body(step, c):
                cache, out = c
                prev = out[:, step - 1]
                pos = lengths + step - 1
                logits, cache = forward(params, prev[:, None], pos[:, None], cache, config=config)
                tok = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
                return cache, out.at[:, step].set(tok)

            cache, out = jax.lax.fori_loop(1, max_new_tokens, body, (cache, out))
        else:
            raise ValueError(kind)
        return out, cache

    def run(params, cache, first_logits, lengths):
        return dec(params, cache, first_logits, lengths)
    run.lower = dec.lower
    return run


# ------------------------------------------------------------------ HLO analysis
_SKIP = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast"}


def _opcode(line):
    _, _, rhs = line.partition(" = ")
    rhs = rhs.strip()
    if rhs.startswith("("):
        depth = 0
        for i, ch in enumerate(rhs):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                rhs = rhs[i + 1:].strip()
                break
    else:
        rhs = rhs.split(" ", 1)[1] if " " in rhs else rhs
    m = re.match(r"([\w\-]+)\(", rhs)
    return m.group(1) if m else "?"


def hlo_summary(text):
    comps, cur = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            name = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            cur = name.lstrip("%")
            comps[cur] = []
        elif line.startswith("}"):
            cur = None
        elif cur is not None and " = " in line:
            comps[cur].append(line)
    result = {}
    for cname, lines in comps.items():
        for l in lines:
            if _opcode(l) == "while":
                body = re.search(r"body=%?([\w.\-]+)", l).group(1)
                ops = collections.Counter(_opcode(x) for x in comps.get(body, []))
                kernels = {k: v for k, v in ops.items() if k not in _SKIP}
                targets = collections.Counter(
                    m.group(1) for x in comps.get(body, [])
                    for m in [re.search(r'custom_call_target="([^"]+)"', x)] if m)
                copies = []
                for x in comps.get(body, []):
                    if _opcode(x) in ("copy", "copy-start"):
                        m = re.search(r"= \(?\w+\[([\d,]*)\]", x)
                        n = int(np.prod([int(d) for d in m.group(1).split(",") if d])) if m else 0
                        copies.append((n, x.strip()[:160]))
                copies = [f"{n} elems: {c}" for n, c in sorted(copies, reverse=True)[:6]] + [f"{len(copies)} copies in all"]
                # ops inside called computations (conditional branches, calls)
                nested = collections.Counter()
                for x in comps.get(body, []):
                    for m in re.finditer(r"(?:branch_computations=\{([^}]*)\}|to_apply=%?([\w.\-]+)|true_computation=%?([\w.\-]+)|false_computation=%?([\w.\-]+))", x):
                        names = [n for g in m.groups() if g for n in g.replace("%", "").split(",")]
                        for n in names:
                            n = n.strip()
                            nested[n] = sum(1 for y in comps.get(n, []) if _opcode(y) not in _SKIP)
                result[body] = {"ops": dict(ops), "non_trivial": sum(kernels.values()),
                                "custom_call_targets": dict(targets), "copies": copies[:20],
                                "nested_non_trivial": dict(nested)}
    return result


# ------------------------------------------------------------------ profile analysis
def profile_summary(trace_dir, steps):
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return {"error": "no xplane.pb"}
    pd = jax.profiler.ProfileData.from_serialized_xspace(open(files[0], "rb").read())
    out = {"lines": {}}
    intervals, by_name = [], collections.defaultdict(lambda: [0, 0.0])
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            evs = list(line.events)
            out["lines"][f"{plane.name}|{line.name}"] = len(evs)
            if not line.name.startswith("Stream"):
                continue
            for e in evs:
                s, d = float(e.start_ns), float(e.duration_ns)
                intervals.append((s, s + d))
                by_name[e.name][0] += 1
                by_name[e.name][1] += d
    if not intervals:
        return out
    intervals.sort()
    merged = [list(intervals[0])]
    for s, e in intervals[1:]:
        if s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    busy = sum(e - s for s, e in merged)
    span = merged[-1][1] - merged[0][0]
    gaps = [merged[i + 1][0] - merged[i][1] for i in range(len(merged) - 1)]
    gaps_np = np.array(gaps) if gaps else np.zeros(1)
    out.update({
        "events": len(intervals), "events_per_step": len(intervals) / steps,
        "span_ms_per_step": span / steps / 1e6, "busy_ms_per_step": busy / steps / 1e6,
        "kernel_sum_ms_per_step": sum(v[1] for v in by_name.values()) / steps / 1e6,
        "idle_ms_per_step": (span - busy) / steps / 1e6,
        "gaps_ge_20us_per_step": float((gaps_np >= 2e4).sum()) / steps,
        "gaps_ge_20us_ms_per_step": float(gaps_np[gaps_np >= 2e4].sum()) / steps / 1e6,
        "gaps_lt_20us_ms_per_step": float(gaps_np[gaps_np < 2e4].sum()) / steps / 1e6,
        "median_gap_us": float(np.median(gaps_np)) / 1e3,
        "top": sorted(((n, c / steps, t / steps / 1e3) for n, (c, t) in by_name.items()),
                      key=lambda r: -r[2])[:25],
    })
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke test)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--variants", default="baseline,greedy_while,greedy_fixed")
    ap.add_argument("--layers", default="", help="comma-separated layer counts for the baseline")
    ap.add_argument("--profile", default="", help="comma-separated variants to profile")
    ap.add_argument("--profile-batch", default="", help="also profile the baseline at these batches")
    ap.add_argument("--hlo", default="", help="comma-separated variants whose while body to count")
    ap.add_argument("--hlo-dump", default="", help="write the baseline's optimized HLO here")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="")
    ap.add_argument("--label", default="")
    args = ap.parse_args()

    config = get_preset(args.preset)
    if args.tiny:
        config = config.replace(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                                num_heads=4, num_kv_heads=2, head_dim=32)
    dtype = jnp.bfloat16
    log(f"[{args.label}] device {jax.devices()[0].device_kind} jax {jax.__version__} "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    results = {"label": args.label, "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": []}
    steps = args.new_tokens - 1
    max_len = args.prompt_len + args.new_tokens
    params_cache = {}

    def get_params(cfg):
        if cfg not in params_cache:
            params_cache.clear()
            params_cache[cfg] = jax.block_until_ready(
                jax.jit(lambda k: init_params(cfg, k, dtype=dtype))(jax.random.key(0)))
        return params_cache[cfg]

    memo = {}

    def setup(kind, cfg, batch):
        params = get_params(cfg)
        if ("cache", cfg, batch) not in memo:
            memo["cache", cfg, batch] = make_cache_fn(cfg, batch, args.prompt_len, max_len, dtype)
        if (kind, cfg) not in memo:
            memo[kind, cfg] = make_variant(kind, cfg, args.new_tokens)
        make, fn = memo["cache", cfg, batch], memo[kind, cfg]
        first = jax.random.normal(jax.random.key(1), (batch, cfg.vocab_size), jnp.float32)
        lengths = jnp.full((batch,), args.prompt_len, jnp.int32)
        return params, make, fn, first, lengths

    def time_variant(kind, cfg, batch, label):
        params, make, fn, first, lengths = setup(kind, cfg, batch)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, make(jax.random.key(2)), first, lengths))
        compile_s = time.perf_counter() - t0
        ts = []
        for r in range(args.repeats):
            cache = jax.block_until_ready(make(jax.random.key(3 + r)))
            t0 = time.perf_counter()
            out, _ = fn(params, cache, first, lengths)
            jax.block_until_ready(out)
            ts.append(time.perf_counter() - t0)
        sec = statistics.median(ts)
        row = {"variant": label, "batch": batch, "layers": cfg.num_layers,
               "ms_per_step": 1e3 * sec / steps, "spread_ms": 1e3 * (max(ts) - min(ts)) / steps,
               "tok_s": batch * steps / sec, "first_run_s": compile_s}
        results["rows"].append(row)
        log(f"  {label:<22} b={batch:<3} L={cfg.num_layers:<2} {row['ms_per_step']:8.3f} ms/step "
            f"(spread {row['spread_ms']:.3f})  {row['tok_s']:9.1f} tok/s  first run {compile_s:.1f}s")
        return params, make, fn, first, lengths

    def do_profile(kind, cfg, batch):
        params, make, fn, first, lengths = setup(kind, cfg, batch)
        jax.block_until_ready(fn(params, make(jax.random.key(2)), first, lengths))
        cache = jax.block_until_ready(make(jax.random.key(9)))
        d = tempfile.mkdtemp()
        try:
            t0 = time.perf_counter()
            with jax.profiler.trace(d):
                out, _ = fn(params, cache, first, lengths)
                jax.block_until_ready(out)
            wall = time.perf_counter() - t0
            s = profile_summary(d, steps)
        except Exception as e:  # noqa: BLE001
            log(f"  profile {kind} b={batch} failed: {type(e).__name__}: {e}")
            return
        s["wall_ms_per_step_profiled"] = 1e3 * wall / steps
        results[f"profile_{kind}_b{batch}"] = s
        log(f"  PROFILE {kind} b={batch}: lines {s.get('lines')}")
        if "events" in s:
            log(f"    events/step {s['events_per_step']:.1f}; per step: span {s['span_ms_per_step']:.3f} ms, "
                f"GPU busy {s['busy_ms_per_step']:.3f} ms, idle {s['idle_ms_per_step']:.3f} ms "
                f"(gaps>=20us: {s['gaps_ge_20us_per_step']:.2f}/step = {s['gaps_ge_20us_ms_per_step']:.3f} ms; "
                f"small gaps {s['gaps_lt_20us_ms_per_step']:.3f} ms; median gap {s['median_gap_us']:.1f} us)")
            for n, c, us in s["top"]:
                log(f"    {us:9.1f} us/step  {c:6.1f}/step  {n[:110]}")

    for kind in [v for v in args.variants.split(",") if v]:
        time_variant(kind, config, args.batch, kind)
    for L in [int(x) for x in args.layers.split(",") if x]:
        time_variant("baseline", config.replace(num_layers=L), args.batch, f"baseline_L{L}")
    for kind in [v for v in args.hlo.split(",") if v]:
        params, make, fn, first, lengths = setup(kind, config, args.batch)
        text = fn.lower(params, make(jax.random.key(2)), first, lengths).compile().as_text()
        summ = hlo_summary(text)
        results[f"hlo_{kind}"] = summ
        for body, s in summ.items():
            log(f"  HLO {kind} while body {body}: {s['non_trivial']} non-trivial top-level ops {s['ops']}")
            log(f"      custom-call targets {s['custom_call_targets']}; nested {s['nested_non_trivial']}")
            for c in s["copies"]:
                log(f"      copy: {c}")
        if kind == "baseline" and args.hlo_dump:
            with open(args.hlo_dump, "w") as f:
                f.write(text)
    for kind in [v for v in args.profile.split(",") if v]:
        do_profile(kind, config, args.batch)
    for b in [int(x) for x in args.profile_batch.split(",") if x]:
        do_profile("baseline", config, b)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
