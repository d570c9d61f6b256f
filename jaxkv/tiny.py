"""A tiny random-weight Llama checkpoint with a real BPE tokenizer, for tests and the quick start.

``jaxkv create-tiny DIR`` writes ``config.json``, ``model.safetensors`` and ``tokenizer.json``
(byte-level BPE trained here on a short built-in text, so any input string encodes). The weights
are random: generations are gibberish, but every code path (loading, tokenizing, prefill, the
decode loop, cache policies) runs for real.
"""

from __future__ import annotations

import os

import jax

from jaxkv.checkpoints import save_checkpoint
from jaxkv.config import preset
from jaxkv.models.llama import init_params

__all__ = ["SPECIAL_TOKENS", "train_bpe_tokenizer", "make_tokenizer", "create_tiny_checkpoint"]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 (the tiny preset's bos / eos)

_CORPUS = """\
jaxkv runs long-context language models and their key-value caches in JAX.
A cache policy decides which keys and values a model keeps while it generates text:
the full cache keeps every token, a streaming cache keeps a few sink tokens and a recent window.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2048 4096. The passkey is 71432. Remember it.
In the beginning the model reads the prompt once, then writes one token at a time.
"""


def train_bpe_tokenizer(texts, vocab_size: int, *, individual_digits: bool = False):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``, with ``SPECIAL_TOKENS`` at
    ids 0-2 and a post-processor that prepends ``<s>``. ``individual_digits`` makes every digit
    its own token (what number-copying tasks need). The one builder of jaxkv's own tokenizers
    (the tiny checkpoint's and the default model's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([byte_level, pre_tokenizers.Digits(individual_digits=True)])
                         if individual_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def make_tokenizer(vocab_size: int = 512):
    """The tiny checkpoint's tokenizer: ``train_bpe_tokenizer`` on a short built-in text."""
    return train_bpe_tokenizer(_CORPUS.splitlines() * 4, vocab_size)


def create_tiny_checkpoint(path: str | os.PathLike, *, seed: int = 0, overwrite: bool = False):
    """Write the ``tiny`` preset with random weights (seeded) and a tokenizer to ``path``."""
    config = preset("tiny")
    params = init_params(config, jax.random.key(seed))
    return save_checkpoint(path, config, params, tokenizer=make_tokenizer(config.vocab_size),
                           overwrite=overwrite)
