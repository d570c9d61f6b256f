"""The ``jaxkv`` command.

  jaxkv generate --model DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-p P]
                 [--seed S] [--cache full|streaming] [--cache-arg NAME=VALUE ...]
                 [--dtype float32|bfloat16] [--json]
  jaxkv create-tiny DIR [--seed S] [--overwrite]
  jaxkv bench decode [--preset llama-1b] [--batch 1,32] ...

User errors (bad path, corrupt file, prompt too long, bad policy parameters) print one line,
``jaxkv: error: ...``, and exit with status 2; no traceback (set ``JAXKV_TRACEBACK=1`` to see one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["main"]


class UserError(Exception):
    """An error caused by the command's input; reported in one line."""


def _parse_cache_args(items: list[str]) -> dict:
    params = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise UserError(f"--cache-arg must look like NAME=VALUE, got {item!r}")
        try:
            params[name] = json.loads(raw)
        except json.JSONDecodeError:
            params[name] = raw
    return params


def _cmd_generate(args) -> int:
    import jax
    import jax.numpy as jnp

    from jaxkv.checkpoints import load_checkpoint, load_tokenizer
    from jaxkv.generate import generate

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    config, params = load_checkpoint(args.model, dtype=dtype)
    tokenizer = load_tokenizer(args.model)
    prompt_ids = tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        raise UserError("--prompt encodes to no tokens")
    result = generate(
        params, config, [prompt_ids],
        max_new_tokens=args.max_new_tokens,
        policy=args.cache, policy_params=_parse_cache_args(args.cache_arg),
        temperature=args.temperature, top_p=args.top_p, key=jax.random.key(args.seed),
    )
    output_ids = result.tokens[0]
    text = tokenizer.decode(output_ids, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"prompt_ids": prompt_ids, "output_ids": output_ids, "text": text,
                          "cache": args.cache, "cache_bytes": result.cache_nbytes}))
    else:
        print(text)
    return 0


def _cmd_create_tiny(args) -> int:
    from jaxkv.tiny import create_tiny_checkpoint

    path = create_tiny_checkpoint(args.dir, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote a tiny random-weight checkpoint to {path}")
    return 0


def _cmd_bench(args) -> int:
    from jaxkv import bench

    return bench.main(args)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from jaxkv.cache import available_policies

    parser = argparse.ArgumentParser(prog="jaxkv", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from an HF checkpoint folder")
    g.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors, tokenizer.json)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_positive_int, default=32)
    g.add_argument("--temperature", type=_nonnegative_float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    g.add_argument("--cache", default="full", choices=available_policies(), help="cache policy")
    g.add_argument("--cache-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="a cache-policy parameter, e.g. --cache-arg window=256 (repeatable)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=_cmd_generate)

    c = sub.add_parser("create-tiny", help="write a tiny random-weight checkpoint (tests, quick start)")
    c.add_argument("dir")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_cmd_create_tiny)

    b = sub.add_parser("bench", help="GPU benchmarks (see BENCHMARKS.md)")
    from jaxkv import bench

    bench.add_arguments(b)
    b.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from jaxkv.checkpoints import CheckpointError
    from jaxkv.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UserError, CheckpointError, ConfigError, ValueError, OSError) as e:
        if os.environ.get("JAXKV_TRACEBACK"):
            raise
        print(f"jaxkv: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
