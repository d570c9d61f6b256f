"""jaxkv analyze: the similarity measure by hand, and the command on the default model."""

import json

import numpy as np

from jaxkv.cli import main
from jaxkv.eval.analyze import adjacent_layer_similarity


def test_adjacent_layer_similarity_hand_worked():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 8))
    valid = np.array([True, True, True, False, False])
    y = x.copy()
    y[:, 3:] = -x[:, 3:]  # differs only in empty slots: ignored
    sims = adjacent_layer_similarity([x, 2 * x, -x, y], valid)
    np.testing.assert_allclose(sims, [1.0, -1.0, -1.0], atol=1e-12)
    orth = np.zeros((1, 1, 2)); orth[..., 0] = 1
    other = np.zeros((1, 1, 2)); other[..., 1] = 1
    assert adjacent_layer_similarity([orth, other], np.array([True])).tolist() == [0.0]


def test_analyze_the_default_model(tmp_path, capsys):
    assert main(["analyze", "--out", str(tmp_path), "--length", "512", "--n-tokens", "128"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "analysis.json").read_text())
    assert f"retrieval heads: {report['retrieval_heads']['share']:.1%} of 8" in printed
    sim = report["adjacent_layer_similarity"]
    assert sim["layers"] == [1, 2, 3] and len(sim["key"]) == 3 and all(-1 <= s <= 1 for s in sim["key"] + sim["value"])
    heads = report["retrieval_heads"]
    assert np.array(heads["echo"]).shape == (4, 2) and len(heads["selected"]) == 4
    assert (tmp_path / "analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["analyze", "--out", str(tmp_path), "--length", "5000"]) == 2
