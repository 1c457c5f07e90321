"""Acceptance predictor: learns a known acceptance law, calibrates, round-trips, refuses bad checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from sklearn.metrics import brier_score_loss, roc_auc_score

from models.checkpoint import fingerprint
from models.errors import ModelLoadError
from models.learned.acceptance_predictor import (
    AcceptanceProbabilityPredictor,
    load_predictor,
    save_predictor,
)
from models.learned.node_features import COLUMN, FEATURE_SPEC_VERSION, NUM_FEATURES
from training.learned.predictor import (
    evaluate_predictor,
    evaluate_probs,
    expected_calibration_error,
    fit_temperature,
    predict,
    predictor_report,
    reliability_curve,
    reliability_plot,
    train_mlp,
)

FEATURES = ["draft_logprob", "draft_entropy", "depth", "target_entropy"]


def synthetic_traces(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x [n, NUM_FEATURES], y [n] ~ Bernoulli(p), the true p [n]); p depends on the draft probability,
    the depth and the target's entropy, which the draft-probability baseline cannot see."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, NUM_FEATURES), np.float32)
    q = rng.uniform(0.02, 1.0, n)
    depth = rng.integers(1, 6, n)
    x[:, COLUMN["draft_logprob"]] = np.log(q)
    x[:, COLUMN["draft_entropy"]] = rng.uniform(0.0, 3.0, n)
    x[:, COLUMN["depth"]] = depth
    x[:, COLUMN["parent_path_logprob"]] = -rng.exponential(0.5, n) * (depth - 1)
    x[:, COLUMN["target_entropy"]] = rng.uniform(0.0, 3.0, n)
    z = 3.0 * (q - 0.5) - 1.5 * (x[:, COLUMN["target_entropy"]] - 1.5) - 0.3 * (depth - 3)
    p = 1.0 / (1.0 + np.exp(-z))
    return x, (rng.random(n) < p).astype(np.float32), p


@pytest.fixture(scope="module")
def report():
    (xa, ya, _), (xc, yc, _), (xt, yt, pt) = (synthetic_traces(n, s) for n, s in ((20000, 0), (5000, 1), (20000, 2)))
    mlp, _, rep, probs = predictor_report(xa, ya, xc, yc, xt, yt, FEATURES, hidden=(32, 32), epochs=20, lr=3e-3, seed=0)
    return mlp, rep, probs, roc_auc_score(yt, pt)


def test_mlp_reaches_bayes_auroc_and_beats_baselines(report):
    mlp, rep, _, bayes = report
    assert rep["auroc"] > bayes - 0.01, (rep["auroc"], bayes)
    assert rep["auroc"] > rep["baseline_auroc"] + 0.05  # the draft's probability cannot see target_entropy
    assert rep["auroc"] > rep["c2t_auroc"] + 0.02
    assert rep["ece_calibrated"] < 0.03 and 0.5 < rep["temperature"] < 2.0
    assert (rep["n_train"], rep["n_calibration"], rep["n_heldout"]) == (20000, 5000, 20000)
    assert sorted(rep["auroc_by_depth"]) == [1, 2, 3, 4, 5]
    assert all(v["n"] > 3000 and v["mlp"] > v["draft"] for v in rep["auroc_by_depth"].values())
    assert not mlp.uses_alignment and mlp.feature_names == FEATURES


def test_training_is_deterministic():
    x, y, _ = synthetic_traces(2000, 3)
    losses = []
    a = predict(train_mlp(x, y, FEATURES, hidden=(8,), epochs=2, progress=lambda *r: losses.append(r)), x)
    b = predict(train_mlp(x, y, FEATURES, hidden=(8,), epochs=2), x)
    assert np.array_equal(a, b) and [e for e, _, _ in losses] == [0, 1] and all(np.isfinite(losses[0][1:]))


def test_temperature_scaling_undoes_overconfidence():
    """A logit 3x the true one: T ~ 3 restores calibration (logistic regression on the true logit)."""
    rng = np.random.default_rng(4)
    z = rng.normal(0.0, 1.5, 20000)
    y = (rng.random(len(z)) < 1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    x = np.zeros((len(z), NUM_FEATURES), np.float32)
    x[:, COLUMN["draft_logprob"]] = z
    model = AcceptanceProbabilityPredictor(["draft_logprob"], hidden=())
    with torch.no_grad():
        model.net[0].weight.fill_(3.0)
        model.net[0].bias.zero_()
    before = expected_calibration_error(predict(model, x), y)
    t = fit_temperature(model, x, y)
    after = expected_calibration_error(predict(model, x), y)
    assert abs(t - 3.0) < 0.25 and model.temperature == pytest.approx(t)
    assert before > 0.08 and after < 0.3 * before and after < 0.02
    assert np.allclose(predict(model, x, calibrated=False), 1.0 / (1.0 + np.exp(-3.0 * z)), atol=1e-5)


def test_ece_and_metrics():
    rng = np.random.default_rng(5)
    p = rng.random(50000)
    y = (rng.random(len(p)) < p).astype(np.float64)
    assert expected_calibration_error(p, y) < 0.02
    assert expected_calibration_error(p, p) == pytest.approx(0.0, abs=1e-12)  # soft labels
    half = np.arange(1000) % 2
    assert expected_calibration_error(np.full(1000, 0.9), half) == pytest.approx(0.4)
    mean_p, freq, counts = reliability_curve(np.array([0.0, 0.05, 1.0]), np.array([0.0, 1.0, 1.0]), bins=10)
    assert counts.tolist() == [2] + [0] * 8 + [1] and freq[0] == 0.5 and np.isnan(freq[5]) and mean_p[9] == 1.0
    m = evaluate_probs(p, y)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p)) and m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert m["n"] == len(p) and m["positive_rate"] == pytest.approx(y.mean())
    assert m["mean_prob"] == pytest.approx(p.mean())
    soft = np.clip(p + rng.normal(0, 0.1, len(p)), 0, 1)
    s = evaluate_probs(p, soft)
    assert s["auroc"] == pytest.approx(roc_auc_score(soft >= 0.5, p))
    assert s["brier"] == pytest.approx(np.mean((p - soft) ** 2))


def test_reliability_plot_writes_png(report, tmp_path):
    _, _, probs, _ = report
    y = probs["y"]
    curves = {"MLP (uncalibrated)": (probs["mlp_uncal"], y), "MLP (calibrated)": (probs["mlp"], y),
              "draft probability": (probs["draft"], y), "C2T": (probs["c2t"], y)}
    out = reliability_plot(curves, tmp_path / "plots" / "reliability.png", title="synthetic")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10000


def _saved(tmp_path, **meta) -> tuple[AcceptanceProbabilityPredictor, object]:
    torch.manual_seed(0)
    model = AcceptanceProbabilityPredictor(["draft_logprob", "joint_prob", "aligned_agree"], hidden=(16, 8),
                                           mean=torch.tensor([-1.0, 0.3, 0.5]), std=torch.tensor([2.0, 0.2, 0.5]))
    model.log_temperature.fill_(0.4)
    return model, save_predictor(model, tmp_path / "pred", meta)


def test_save_load_round_trip(tmp_path):
    model, path = _saved(tmp_path, metrics={"auroc": 0.8})
    loaded = load_predictor(path / "predictor.json")
    x = torch.randn(64, NUM_FEATURES)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x)) and loaded(x).shape == (64,)
    assert loaded.uses_alignment and loaded.hidden == (16, 8) and loaded.temperature == pytest.approx(np.exp(0.4))
    assert loaded.meta["metrics"] == {"auroc": 0.8} and loaded.meta["feature_spec_version"] == FEATURE_SPEC_VERSION
    x, y, _ = synthetic_traces(500, 6)
    assert evaluate_predictor(loaded, x, y)["n"] == 500


def test_refuses_another_target(tmp_path):
    _, path = _saved(tmp_path, target_identity=fingerprint(tiny_model("llama")))
    load_predictor(path, target=tiny_model("llama"))
    with pytest.raises(ModelLoadError, match="another target"):
        load_predictor(path, target=tiny_model("llama", seed=5))


def _edit_json(path, **changes):
    meta = json.loads((path / "predictor.json").read_text())
    (path / "predictor.json").write_text(json.dumps({**meta, **changes}))


@pytest.mark.parametrize("damage, message", [
    (lambda p: _edit_json(p, feature_spec_version=FEATURE_SPEC_VERSION + 1), "feature-spec version"),
    (lambda p: _edit_json(p, feature_names=["draft_logprob", "telepathy", "aligned_agree"]), "unknown features"),
    (lambda p: _edit_json(p, hidden=[16, 4]), "has shape"),
    (lambda p: (p / "predictor.json").write_text('{"kind": "predictor", '), "corrupt or truncated"),
    (lambda p: (p / "predictor.safetensors").write_bytes((p / "predictor.safetensors").read_bytes()[:300]),
     "corrupt or truncated"),
])
def test_refuses_broken_checkpoints(tmp_path, damage, message):
    _, path = _saved(tmp_path)
    damage(path)
    with pytest.raises(ModelLoadError, match=message):
        load_predictor(path)
