"""Fit, calibrate and judge the acceptance predictor (``models/learned/acceptance_predictor.py``).

Data are trace rows: full node-feature rows x [N, NUM_FEATURES] (``models.learned.node_features``) and labels
y [N] in [0, 1]: 1/0 = the node was accepted / rejected given its parent was, or a soft label (the
exact acceptance probability where the trace knows it). Three scores are compared on held-out rows:
  mlp     the predictor on the chosen features, before and after temperature scaling
  draft   the draft's own probability exp(draft_logprob), what EAGLE-2 ranks nodes by (uncalibrated)
  c2t     the same MLP on C2T's features (joint_prob, draft_entropy, depth), trained and calibrated
          the same way
Metrics: AUROC (ranking), Brier score and ECE (calibration); a reliability diagram draws the last.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import brier_score_loss, roc_auc_score

from models.config import default_config
from models.learned.acceptance_predictor import AcceptanceProbabilityPredictor
from models.learned.node_features import C2T_FEATURES, COLUMN, select_columns

LOG_T_RANGE = (float(np.log(0.05)), float(np.log(20.0)))  # temperatures outside this mean a broken fit


def _tensor(a) -> torch.Tensor:
    return torch.as_tensor(a).float().cpu()


def _numpy(a) -> np.ndarray:
    return (a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)).astype(np.float64)


def fit_settings(**given) -> dict:
    """The MLP's training settings: ``given`` where not None, else configs/train_predictor/default.yaml."""
    d = default_config().train_predictor
    keys = ("hidden", "epochs", "lr", "weight_decay", "batch_size", "val_fraction", "patience", "seed")
    out = {k: given[k] if given.get(k) is not None else d[k] for k in keys}
    out["hidden"] = tuple(out["hidden"])
    return out


def train_mlp(x_full, y, feature_names: list[str] | tuple[str, ...], hidden: tuple[int, ...] | None = None,
              epochs: int | None = None, lr: float | None = None, weight_decay: float | None = None,
              batch_size: int | None = None, val_fraction: float | None = None, seed: int | None = None,
              patience: int | None = None,
              progress: Callable[[int, float, float], None] | None = None) -> AcceptanceProbabilityPredictor:
    """An ``AcceptanceProbabilityPredictor`` fitted by BCE-with-logits (AdamW) on x_full [N, NUM_FEATURES], y [N].
    Settings left None come from ``train_predictor`` (``fit_settings``).

    A seeded ``val_fraction`` of the rows is held out for early stopping: training stops after
    ``patience`` epochs without a better validation loss and the best epoch's weights are returned
    (with ``val_fraction=0`` the last epoch's). Standardisation is fitted on the training rows only.
    Deterministic for a given seed (on CPU); the global RNG is left untouched. Temperature stays 1:
    calibrate with ``fit_temperature`` on other rows. ``progress(epoch, train_loss, val_loss)`` is
    called after every epoch (val_loss NaN without a validation split)."""
    s = fit_settings(hidden=hidden, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                     val_fraction=val_fraction, seed=seed, patience=patience)
    hidden, epochs, lr, weight_decay = s["hidden"], s["epochs"], s["lr"], s["weight_decay"]
    batch_size, val_fraction, seed, patience = s["batch_size"], s["val_fraction"], s["seed"], s["patience"]
    x, t = _tensor(x_full), _tensor(y)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_val = int(round(val_fraction * len(x)))
    val, train = perm[:n_val], perm[n_val:]
    cols = select_columns(x[train], feature_names)  # [N_train, F]
    std = cols.std(0)
    # A column constant on the training rows carries no information; std 1 keeps it finite.
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AcceptanceProbabilityPredictor(feature_names, hidden, mean=cols.mean(0), std=std)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    best, best_state, stale = float("inf"), copy.deepcopy(model.state_dict()), 0
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for idx in train[torch.randperm(len(train), generator=g)].split(batch_size):
            loss = loss_fn(model.logits(x[idx]), t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        train_loss = total / max(len(train), 1)
        model.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(model.logits(x[val]), t[val])) if n_val else float("nan")
        if progress is not None:
            progress(epoch, train_loss, val_loss)
        if not n_val:
            continue
        if val_loss < best:
            best, best_state, stale = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= patience:
                break
    if n_val:
        model.load_state_dict(best_state)
    return model.eval()


@torch.no_grad()
def predict(predictor: AcceptanceProbabilityPredictor, x_full, calibrated: bool = True) -> np.ndarray:
    """Probabilities [N] of rows x_full [N, NUM_FEATURES]; ``calibrated=False`` ignores the temperature."""
    p = next(predictor.parameters())
    z = predictor.logits(_tensor(x_full).to(p.device))
    return _numpy(torch.sigmoid(z / predictor.log_temperature.exp() if calibrated else z))


def fit_temperature(predictor: AcceptanceProbabilityPredictor, x_cal, y_cal) -> float:
    """Temperature scaling: the T in [0.05, 20] minimising the NLL of sigmoid(logit / T) on (x_cal, y_cal).

    Sets ``predictor.log_temperature`` and returns T. The NLL is convex in 1/T, hence unimodal in
    log T, so a bounded 1-D search over log T finds the optimum. Ranking (AUROC) is unchanged."""
    from scipy.optimize import minimize_scalar

    with torch.no_grad():
        p = next(predictor.parameters())
        z = predictor.logits(_tensor(x_cal).to(p.device)).double().cpu()
    t = _tensor(y_cal).double()

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.binary_cross_entropy_with_logits(z / np.exp(log_t), t))

    log_t = float(minimize_scalar(nll, bounds=LOG_T_RANGE, method="bounded", options={"xatol": 1e-5}).x)
    predictor.log_temperature.fill_(log_t)
    return float(np.exp(log_t))


def reliability_curve(prob, y, bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of [0, 1]: (mean predicted [bins], observed frequency = mean y [bins], counts [bins]).

    Empty bins get their bin centre and a NaN frequency. p = 1.0 falls in the last bin."""
    p, t = _numpy(prob), _numpy(y)
    idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    counts = np.bincount(idx, minlength=bins)
    safe = np.maximum(counts, 1)
    centers = (np.arange(bins) + 0.5) / bins
    mean_p = np.where(counts > 0, np.bincount(idx, weights=p, minlength=bins) / safe, centers)
    freq = np.where(counts > 0, np.bincount(idx, weights=t, minlength=bins) / safe, np.nan)
    return mean_p, freq, counts


def expected_calibration_error(prob, y, bins: int = 15) -> float:
    """ECE: sum over equal-width bins of (bin count / N) * |mean prob - mean y| (soft labels work too)."""
    mean_p, freq, counts = reliability_curve(prob, y, bins)
    keep = counts > 0
    return float(np.sum(counts[keep] * np.abs(mean_p[keep] - freq[keep])) / max(counts.sum(), 1))


def _auroc(y, score) -> float:
    """AUROC with y >= 0.5 as the positive class (the rounded label when labels are soft); NaN for one class."""
    pos = _numpy(y) >= 0.5
    return float(roc_auc_score(pos, _numpy(score))) if 0 < pos.sum() < len(pos) else float("nan")


def evaluate_probs(prob, y) -> dict:
    """Ranking and calibration of probabilities prob [N] against labels y [N] in [0, 1].

    auroc: sklearn's, on y >= 0.5 as positives (soft labels are rounded for ranking only);
    brier: mean (prob - y)^2 (sklearn's ``brier_score_loss`` for hard 0/1 labels; the same formula
    for soft ones); ece: ``expected_calibration_error``; positive_rate: mean y (the acceptance rate);
    mean_prob: mean prob (equal to it for a predictor calibrated in the large)."""
    p, t = _numpy(prob), _numpy(y)
    hard = bool(np.all((t == 0) | (t == 1)))
    brier = float(brier_score_loss(t, p)) if hard else float(np.mean((p - t) ** 2))
    return {"auroc": _auroc(t, p), "brier": brier, "ece": expected_calibration_error(p, t), "n": int(len(t)),
            "positive_rate": float(t.mean()), "mean_prob": float(p.mean())}


def evaluate_predictor(predictor: AcceptanceProbabilityPredictor, x_full, y) -> dict:
    """``evaluate_probs`` of a (loaded) predictor's calibrated output on other traces, e.g. under shift."""
    return evaluate_probs(predict(predictor, x_full), y)


def draft_probability(x_full) -> np.ndarray:
    """The EAGLE-2 baseline score [N]: the draft's own probability exp(draft_logprob) of each node."""
    return np.exp(_numpy(x_full)[:, COLUMN["draft_logprob"]])


def predictor_report(x_train, y_train, x_cal, y_cal, x_test, y_test, feature_names: list[str] | tuple[str, ...],
                     hidden: tuple[int, ...] | None = None, epochs: int | None = None, lr: float | None = None,
                     seed: int | None = None, progress: Callable[[int, float, float], None] | None = None
                     ) -> tuple[AcceptanceProbabilityPredictor, AcceptanceProbabilityPredictor, dict, dict]:
    """Train on train, calibrate T on cal, report on test: (predictor, C2T baseline model, report,
    probs for plots).

    report: auroc / brier (calibrated MLP), brier_uncalibrated, ece_uncalibrated, ece_calibrated,
    temperature, baseline_{auroc,brier,ece} (draft probability), c2t_{auroc,brier,ece} (C2T MLP,
    calibrated), n_train / n_calibration / n_heldout, and auroc_by_depth {depth: {"mlp", "draft", "n"}}
    for depths whose test rows hold both classes. probs: {"mlp_uncal", "mlp", "draft", "c2t", "y"} [N_test].
    """
    fit = dict(hidden=hidden, epochs=epochs, lr=lr, seed=seed)
    mlp = train_mlp(x_train, y_train, feature_names, progress=progress, **fit)
    temperature = fit_temperature(mlp, x_cal, y_cal)
    c2t = train_mlp(x_train, y_train, C2T_FEATURES, **fit)
    fit_temperature(c2t, x_cal, y_cal)
    y = _numpy(y_test)
    probs = {"mlp_uncal": predict(mlp, x_test, calibrated=False), "mlp": predict(mlp, x_test),
             "draft": draft_probability(x_test), "c2t": predict(c2t, x_test), "y": y}
    m, base, c = (evaluate_probs(probs[k], y) for k in ("mlp", "draft", "c2t"))
    report = {"auroc": m["auroc"], "brier": m["brier"],
              "brier_uncalibrated": evaluate_probs(probs["mlp_uncal"], y)["brier"],
              "ece_uncalibrated": expected_calibration_error(probs["mlp_uncal"], y), "ece_calibrated": m["ece"],
              "temperature": temperature,
              "baseline_auroc": base["auroc"], "baseline_brier": base["brier"], "baseline_ece": base["ece"],
              "c2t_auroc": c["auroc"], "c2t_brier": c["brier"], "c2t_ece": c["ece"],
              "n_train": len(y_train), "n_calibration": len(y_cal), "n_heldout": len(y),
              "positive_rate": m["positive_rate"], "mean_prob": m["mean_prob"], "auroc_by_depth": {}}
    depth = _numpy(x_test)[:, COLUMN["depth"]]
    for d in np.unique(depth):
        rows = depth == d
        mlp_auc = _auroc(y[rows], probs["mlp"][rows])
        if not np.isnan(mlp_auc):
            report["auroc_by_depth"][int(d)] = {"mlp": mlp_auc, "draft": _auroc(y[rows], probs["draft"][rows]),
                                                "n": int(rows.sum())}
    return mlp, c2t, report, probs


def reliability_plot(curves: dict[str, tuple], path: str | Path, bins: int = 15, title: str = "") -> Path:
    """Reliability diagram PNG: observed frequency vs mean predicted per bin, one line per
    ``curves[name] = (prob [N], y [N])`` with its ECE in the legend, the diagonal (perfect
    calibration), and the histogram of each curve's predicted probabilities underneath."""
    # Figure + its own Agg canvas: no pyplot global state, no backend switch for the caller.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfect calibration")
    for name, (prob, y) in curves.items():
        mean_p, freq, counts = reliability_curve(prob, y, bins)
        keep = counts > 0
        line, = top.plot(mean_p[keep], freq[keep], marker="o", ms=4,
                         label=f"{name} (ECE {expected_calibration_error(prob, y, bins):.3f})")
        bottom.hist(_numpy(prob), bins=bins, range=(0, 1), histtype="step", color=line.get_color(), label=name)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed acceptance frequency", title=title or "reliability")
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="predicted acceptance probability", ylabel="nodes", yscale="log")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
