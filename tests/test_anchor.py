"""AnchorAttention's training modes: packing per mode (hand-worked), the anchor mask rule, and the
two anchor forms (a shared anchor at the row's start; a BOS copy per document) proven equal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.attention import attend_dense, visibility_mask
from jaxkv.errors import UserError
from jaxkv.models.llama import forward
from jaxkv.training.config import ATTENTION_MODES, DataConfig, TrainConfigError
from jaxkv.training.data import pack_documents
from jaxkv.training.step import lm_loss

DOCS = [[5, 6, 7], [8, 9]]
P = -1  # padding


@pytest.mark.parametrize("mode, tokens, positions, segments, mask", [
    ("full", [5, 6, 7, 8, 9, 0, 0, 0], [0, 1, 2, 3, 4, P, P, P], [0, 0, 0, 0, 0, P, P, P], [1, 1, 1, 1, 1, 0, 0, 0]),
    ("intra", [5, 6, 7, 8, 9, 0, 0, 0], [0, 1, 2, 3, 4, P, P, P], [0, 0, 0, 1, 1, P, P, P], [1, 1, 1, 1, 1, 0, 0, 0]),
    ("reset", [5, 6, 7, 8, 9, 0, 0, 0], [0, 1, 2, 0, 1, P, P, P], [0, 0, 0, 1, 1, P, P, P], [1, 1, 1, 1, 1, 0, 0, 0]),
    ("anchor", [1, 5, 6, 7, 8, 9, 0, 0], [0, 1, 2, 3, 4, 5, P, P], [0, 1, 1, 1, 2, 2, P, P], [0, 1, 1, 1, 1, 1, 0, 0]),
    ("anchor-bos", [1, 5, 6, 7, 1, 8, 9, 0], [0, 1, 2, 3, 0, 4, 5, P], [0, 0, 0, 0, 1, 1, 1, P],
     [0, 0, 1, 1, 0, 0, 1, 0]),
])
def test_each_mode_packs_as_worked_by_hand(mode, tokens, positions, segments, mask):
    rows = pack_documents(DOCS, DataConfig(seq_len=8, attention=mode), anchor_id=1)
    assert rows.tokens[0].tolist() == tokens
    assert rows.positions[0].tolist() == positions
    assert rows.segment_ids[0].tolist() == segments
    assert rows.loss_mask[0].astype(int).tolist() == mask


def test_anchor_rows_restart_with_the_anchor_and_a_split_document_gets_a_copy():
    rows = pack_documents([[5, 6, 7, 8, 9, 10]], DataConfig(seq_len=4, attention="anchor"), anchor_id=1)
    assert rows.tokens.tolist() == [[1, 5, 6, 7], [1, 8, 9, 10]]
    assert rows.positions.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    bos = pack_documents([[5, 6, 7, 8, 9, 10]], DataConfig(seq_len=4, attention="anchor-bos"), anchor_id=1)
    assert bos.tokens.tolist() == [[1, 5, 6, 7], [1, 8, 9, 10]]
    with pytest.raises(TrainConfigError, match="anchor"):
        pack_documents(DOCS, DataConfig(seq_len=8, attention="anchor"))


def test_the_attention_mode_and_the_position_mode_agree_or_are_refused():
    assert DataConfig().attention == "reset" and DataConfig().position_mode == "document"
    assert DataConfig(position_mode="continuous").attention == "intra"
    assert DataConfig(attention="anchor").position_mode == "continuous"
    with pytest.raises(TrainConfigError, match="continuous positions"):
        DataConfig(attention="anchor", position_mode="document")
    with pytest.raises(TrainConfigError, match="attention must be one of"):
        DataConfig(attention="sliding")
    assert set(ATTENTION_MODES) == {"full", "intra", "reset", "anchor", "anchor-bos"}


def test_the_anchor_rule_opens_the_rows_first_key_to_every_document():
    pos = jnp.arange(6)[None]
    seg = jnp.array([[0, 1, 1, 1, 2, 2]])
    m = np.asarray(visibility_mask(pos, pos, q_segments=seg, k_segments=seg, anchor=True))[0, 0]
    assert np.flatnonzero(m[4]).tolist() == [0, 4]      # document 2's first token: the anchor and itself
    assert np.flatnonzero(m[3]).tolist() == [0, 1, 2, 3]
    assert np.flatnonzero(m[0]).tolist() == [0]          # the anchor sees only itself
    plain = np.asarray(visibility_mask(pos, pos, q_segments=seg, k_segments=seg))[0, 0]
    assert (m & ~plain).sum() == 5 and not (plain & ~m).any()  # only the anchor column is added (rows 1-5)
    with pytest.raises(UserError, match="segment"):
        visibility_mask(pos, pos, anchor=True)
    q = jnp.zeros((1, 6, 1, 1, 16))
    with pytest.raises(UserError, match="segment_ids"):
        attend_dense(q, q[:, :, :, 0], q[:, :, :, 0], pos, anchor=True)


def test_the_two_anchor_forms_give_the_same_hidden_states_and_the_same_loss(tiny_model):
    config, params = tiny_model
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, config.vocab_size, n).tolist() for n in (13, 7, 22, 5)]
    a = pack_documents(docs, DataConfig(seq_len=64, attention="anchor"), anchor_id=config.bos_token_id)
    b = pack_documents(docs, DataConfig(seq_len=64, attention="anchor-bos"), anchor_id=config.bos_token_id)
    assert len(a) == len(b) == 1
    run = lambda r, anchor: forward(params, jnp.asarray(r.tokens), jnp.asarray(r.positions), config=config,  # noqa: E731
                                    segment_ids=jnp.asarray(r.segment_ids), anchor=anchor, hidden_only=True)[0]
    ha, hb = np.asarray(run(a, True))[0], np.asarray(run(b, False))[0]
    doc_a = (a.segment_ids[0] > 0)                    # document tokens (not the anchor, not padding)
    doc_b = (b.positions[0] > 0)                      # document tokens (not the copies, not padding)
    np.testing.assert_allclose(hb[doc_b], ha[doc_a], atol=1e-5, rtol=0)
    np.testing.assert_allclose(hb[0], ha[0], atol=1e-5, rtol=0)  # every copy carries the anchor's state
    # without the anchor the documents differ (the anchor is really attended)
    hn = np.asarray(run(a, False))[0]
    assert np.abs(hn[doc_a] - ha[doc_a]).max() > 1e-3
    batch = lambda r: {k: jnp.asarray(getattr(r, k)) for k in ("tokens", "positions", "segment_ids", "loss_mask")}  # noqa: E731
    la, na = lm_loss(params, batch(a), config=config, compute_dtype=jnp.float32, attention="anchor")
    lb, nb = lm_loss(params, batch(b), config=config, compute_dtype=jnp.float32, attention="anchor-bos")
    assert float(na) == float(nb) == sum(len(d) - 1 for d in docs)
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-6)


def test_full_attention_crosses_documents_and_intra_does_not(tiny_model):
    config, params = tiny_model
    docs = [[5, 6, 7], [8, 9, 10]]
    out = {}
    for mode in ("full", "intra"):
        r = pack_documents(docs, DataConfig(seq_len=8, attention=mode))
        b = {k: jnp.asarray(getattr(r, k))[None] for k in ("tokens", "positions", "segment_ids", "loss_mask")}
        out[mode] = lm_loss(params, jax.tree.map(lambda x: x[0], b), config=config, compute_dtype=jnp.float32,
                            attention=mode)
    # full counts the boundary pair (7 -> 8) and sees across it; intra counts neither
    assert float(out["full"][1]) == 5 and float(out["intra"][1]) == 4
