"""Pipelines behind scripts/train_alignment.py and scripts/train_predictor.py (trace dir -> checkpoint).

Both split the traces *by prompt* (no prompt in two splits), write the checkpoint (safetensors +
json with the pair identity copied from the traces), ``metrics.json`` and PNG plots next to it, and
log to the tracker (wandb with ``logger=wandb``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.checkpoint import fingerprint, identity_mismatch
from models.errors import ConfigError, ModelLoadError
from models.learned.acceptance_predictor import save_predictor
from models.learned.affine_alignment import (
    AffineAlignment,
    alignment_metrics,
    fit_ridge,
    fit_sgd,
    load_alignment,
    save_alignment,
)
from models.learned.node_features import (
    ALIGNED_FEATURES,
    BASE_FEATURES,
    COLUMN,
    CONTEXT_FEATURES,
    FEATURE_NAMES,
    aligned_features,
)
from models.paths import repo_path
from speculative_decoder import load_model, resolve_model_path
from training.drafts.distill import EVAL_SETS
from training.drafts.eagle import _plain
from training.learned.predictor import (
    draft_probability,
    evaluate_probs,
    predict,
    predictor_report,
    reliability_plot,
)
from training.learned.traces import load_traces, split_by_prompt
from training.provenance import provenance

log = logging.getLogger(__name__)


def _required(value, key: str) -> Path:
    if not value:
        raise ConfigError(f"{key} is required (e.g. {key}=/path)")
    return repo_path(value)


def load_target_for(cfg, traces_meta: dict):
    """The configured target, checked against the pair the traces were made for."""
    m = cfg.model
    target = load_model(resolve_model_path(m.target_model_name, m.cache_dir), m.device, "float32",
                        m.attn_implementation)
    why = identity_mismatch(traces_meta["target_identity"], fingerprint(target))
    if why:
        raise ModelLoadError(f"these traces were collected with another target than model.target_model_name ({why})")
    return target


def pair_prompts(traces: dict) -> torch.Tensor:
    """The prompt of every alignment pair [P]: pairs are written in prompt order, and each node
    names its parent's pair, so scatter the nodes' prompts and carry them forward over pairs no
    kept node points at."""
    p = torch.full((traces["target_next"].numel(),), -1, dtype=torch.long)
    ok = traces["parent_pair"] >= 0
    p[traces["parent_pair"][ok]] = traces["prompt"][ok]
    return torch.cummax(p, 0).values.clamp(min=0)


# ---------------------------------------------------------------------- alignment
def run_train_alignment(cfg, tracker) -> tuple[Path, dict]:
    a = cfg.train_alignment
    traces = load_traces(_required(a.traces, "train_alignment.traces"))
    out = _required(a.out_dir, "train_alignment.out_dir")
    meta = traces["meta"]
    target = load_target_for(cfg, meta)
    lm_head = target.get_output_embeddings().weight.detach()
    x, y = traces["h_draft"].float(), traces["h_target"].float()
    if len(x) < 3:
        raise ConfigError(f"the traces in {a.traces} hold {len(x)} alignment pairs (verified drafted nodes); an "
                          "alignment needs more: collect traces on more prompts (collect_traces.num_prompts)")
    train, val, test = split_by_prompt(pair_prompts(traces), (1 - a.val_fraction - a.test_fraction, a.val_fraction,
                                                              a.test_fraction), int(a.seed))
    log.info("alignment pairs: %d train, %d val, %d test (Hd=%d, Ht=%d)", int(train.sum()), int(val.sum()),
             int(test.sum()), x.shape[1], y.shape[1])
    alignment, lam, val_r2 = fit_ridge(x[train], y[train], x[val], y[val], lambdas=tuple(a.lambdas))
    if a.fit == "sgd":
        s = a.sgd
        g = torch.Generator().manual_seed(int(a.seed))
        xt, yt = x[train], y[train]

        def batches():
            order = torch.randperm(len(xt), generator=g)
            for i in range(0, len(order), int(s.batch_size)):
                idx = order[i:i + int(s.batch_size)]
                yield xt[idx], yt[idx]

        def progress(step, loss):
            if step % 100 == 0:
                tracker.log({"alignment/sgd_loss": loss}, step=step)

        alignment = fit_sgd(batches, x.shape[1], y.shape[1], int(s.epochs), float(s.lr), float(s.weight_decay),
                            seed=int(a.seed), progress=progress)
    elif a.fit != "ridge":
        raise ConfigError(f"invalid config value train_alignment.fit={a.fit!r}: one of ('ridge', 'sgd')")
    metrics = alignment_metrics(alignment, x[test], y[test], lm_head_weight=lm_head,
                                target_next=traces["target_next"][test], draft_next=traces["draft_next"][test])
    metrics.update(ridge_lambda=lam, val_r2_by_lambda={str(k): v for k, v in val_r2.items()}, fit=a.fit,
                   n_train=int(train.sum()), n_val=int(val.sum()), n_heldout=int(test.sum()))
    info = {"target_identity": meta["target_identity"], "draft_identity": meta["draft_identity"],
            "traces": str(_required(a.traces, "")), "trace_settings": meta.get("settings"),
            "training": _plain(a), "metrics": metrics}
    save_alignment(alignment, out, info)
    _write_metrics(out, metrics)
    _plot_alignment(alignment, x[test], y[test], val_r2, out / "alignment.png")
    tracker.log({f"alignment/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    tracker.log_image("alignment/plot", out / "alignment.png")
    return out, metrics


def _plot_alignment(alignment: AffineAlignment, x: torch.Tensor, y: torch.Tensor, val_r2: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    with torch.no_grad():
        pred = alignment(x)
    cos = torch.nn.functional.cosine_similarity(pred, y, dim=-1).numpy()
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    lams = sorted(val_r2)
    left.semilogx(lams, [val_r2[k] for k in lams], marker="o")
    left.set(xlabel="ridge lambda", ylabel="validation R²", title="lambda selection")
    right.hist(cos, bins=50, range=(min(0.0, float(cos.min())), 1), histtype="step", label="aligned W h + b")
    if x.shape[1] == y.shape[1]:
        raw = torch.nn.functional.cosine_similarity(x, y, dim=-1).numpy()
        right.hist(raw, bins=50, range=(min(0.0, float(cos.min())), 1), histtype="step", label="raw draft state")
    right.set(xlabel="cosine(aligned, target) per held-out pair", ylabel="pairs", title="held-out cosine")
    right.legend(loc="upper left")
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------- predictor
def node_feature_matrix(traces: dict, alignment: AffineAlignment | None, lm_head: torch.Tensor | None,
                        chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [M', F], keep [M] bool): the traces' node features with the aligned columns filled
    from ``alignment`` (exactly as the decoder computes them), rows without a pair dropped."""
    feats = traces["features"].clone()
    keep = traces["parent_pair"] >= 0
    if alignment is None:
        return feats[keep], keep
    pp, tokens = traces["parent_pair"], traces["token"]
    h, dn = traces["h_draft"], traces["draft_next"]
    cols = [COLUMN[n] for n in ALIGNED_FEATURES]
    order = torch.argsort(pp)
    bounds = torch.searchsorted(pp[order], torch.arange(0, len(dn) + chunk, chunk))

    for c in tqdm(range(len(bounds) - 1), desc="aligned features", unit="chunk", leave=False):
        rows = order[bounds[c]:bounds[c + 1]]
        rows = rows[pp[rows] >= 0]
        if len(rows) == 0:
            continue
        start = c * chunk
        logits = alignment.aligned_logits(h[start:start + chunk], lm_head)  # [C, V]
        feats[rows[:, None], torch.tensor(cols)] = aligned_features(logits, dn[start:start + chunk],
                                                                    pp[rows] - start, tokens[rows])
    return feats[keep], keep


def _feature_names(p, alignment) -> list[str]:
    if p.features:
        names = list(p.features)
        if alignment is None and set(names) & set(ALIGNED_FEATURES):
            raise ConfigError("train_predictor.features names aligned features: set train_predictor.alignment")
        return names
    return list(FEATURE_NAMES) if alignment is not None else list(BASE_FEATURES + CONTEXT_FEATURES)


def run_train_predictor(cfg, tracker) -> tuple[Path, dict]:

    p = cfg.train_predictor
    traces = load_traces(_required(p.traces, "train_predictor.traces"))
    out = _required(p.out_dir, "train_predictor.out_dir")
    meta = traces["meta"]
    if any(e in f for f in meta.get("settings", {}).get("files") or () for e in EVAL_SETS):
        raise ConfigError("train_predictor.traces were collected on an evaluation set; train on train-only traces "
                          "and pass evaluation traces as train_predictor.shift_traces")
    target = load_target_for(cfg, meta)
    lm_head = target.get_output_embeddings().weight.detach()
    alignment = None
    if p.alignment:
        alignment = load_alignment(repo_path(p.alignment), target=target)
        if alignment.meta.get("draft_identity", {}).get("config_hash") != meta["draft_identity"]["config_hash"]:
            raise ModelLoadError(f"alignment {p.alignment} was made for another draft than these traces")
    names = _feature_names(p, alignment)
    x, keep = node_feature_matrix(traces, alignment, lm_head)
    y, prompt = traces["label"][keep], traces["prompt"][keep]
    train, cal, test = split_by_prompt(prompt, (1 - p.cal_fraction - p.test_fraction, p.cal_fraction,
                                                p.test_fraction), int(p.seed))

    def progress(epoch, train_loss, val_loss):
        tracker.log({"predictor/epoch": epoch, "predictor/train_loss": train_loss, "predictor/val_loss": val_loss})

    model, c2t, report, probs = predictor_report(x[train], y[train], x[cal], y[cal], x[test], y[test], names,
                                                 hidden=tuple(p.hidden), epochs=int(p.epochs), lr=float(p.lr),
                                                 seed=int(p.seed), progress=progress)
    report["feature_names"] = names
    curves = {"MLP (uncalibrated)": (probs["mlp_uncal"], probs["y"]), "MLP (calibrated)": (probs["mlp"], probs["y"]),
              "draft probability": (probs["draft"], probs["y"]), "C2T (calibrated)": (probs["c2t"], probs["y"])}
    out.mkdir(parents=True, exist_ok=True)
    reliability_plot(curves, out / "reliability.png", title="held-out traces (train-only prompts)")
    if p.shift_traces:  # distribution shift: evaluation-set prompts, same pair
        shift = load_traces(repo_path(p.shift_traces))
        if shift["meta"]["draft_identity"]["config_hash"] != meta["draft_identity"]["config_hash"]:
            raise ModelLoadError("train_predictor.shift_traces were made for another draft than the training traces")
        xs, ks = node_feature_matrix(shift, alignment, lm_head)
        ys = shift["label"][ks].numpy()
        sp = {"mlp": predict(model, xs), "mlp_uncal": predict(model, xs, calibrated=False),
              "draft": draft_probability(xs), "c2t": predict(c2t, xs)}
        ev = {k: evaluate_probs(v, ys) for k, v in sp.items()}
        report["shift"] = {"files": shift["meta"]["settings"]["files"], "n": int(len(ys)),
                           "auroc": ev["mlp"]["auroc"], "brier": ev["mlp"]["brier"],
                           "ece_uncalibrated": ev["mlp_uncal"]["ece"], "ece_calibrated": ev["mlp"]["ece"],
                           "baseline_auroc": ev["draft"]["auroc"], "baseline_brier": ev["draft"]["brier"],
                           "baseline_ece": ev["draft"]["ece"], "c2t_auroc": ev["c2t"]["auroc"],
                           "c2t_ece": ev["c2t"]["ece"], "positive_rate": float(ys.mean()),
                           "mean_prob": float(sp["mlp"].mean())}
        reliability_plot({"MLP (calibrated)": (sp["mlp"], ys), "draft probability": (sp["draft"], ys),
                          "C2T (calibrated)": (sp["c2t"], ys)}, out / "reliability-shift.png",
                         title="shift: " + ", ".join(report["shift"]["files"]))
    info = {"target_identity": meta["target_identity"], "draft_identity": meta["draft_identity"],
            "alignment": str(repo_path(p.alignment)) if p.alignment else None,
            "traces": str(repo_path(p.traces)), "trace_settings": meta.get("settings"), "training": _plain(p),
            "metrics": report}
    save_predictor(model, out, info)
    _write_metrics(out, report)
    tracker.log({f"predictor/{k}": v for k, v in report.items() if isinstance(v, (int, float))})
    tracker.log_image("predictor/reliability", out / "reliability.png")
    return out, report


# ---------------------------------------------------------------------- helpers
def _write_metrics(out: Path, metrics: dict) -> None:
    def clean(v):
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (np.floating, np.integer)):
            v = v.item()
        if isinstance(v, float) and not np.isfinite(v):
            return None
        return v


    metrics = dict(metrics, provenance=provenance())  # git commit, package versions, machine
    (out / "metrics.json").write_text(json.dumps(clean(metrics), indent=1) + "\n")
