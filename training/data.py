"""Documents -> packed rows with segment ids and positions -> deterministic, resumable batches.

Packing fills rows of ``seq_len`` tokens with documents back to back; a document that does not
fit the rest of a row continues in the next row as a new segment whose positions continue
where it stopped (or, with ``split_documents=False``, starts the next row whole). Per token:

  ``segment_ids``  document index within the row (0, 1, ...), -1 on padding;
  ``positions``    'document' mode: offset within the document; 'continuous' mode: offset
                   within the row; -1 on padding;
  ``loss_mask``    1 where the token is a target the loss counts, 0 elsewhere. A document given
                   as ``(tokens, mask)`` keeps its mask (e.g. train on answers only); a plain
                   token list counts every token.

Batches: global row index ``i = step * batch_size + j``; epoch ``e = i // rows`` visits the rows
in a permutation seeded by ``(seed, e)``. A batch is therefore a function of the step alone,
so a resumed run reads exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Sequence

import numpy as np

from jaxkv.training.config import DataConfig, TrainConfigError

__all__ = ["PackedRows", "pack_documents", "Batches", "synthetic_documents", "passkey_documents", "text_documents",
           "task_mix_documents", "lookup_documents", "pydoc_documents", "recall_documents", "load_documents",
           "shuffle_documents", "RECALL_ENTROPY"]


@dataclasses.dataclass(frozen=True)
class PackedRows:
    tokens: np.ndarray       # [R, T] int32
    positions: np.ndarray    # [R, T] int32
    segment_ids: np.ndarray  # [R, T] int32
    loss_mask: np.ndarray    # [R, T] bool

    def __len__(self):
        return self.tokens.shape[0]


def pack_documents(docs: Sequence, cfg: DataConfig, *, pad_id: int = 0, anchor_id: int | None = None) -> PackedRows:
    """Pack ``docs`` (token-id sequences, or ``(tokens, loss_mask)`` pairs) into rows, laid out
    for ``cfg.attention`` (``training.config.ATTENTION_MODES``): 'full' gives a row one segment;
    'anchor' starts every row with ``anchor_id`` (the BOS) at position 0 in a segment of its
    own; 'anchor-bos' starts every document's segment with a copy of it at position 0 (and
    counts no loss on the token after a copy, as 'anchor' counts none across segments)."""
    t, mode = cfg.seq_len, cfg.attention
    if mode in ("anchor", "anchor-bos") and anchor_id is None:
        raise TrainConfigError(f"attention={mode!r} needs the anchor token's id (the model's BOS)")
    rows_tok, rows_pos, rows_seg, rows_mask = [], [], [], []
    tok = pos = seg = msk = None
    fill = nseg = ndoc = 0

    def new_row():
        nonlocal tok, pos, seg, msk, fill, nseg, ndoc
        tok = np.full(t, pad_id, np.int32); pos = np.full(t, -1, np.int32); seg = np.full(t, -1, np.int32)
        msk = np.zeros(t, bool)
        fill, nseg, ndoc = 0, 0, 0
        if mode == "anchor":  # the shared anchor: the row's first token, position 0, its own segment
            tok[0], pos[0], seg[0] = anchor_id, 0, 0
            fill, nseg = 1, 1

    def flush():
        rows_tok.append(tok); rows_pos.append(pos); rows_seg.append(seg); rows_mask.append(msk)
        new_row()

    new_row()
    head = int(mode == "anchor") + int(mode == "anchor-bos")  # slots a row or segment spends on the anchor
    for d, doc in enumerate(docs):
        if isinstance(doc, tuple):
            doc, mask = np.asarray(doc[0], np.int32), np.asarray(doc[1], bool)
            if mask.shape != doc.shape:
                raise TrainConfigError(f"document {d}: loss mask shape {mask.shape} != tokens {doc.shape}")
        else:
            doc = np.asarray(doc, np.int32)
            mask = np.ones(doc.shape, bool)
        if doc.ndim != 1:
            raise TrainConfigError(f"document {d} must be a 1-D sequence of token ids")
        if not cfg.split_documents:
            if len(doc) + head > t:
                raise TrainConfigError(f"document {d} has {len(doc)} tokens, more than seq_len ({t})"
                                       f"{' less the anchor' if head else ''}; with split_documents=False "
                                       "every document must fit one row")
            if fill > (mode == "anchor") and len(doc) + (mode == "anchor-bos") > t - fill:
                flush()
        start = 0
        while start < len(doc):
            if mode == "anchor-bos":
                if t - fill < 2:  # a segment needs its copy and at least one token
                    flush()
                tok[fill], pos[fill], seg[fill] = anchor_id, 0, nseg
                fill += 1
            n = min(len(doc) - start, t - fill)
            tok[fill:fill + n] = doc[start:start + n]
            msk[fill:fill + n] = mask[start:start + n]
            if mode == "anchor-bos":
                msk[fill] = False  # its target would follow the copy: 'anchor' counts none across segments
                pos[fill:fill + n] = 1 + ndoc + np.arange(n)  # the positions 'anchor' gives these tokens
            elif cfg.position_mode == "document":
                pos[fill:fill + n] = np.arange(start, start + n)
            else:
                pos[fill:fill + n] = np.arange(fill, fill + n)
            seg[fill:fill + n] = 0 if mode == "full" else nseg
            fill += n
            ndoc += n
            nseg += 1
            start += n
            if fill == t:
                flush()
    if fill > (mode == "anchor"):
        flush()
    if not rows_tok:
        raise TrainConfigError("no tokens to train on: every document is empty")
    return PackedRows(np.stack(rows_tok), np.stack(rows_pos), np.stack(rows_seg), np.stack(rows_mask))


class Batches:
    """``get(step)`` -> dict of ``[grad_accum, batch_size // grad_accum, T]`` arrays."""

    def __init__(self, rows: PackedRows, *, batch_size: int, grad_accum: int, seed: int):
        if batch_size > len(rows):
            raise TrainConfigError(f"batch_size ({batch_size}) exceeds the {len(rows)} packed rows of the data; "
                                   "add data or lower batch_size")
        self.rows, self.batch_size, self.grad_accum, self.seed = rows, batch_size, grad_accum, seed
        self._perm_epoch, self._perm = -1, None

    def _perm_for(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._perm_epoch = epoch
        return self._perm

    def get(self, step: int) -> dict:
        n = len(self.rows)
        idx = np.empty(self.batch_size, np.int64)
        for j in range(self.batch_size):
            i = step * self.batch_size + j
            idx[j] = self._perm_for(i // n)[i % n]
        shape = (self.grad_accum, self.batch_size // self.grad_accum, self.rows.tokens.shape[1])
        return {
            "tokens": self.rows.tokens[idx].reshape(shape),
            "positions": self.rows.positions[idx].reshape(shape),
            "segment_ids": self.rows.segment_ids[idx].reshape(shape),
            "loss_mask": self.rows.loss_mask[idx].reshape(shape),
        }


def synthetic_documents(name: str, *, vocab_size: int, seed: int, num_docs: int = 2000) -> list[np.ndarray]:
    """Named synthetic sources.

    ``count``: runs of consecutive ids ``a, a+1, a+2, ...`` (wrapping within 3..66) of 16-64
    tokens from a random start; every token after the first follows from the one before, so
    the loss falls from ln(vocab) towards zero within a few hundred steps of a tiny model.
    ``copy``: a random string of 8-24 tokens (from ids 3..66) written out 3 times; the repeats
    are predictable by looking back, so a model that learns to copy beats the unigram loss
    ln(64) by a wide margin.
    """
    rng = np.random.default_rng(seed)
    if name == "copy":
        hi = min(vocab_size, 67)
        docs = []
        for _ in range(num_docs):
            s = rng.integers(3, hi, rng.integers(8, 25))
            docs.append(np.concatenate([[1], s, s, s]).astype(np.int32))
        return docs
    if name == "count":
        span = min(vocab_size, 67) - 3
        docs = []
        for _ in range(num_docs):
            a, n = rng.integers(0, span), rng.integers(16, 65)
            docs.append((3 + (a + np.arange(n)) % span).astype(np.int32))
        return docs
    raise TrainConfigError(f"unknown synthetic data source {name!r}; known: copy, count, recall, recall-anywhere, "
                           f"{', '.join(SYNTHETIC_TEXT)}")


def text_documents(paths: Sequence[str], tokenizer) -> list[np.ndarray]:
    """Each file split on blank lines into documents, encoded with the tokenizer (BOS added by
    its post-processor when it has one)."""
    files: list[str] = []
    for p in paths:
        matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        if not matches:
            raise TrainConfigError(f"--data {p!r} matches no file")
        files.extend(matches)
    docs = []
    for f in files:
        if not os.path.isfile(f):
            raise TrainConfigError(f"--data {f!r} is not a file")
        try:
            with open(f, encoding="utf-8") as fh:
                text = fh.read()
        except UnicodeDecodeError as e:
            raise TrainConfigError(f"--data {f!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        for part in text.split("\n\n"):
            if part.strip():
                docs.append(np.asarray(tokenizer.encode(part.strip()).ids, np.int32))
    if not docs:
        raise TrainConfigError(f"--data {', '.join(paths)} holds no text")
    return docs


def passkey_documents(tokenizer, *, length: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` passkey prompts (``jaxkv.eval.tasks``' ``passkey`` task: a 5-digit key in the noise
    sentences, the question, ``Answer: The pass key is``) of at most ``length`` tokens each with
    the answer appended, the key at a random depth: the training side of Stuffed Mamba's
    capacity sweep, where T_recall is the longest context a model trained on these at
    T_train = ``length`` still retrieves the key in (``jaxkv analyze mamba-capacity``). Every
    document has its own seed, so no two hold the same key at the same depth."""
    from jaxkv.eval.tasks import answer_text, make_sample

    if tokenizer is None:
        raise TrainConfigError("synthetic:passkey is text: it needs a tokenizer (--tokenizer, or a --model "
                               "with a tokenizer.json)")
    if length < 80:
        raise TrainConfigError(f"synthetic:passkey needs rows of >= 80 tokens (prompt + answer), got {length}")
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(count):
        depth = float(rng.uniform(0.0, 1.0))
        sample = make_sample("passkey", tokenizer, length=length - 8, depth=depth, seed=seed * 1_000_003 + i)
        answer = tokenizer.encode(answer_text(sample.answers), add_special_tokens=False).ids
        docs.append(np.asarray(list(sample.prompt_ids) + list(answer), np.int32)[:length])
    return docs


def task_mix_documents(tokenizer, *, length: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` documents of the default model's RULER-style task mix (``jaxkv.eval.tasks``: the
    needle, passkey, variable-tracking and word-frequency tasks, weighted as its recipe weighs
    them), each a prompt with its answer and ``</s>``, of log-uniform length between 128 (or
    ``length``) and ``length`` tokens: most documents short, most tokens in long ones, as in a
    corpus. The loss counts every token, as the recipe does."""
    from jaxkv.training.default_model import DEFAULT_RECIPE, Phase, task_documents

    phase = Phase(seq_len=length, min_len=min(128, length), max_len=length, steps=1, batch_size=1, lr=1.0)
    docs = task_documents(tokenizer, DEFAULT_RECIPE, phase, count, seed=seed, phase_index=0, log_lengths=True)
    return [ids for ids, _ in docs]


def lookup_documents(tokenizer, *, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` look-up-and-copy documents of the default model's recipe (a line of random keys
    and numbers, `` |``, the line again), ``(tokens, loss_mask)`` with the loss on the copy."""
    from jaxkv.training.default_model import copy_documents

    eos = tokenizer.token_to_id("</s>")
    if eos is None:
        raise TrainConfigError("synthetic:lookup ends its documents with </s>, which the tokenizer lacks")
    return copy_documents(tokenizer, count, seed=seed, eos=eos)


def pydoc_documents(tokenizer, *, length: int, count: int | None) -> list[np.ndarray]:
    """Python's reference documentation (``pydoc_data.topics``, in every CPython) as documents of
    at most ``length`` tokens, the first ``count`` of them (all when None)."""
    from jaxkv.training.default_model import text_documents as topic_documents

    docs = topic_documents(tokenizer, chunk=length)
    return docs if count is None else docs[:count]


# synthetic:recall's language: BOS, query, the keys, then an order-1 Markov chain whose every state
# has three successors; the chain is fixed (its own seed), the samples follow --seed
_RECALL_BOS, _RECALL_QUERY, _RECALL_KEYS, _RECALL_STATES = 1, 2, range(3, 11), range(11, 59)
_RECALL_PROBS = (0.6, 0.25, 0.15)
_RECALL_RATE = 1 / 32  # the chance of a query after each chain token
RECALL_ENTROPY = float(-sum(p * np.log(p) for p in _RECALL_PROBS))  # nats per filler token: the loss floor


def _recall_chain() -> np.ndarray:
    """``[48, 48]`` cumulative transition probabilities: each state's likeliest successor is its
    next on one random cycle through all 48 (so every state is reached, from every other), the
    other two are random."""
    n = len(_RECALL_STATES)
    rng = np.random.default_rng(0x5EC411)
    cycle = rng.permutation(n)
    table = np.zeros((n, n))
    for i, a in enumerate(cycle):
        first = cycle[(i + 1) % n]
        rest = rng.choice(np.setdiff1d(np.arange(n), [first]), len(_RECALL_PROBS) - 1, replace=False)
        table[a, [first, *rest]] = _RECALL_PROBS
    cdf = np.cumsum(table, axis=1)
    cdf[cdf > 1 - 1e-9] = 1.0  # from each row's last successor on, so that u in [0, 1) never passes it
    return cdf


def recall_documents(*, vocab_size: int, length: int, count: int, seed: int,
                     anywhere: bool = False) -> list[np.ndarray]:
    """``count`` documents of ``length`` tokens: ``BOS, key``, then an order-1 Markov chain over 48
    ids (three successors each, probabilities 0.6 / 0.25 / 0.15: ``RECALL_ENTROPY`` = 0.94 nats
    per token) and ``QUERY, key``: the document's key (one of 8 ids) again. The query closes the
    document, as the question closes a passkey prompt (``synthetic:recall``), or with
    ``anywhere`` (``synthetic:recall-anywhere``) interrupts the chain at random, after each of
    its tokens with probability 1/32, so that no position tells when one comes. The chain is
    learnt from the token before; the key after a query only by holding the document's second
    token since. Unlike text, it cannot be memorised, so a model's loss past its training length
    measures what it does there, not what it remembers of the corpus (``jaxkv analyze
    mamba-states``). Ids 1-58 (``vocab_size`` >= 59); the chain is the same for every seed, the
    samples are not."""
    name = "recall-anywhere" if anywhere else "recall"
    if vocab_size <= _RECALL_STATES[-1]:
        raise TrainConfigError(f"synthetic:{name} uses token ids 1-{_RECALL_STATES[-1]}: it needs a vocabulary of "
                               f"at least {_RECALL_STATES[-1] + 1}, got {vocab_size}")
    if length < 5:
        raise TrainConfigError(f"synthetic:{name} needs documents of >= 5 tokens (BOS, key, chain, query, key), "
                               f"got {length}")
    cdf = _recall_chain()
    rng = np.random.default_rng([seed, 0x4EC4, int(anywhere)])
    docs = np.empty((count, length), np.int32)
    keys = rng.choice(np.asarray(_RECALL_KEYS), count)
    docs[:, 0], docs[:, 1] = _RECALL_BOS, keys
    state = rng.integers(0, len(_RECALL_STATES), count)
    answer = np.zeros(count, bool)  # the query came last: the key comes now
    query = np.zeros(count, bool)
    for i in range(2, length):
        if not anywhere:
            query, answer = np.full(count, i == length - 2), np.full(count, i == length - 1)
        chain = ~answer & ~query
        docs[:, i] = np.where(answer, keys, np.where(query, _RECALL_QUERY, _RECALL_STATES[0] + state))
        nxt = (rng.random(count)[:, None] >= cdf[state]).sum(axis=1)  # cdf ends at exactly 1: always < 48
        state = np.where(chain, nxt, state)
        if anywhere:
            answer, query = query, chain & (rng.random(count) < _RECALL_RATE) & (i < length - 2)
    return list(docs)


# synthetic:bindings' language: BOS, query, 40 keys, 16 values; a key is rebound only when its last
# write is at least _BIND_GAP tokens back, and a query asks for a key written in the last _BIND_RECENT
_BIND_KEYS, _BIND_VALUES = range(3, 43), range(43, 59)
_BIND_GAP, _BIND_RECENT = 64, 48


def bindings_documents(*, vocab_size: int, length: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` documents of ``length`` tokens: ``BOS``, then events, each a write ``key value``
    (binding one of 40 key ids to one of 16 value ids) or, with probability 1/2 once a key is
    bound, a query ``QUERY key value``: a key written in the last 48 tokens and its current
    value. A write takes a key whose last write is at least 64 tokens back (or never written), so
    no key is ever bound twice within 64 tokens: a model trained on rows of up to 64 tokens never
    needs to forget a binding, and past them it must, because a key's old values are stale.
    Stuffed Mamba's account of state collapse, as a task: a state large enough for everything
    within T_train learns no forgetting. The answer after a query is predictable only by holding
    the bindings; the other tokens are uniform over their choices. The last event may be cut by
    the document's end. Ids 1-58 (``vocab_size`` >= 59)."""
    if vocab_size <= _BIND_VALUES[-1]:
        raise TrainConfigError(f"synthetic:bindings uses token ids 1-{_BIND_VALUES[-1]}: it needs a vocabulary of at "
                               f"least {_BIND_VALUES[-1] + 1}, got {vocab_size}")
    if length < 2:
        raise TrainConfigError(f"synthetic:bindings needs documents of >= 2 tokens (BOS, an event), got {length}")
    rng = np.random.default_rng([seed, 0xB14D])
    keys, values = np.asarray(_BIND_KEYS), np.asarray(_BIND_VALUES)
    docs = np.empty((count, length), np.int32)
    for row in range(count):
        doc = [_RECALL_BOS]
        written = np.full(len(keys), -10 ** 9)  # the position of each key's last write
        bound = np.zeros(len(keys), np.int64)
        while len(doc) < length:
            at = len(doc)
            recent = np.flatnonzero(at - written <= _BIND_RECENT)
            if len(recent) and rng.random() < 0.5:
                k = rng.choice(recent)
                doc += [_RECALL_QUERY, int(keys[k]), int(values[bound[k]])]
            else:  # 40 keys, a write every 2 tokens at most: some key is always free
                k = rng.choice(np.flatnonzero(at - written >= _BIND_GAP))
                bound[k], written[k] = rng.integers(len(values)), at
                doc += [int(keys[k]), int(values[bound[k]])]
        docs[row] = doc[:length]
    return list(docs)


# synthetic sources that need a tokenizer (text), and those whose documents fill rows of a length
SYNTHETIC_TEXT = ("passkey", "tasks", "lookup", "pydoc")
_NEEDS_LENGTH = ("passkey", "tasks", "pydoc", "recall", "recall-anywhere", "bindings", "bindings-stream")
BINDINGS_STREAM_ROWS = 8  # synthetic:bindings-stream: one document spans this many rows


def _doc_tokens(doc) -> np.ndarray:
    return np.asarray(doc[0] if isinstance(doc, tuple) else doc)


def load_documents(spec: Sequence[str], *, tokenizer, vocab_size: int, seed: int, length: int | None = None,
                   synthetic_count: int = 2000) -> list:
    """Documents from ``spec``: text files / globs (split on blank lines, with ``tokenizer``) and
    named synthetic sources ``synthetic:NAME`` or ``synthetic:NAME:COUNT``: token-id sources
    ``copy``, ``count`` (``synthetic_documents``), ``recall`` and ``recall-anywhere``
    (``recall_documents`` of ``length`` tokens), ``bindings`` (``bindings_documents`` of
    ``length`` tokens) and ``bindings-stream`` (of ``BINDINGS_STREAM_ROWS x length`` tokens, so
    that packed rows cut them and most rows open mid-stream, with no BOS) and text sources, which need the tokenizer:
    ``passkey`` (``passkey_documents`` of ``length`` tokens), ``tasks`` (``task_mix_documents``
    up to ``length - 1`` tokens), ``lookup`` (``lookup_documents``; ``(tokens, loss_mask)`` pairs)
    and ``pydoc`` (``pydoc_documents`` of at most ``length - 1`` tokens; all of them without a
    COUNT): one token short of the row, so that a row that opens with an anchor holds the longest
    of them whole.
    The synthetic sources come in the order given, then the text files' documents."""
    docs: list = []
    files: list[str] = []
    for item in spec:
        if not item.startswith("synthetic:"):
            files.append(item)
            continue
        parts = item.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and not parts[2].isdigit()) or \
                (len(parts) == 3 and int(parts[2]) < 1):
            raise TrainConfigError(f"--data {item!r}: write synthetic:NAME or synthetic:NAME:COUNT (a positive "
                                   "count)")
        name = parts[1]
        count = int(parts[2]) if len(parts) == 3 else (None if name == "pydoc" else synthetic_count)
        if name in SYNTHETIC_TEXT:
            if tokenizer is None:
                raise TrainConfigError(f"--data {item!r} is text: it needs a tokenizer (--tokenizer, or a --model "
                                       "with a tokenizer.json)")
        if name in _NEEDS_LENGTH and length is None:
            raise TrainConfigError(f"--data {item!r} needs the row length its documents fill")
        if name in ("tasks", "pydoc") and length < 64:
            raise TrainConfigError(f"--data {item!r} needs rows of at least 64 tokens (--seq-len), got {length}")
        if name == "passkey":
            docs.extend(passkey_documents(tokenizer, length=length, count=count, seed=seed))
        elif name == "tasks":  # one token short of the row, so that a row with an anchor holds the longest whole
            docs.extend(task_mix_documents(tokenizer, length=length - 1, count=count, seed=seed))
        elif name == "lookup":
            docs.extend(lookup_documents(tokenizer, count=count, seed=seed))
        elif name == "pydoc":
            docs.extend(pydoc_documents(tokenizer, length=length - 1, count=count))
        elif name in ("recall", "recall-anywhere"):
            docs.extend(recall_documents(vocab_size=vocab_size, length=length, count=count, seed=seed,
                                         anywhere=name == "recall-anywhere"))
        elif name in ("bindings", "bindings-stream"):  # a stream spans rows: most of them open mid-stream
            rows = BINDINGS_STREAM_ROWS if name == "bindings-stream" else 1
            docs.extend(bindings_documents(vocab_size=vocab_size, length=length * rows, count=count, seed=seed))
        else:
            docs.extend(synthetic_documents(name, vocab_size=vocab_size, seed=seed, num_docs=count))
    if files:
        if tokenizer is None:
            raise TrainConfigError("text data needs a tokenizer (train from --model DIR with a tokenizer.json)")
        docs.extend(text_documents(files, tokenizer))
    top = max(int(_doc_tokens(d).max()) for d in docs if len(_doc_tokens(d)))
    if top >= vocab_size:
        raise TrainConfigError(f"the tokenizer produced id {top}, outside the model's vocab of {vocab_size}")
    return docs


def shuffle_documents(docs: Sequence, seed: int) -> list:
    """``docs`` in a random order seeded by ``seed``, so that documents of several sources share
    rows when packed (packing keeps the order it is given)."""
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(docs))
    return [docs[i] for i in order]


def data_fingerprint(documents) -> str:
    """SHA-256 over every document's token ids (and loss mask): what a resumed run checks, so an
    edited data file is noticed instead of silently training on other data."""
    import hashlib

    h = hashlib.sha256()
    for doc in documents:
        parts = doc if isinstance(doc, tuple) else (doc,)
        for part in parts:
            a = np.ascontiguousarray(np.asarray(part))
            h.update(f"{a.dtype.str}{a.shape};".encode())
            h.update(a.tobytes())
        h.update(b"|")
    return h.hexdigest()
