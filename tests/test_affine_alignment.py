"""AffineAlignment: ridge (in memory and streamed), lambda selection, SGD, metrics, checkpoints."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import tiny_model

from models.errors import ModelLoadError
from models.learned.affine_alignment import (
    AffineAlignment,
    RidgeAccumulator,
    alignment_metrics,
    fit_ridge,
    fit_ridge_stream,
    fit_sgd,
    load_alignment,
    save_alignment,
)

HD, HT = 12, 8


def planted(n: int, noise: float, seed: int = 0, hd: int = HD, ht: int = HT):
    """x [n, hd] with uneven scales and a non-zero mean, y = W x + b + noise; returns (x, y, W, b)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(ht, hd, generator=g)
    b = torch.randn(ht, generator=g)
    x = torch.randn(n, hd, generator=g) * torch.linspace(0.5, 3.0, hd) + 2.0
    y = x @ w.T + b + noise * torch.randn(n, ht, generator=g)
    return x, y, w, b


def batched(x, y, size):
    return lambda: ((x[i:i + size], y[i:i + size]) for i in range(0, len(x), size))


def test_ridge_recovers_planted_map():
    x, y, w, b = planted(3000, 0.01)
    xv = planted(1000, 0.01, seed=1)[0]  # same input law; y from the *same* planted map
    yv = xv @ w.T + b + 0.01 * torch.randn(1000, HT, generator=torch.Generator().manual_seed(9))
    a, lam, scores = fit_ridge(x, y, xv, yv)
    assert torch.allclose(a.weight, w, atol=2e-3) and torch.allclose(a.bias, b, atol=1e-2)
    assert scores[lam] > 0.99 and a.meta["val_r2"] == scores[lam]
    assert set(scores) == {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0}
    m = alignment_metrics(a, xv, yv)
    assert m["r2"] > 0.99 and m["cosine"] > 0.99 and m["mse"] < 1e-3
    assert math.isclose(m["r2"], scores[lam], rel_tol=1e-9, abs_tol=1e-9)  # closed-form val R^2 == direct


def test_streaming_accumulator_matches_in_memory():
    x, y, _, _ = planted(1000, 0.5)
    full, parts = RidgeAccumulator(), RidgeAccumulator()
    full.update(x, y)
    for xb, yb in batched(x.double(), y.double(), 97)():
        parts.update(xb, yb)
    for lam in (1e-6, 0.1):
        a, b = full.solve(lam), parts.solve(lam)
        assert torch.allclose(a.weight, b.weight, atol=1e-6) and torch.allclose(a.bias, b.bias, atol=1e-5)
    xv, yv, _, _ = planted(300, 0.5, seed=2)
    mem = fit_ridge(x, y, xv, yv, lambdas=(1e-3, 1.0))
    stream = fit_ridge_stream(batched(x, y, 128), batched(xv, yv, 50), lambdas=(1e-3, 1.0))
    assert mem[1] == stream[1] and torch.allclose(mem[0].weight, stream[0].weight, atol=1e-6)
    assert all(math.isclose(mem[2][k], stream[2][k], rel_tol=1e-9) for k in mem[2])


def test_lambda_selection():
    # Clean, plentiful data: the least penalty wins. Few noisy rows, many weak inputs: shrinkage wins.
    x, y, w, b = planted(2000, 0.01)
    xv, _, _, _ = planted(500, 0.01, seed=1)
    _, lam_clean, scores = fit_ridge(x, y, xv, xv @ w.T + b)
    assert lam_clean == max(scores, key=scores.get) and lam_clean <= 1e-4
    g = torch.Generator().manual_seed(3)
    wn = 0.05 * torch.randn(HT, 40, generator=g)
    xs, xv2 = torch.randn(30, 40, generator=g), torch.randn(2000, 40, generator=g)
    ys, yv2 = xs @ wn.T + torch.randn(30, HT, generator=g), xv2 @ wn.T + torch.randn(2000, HT, generator=g)
    _, lam_noisy, scores = fit_ridge(xs, ys, xv2, yv2)
    assert lam_noisy == max(scores, key=scores.get) and lam_noisy >= 0.1


def test_sgd_agrees_with_ridge():
    x, y, _, _ = planted(2000, 0.3)
    ridge, _, _ = fit_ridge(x, y, x, y, lambdas=(1e-9,))
    def shuffled():  # reshuffles every epoch with torch's RNG, which fit_sgd seeds
        perm = torch.randperm(len(x))
        return ((x[perm[i:i + 100]], y[perm[i:i + 100]]) for i in range(0, len(x), 100))

    losses = []
    a = fit_sgd(shuffled, HD, HT, epochs=20, lr=0.05, progress=lambda s, l: losses.append(l))
    rel = float((a.weight - ridge.weight).norm() / ridge.weight.norm())
    assert rel < 0.02, rel
    assert abs(alignment_metrics(a, x, y)["r2"] - alignment_metrics(ridge, x, y)["r2"]) < 1e-3
    assert len(losses) == 20 * 20 and losses[-1] < losses[0]
    again = fit_sgd(shuffled, HD, HT, epochs=20, lr=0.05)
    assert torch.equal(a.weight, again.weight) and torch.equal(a.bias, again.bias)  # deterministic with seed
    warm = fit_sgd(shuffled, HD, HT, epochs=1, lr=1e-3, init=ridge)  # init in original coordinates is kept
    assert float((warm.weight - ridge.weight).norm() / ridge.weight.norm()) < 0.02


def test_r2_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    x, y, _, _ = planted(500, 2.0)
    y[:, 3] = 1.5  # a constant target dimension: sklearn gives it weight 0
    a = AffineAlignment(HD, HT)
    with torch.no_grad():
        a.weight.normal_(generator=torch.Generator().manual_seed(1))
        a.bias.normal_(generator=torch.Generator().manual_seed(2))
    pred = a(x).detach()
    want = sklearn.r2_score(y.numpy(), pred.numpy(), multioutput="variance_weighted")
    got = alignment_metrics(a, x, y, batch=64)
    assert math.isclose(got["r2"], want, rel_tol=1e-6, abs_tol=1e-6)
    acc = RidgeAccumulator()
    acc.update(x, y)
    assert math.isclose(acc.r2(a), want, rel_tol=1e-6, abs_tol=1e-6)


def test_top1_agreement_identity():
    g = torch.Generator().manual_seed(0)
    x, head = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    target_next = (x @ head.T).argmax(-1)
    draft_next = target_next.clone()
    draft_next[:30] = (draft_next[:30] + 1) % 50
    m = alignment_metrics(AffineAlignment.identity(16), x, x.clone(), head, target_next, draft_next, batch=64)
    assert m["top1_agreement"] == 1.0 and m["target_top1_check"] == 1.0
    assert math.isclose(m["draft_top1_agreement"], 0.9) and math.isclose(m["identity_r2"], 1.0)
    assert math.isclose(m["r2"], 1.0) and math.isclose(m["identity_cosine"], 1.0, rel_tol=1e-6)
    logits = AffineAlignment.identity(16).aligned_logits(x[:5].double(), head)
    assert logits.dtype == torch.float32 and logits.shape == (5, 50)


# ---------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama"), tiny_model("llama", seed=1)


def _random_alignment(hd=32, ht=32, seed=0):
    a = AffineAlignment(hd, ht)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        a.weight.normal_(generator=g)
        a.bias.normal_(generator=g)
    return a


def test_checkpoint_round_trip(tmp_path, pair):
    target, draft = pair
    a = _random_alignment()
    path = save_alignment(a, tmp_path / "al", {"fit": "ridge", "lambda": 1e-3}, target=target, draft=draft)
    b = load_alignment(path, target=target, draft=draft)
    h = torch.randn(7, 32)
    assert torch.equal(a(h), b(h))
    assert b.meta["fit"] == "ridge" and b.meta["draft_hidden"] == 32 and "target_identity" in b.meta
    head = target.get_output_embeddings().weight
    assert torch.equal(a.aligned_logits(h, head), b.aligned_logits(h, head))
    assert load_alignment(path / "alignment.json").weight.shape == (32, 32)  # a file inside the dir works too
    half = load_alignment(path, target=copy.deepcopy(target).to(torch.bfloat16), dtype=torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16  # the same target loaded in bf16 is accepted


def _refused(path, match, **kw):
    with pytest.raises(ModelLoadError, match=match):
        load_alignment(path, **kw)


def test_checkpoint_refusals(tmp_path, pair):
    target, draft = pair
    _refused(tmp_path / "nowhere", "does not exist")
    path = save_alignment(_random_alignment(), tmp_path / "al", {}, target=target, draft=draft)

    _refused(path, "another target", target=tiny_model("llama", seed=5))
    _refused(path, "another draft", target=target, draft=tiny_model("llama", seed=7))
    small = save_alignment(_random_alignment(12, 16), tmp_path / "small", {})
    _refused(small, "expects target hidden size 16.*has hidden size 32", target=target)
    _refused(small, "expects draft hidden size 12.*has hidden size 32", draft=draft)

    meta_file, weights = path / "alignment.json", path / "alignment.safetensors"
    good_meta, good_weights = meta_file.read_text(), weights.read_bytes()
    weights.write_bytes(good_weights[: len(good_weights) // 2])
    _refused(path, "corrupt or truncated")
    weights.write_bytes(good_weights)
    meta_file.write_text(good_meta[:-20])
    _refused(path, "corrupt or truncated")
    for change, match in (({"kind": "acceptance"}, "not a 'alignment' one"), ({"format_version": 99}, "format version"),
                          ({"target_hidden": 16}, "shape"), ({"draft_hidden": None}, "draft_hidden")):
        meta_file.write_text(json.dumps({**json.loads(good_meta), **change}))
        _refused(path, match)
    meta_file.write_text(good_meta)
    (path / "alignment.safetensors").unlink()
    _refused(path, "needs alignment.json and alignment.safetensors")
