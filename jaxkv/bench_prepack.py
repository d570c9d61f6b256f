"""``jaxkv bench prepack``: prefill time and peak memory of padded, length-sorted and prepacked
batches, in one run.

The prompts: ``batches x prompts`` token lists whose lengths spread as MMLU prompts do (a long
right tail: most prompts short, a few long); with no dataset here they are drawn from a
log-normal (median ``--median`` tokens, shape 0.7, clipped to [16, ``--longest``]) with a fixed
seed, and the tokens are random ids (prefill cost does not depend on them).

Three ways to prefill the same prompts, each into a ``full`` cache sized for its batch:

  padded     the batches as they come, each right-padded to the bucket of its longest prompt;
  sorted     all prompts sorted by length first, then cut into batches (what an offline job can do);
  prepacked  the batches as they come, each packed into rows (``jaxkv.prepack``).

Time: the device time of each batch's jitted prefill (median of ``repeats``, compiled first),
plus the host's packing time for prepacked, summed over the batches. Peak memory: the largest
over the batches of XLA's count for the compiled prefill (arguments + outputs + temporaries -
donated aliases): parameters, the cache and the activations.
"""

from __future__ import annotations

import statistics
import time

__all__ = ["mmlu_like_lengths", "bench_prepack"]


def mmlu_like_lengths(n: int, *, median: int = 120, longest: int = 1024, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(median), 0.7, n)), 16, longest).astype(np.int64)


def _memory(compiled) -> tuple[int, int]:
    """(peak, temporaries) in bytes, as XLA counts the compiled call."""
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return int(peak), int(m.temp_size_in_bytes)


def bench_prepack(*, config, params, name: str, prompts: int = 64, batches: int = 4, median: int = 120,
                  longest: int = 1024, repeats: int = 5) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxkv.cache import init_cache
    from jaxkv.generate import _prefill, pad_prompts, split_donated
    from jaxkv.prepack import _packed_prefill, pack_prompts

    import binpacking  # noqa: F401  (imported here, not inside the first timed packing)

    lengths = mmlu_like_lengths(prompts * batches, median=median, longest=longest)
    rng = np.random.default_rng(1)
    data = [rng.integers(3, config.vocab_size, int(n)).tolist() for n in lengths]
    dtype = params["embed"]["embedding"].dtype
    chunk = lambda xs: [xs[i * prompts:(i + 1) * prompts] for i in range(batches)]  # noqa: E731
    plans = {"padded": chunk(data), "sorted": chunk(sorted(data, key=len)), "prepacked": chunk(data)}

    def padded_call(batch):
        tokens, positions, lens = pad_prompts(batch)

        def call():
            cache = init_cache(config, "full", batch=len(batch), max_len=tokens.shape[1] + 1, dtype=dtype)
            big, small, tree = split_donated(cache)
            return (params, tokens, positions, lens, big, small), {"config": config, "tree": tree}
        return _prefill, call, 0.0, tokens.size

    def packed_call(batch):
        pk = pack_prompts(batch)
        tp = pk.layout.gather.shape[1]
        last = np.array([p[-1] for p in batch], np.int32)

        def call():
            cache = init_cache(config, "full", batch=len(batch), max_len=tp + 1, dtype=dtype)
            big, small, tree = split_donated(cache)
            return ((params, pk.tokens, pk.positions, pk.layout, last, pk.lengths, big, small),
                    {"config": config, "tree": tree, "hold_out_last": False})
        return _packed_prefill, call, pk.pack_seconds, pk.tokens.size

    rows, firsts = [], {}
    for mode, plan in plans.items():
        seconds = host = 0.0
        peak = temp = slots = 0
        first = []
        for batch in plan:
            fn, call, pack_s, size = (packed_call if mode == "prepacked" else padded_call)(batch)
            args, kw = call()
            peak, temp = max((peak, temp), _memory(fn.lower(*args, **kw).compile()))
            times = []
            for r in range(repeats + 1):  # the first run compiles
                args, kw = call()
                jax.block_until_ready(args)
                t0 = time.perf_counter()
                logits, _ = fn(*args, **kw)
                jax.block_until_ready(logits)
                times.append(time.perf_counter() - t0)
            seconds += statistics.median(times[1:])
            host += pack_s
            slots += size
            first.append(np.asarray(jnp.argmax(logits, -1)))
        firsts[mode] = first
        real = int(lengths.sum())
        rows.append({
            "bench": "prepack", "model": name, "mode": mode, "prompts": prompts, "batches": batches,
            "prompt_tokens": real, "slots": slots, "padding_share": 1 - real / slots,
            "prefill_s": seconds + host, "device_s": seconds, "pack_s": host,
            "tokens_per_s": real / (seconds + host), "peak_bytes": peak, "temp_bytes": temp,
            "dtype": str(jnp.dtype(dtype)), "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
        })
    base = rows[0]
    for r in rows:
        r["speedup_vs_padded"] = base["prefill_s"] / r["prefill_s"]
        r["memory_vs_padded"] = r["peak_bytes"] / base["peak_bytes"]
    # the prepacked batches are the padded ones, packed: their first tokens should agree
    agree = np.mean(np.concatenate(firsts["prepacked"]) == np.concatenate(firsts["padded"]))
    rows[-1]["first_token_agreement"] = float(agree)
    return rows


def main(args) -> int:
    import json

    from jaxkv.bench import bench_model
    from jaxkv.fileio import write_text_atomic

    name, config, params = bench_model(args)
    rows = bench_prepack(config=config, params=params, name=name, prompts=args.prompts, batches=args.batches,
                         median=args.median, longest=args.longest, repeats=args.repeats)
    r0 = rows[0]
    print(f"{name}: {config.num_params / 1e6:.1f} M params, {r0['dtype']}; device {r0['device']}, jax {r0['jax']}; "
          f"{r0['batches']} batches of {r0['prompts']} prompts, {r0['prompt_tokens']} prompt tokens")
    print(f"{'mode':<10} {'padding':>8} {'prefill ms':>11} {'pack ms':>8} {'tok/s':>11} {'speedup':>8} "
          f"{'peak MiB':>9} {'temp MiB':>9} {'memory':>7}")
    for r in rows:
        print(f"{r['mode']:<10} {r['padding_share']:>8.1%} {r['prefill_s'] * 1e3:>11.2f} {r['pack_s'] * 1e3:>8.2f} "
              f"{r['tokens_per_s']:>11,.0f} {r['speedup_vs_padded']:>7.2f}x {r['peak_bytes'] / 2**20:>9.1f} "
              f"{r['temp_bytes'] / 2**20:>9.1f} {r['memory_vs_padded']:>6.2f}x")
    print(f"first tokens of the prepacked batches equal to the padded ones: {rows[-1]['first_token_agreement']:.1%}")
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=2))
    return 0
