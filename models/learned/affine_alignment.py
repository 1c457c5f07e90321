"""Affine map from draft hidden states to target hidden states: ``h_target ≈ W h_draft + b``.

``h_target`` is the input of the target's lm_head (HF ``hidden_states[-1]``, after the final norm),
so the target's own output head applied to ``W h_draft + b`` gives the *aligned* distribution the
node features read (``models/learned/node_features.py``). Draft and target hidden sizes may differ.

Two fits: a closed-form ridge from streamed float64 sufficient statistics (``RidgeAccumulator``,
``fit_ridge``, ``fit_ridge_stream``: every lambda from one pass over train and one over validation)
and Adam on mini-batches (``fit_sgd``) for when even Hd x Hd statistics are not wanted.
Checkpoints use ``models/checkpoint.py`` with kind ``"alignment"``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable

import torch

from models.checkpoint import (
    check_pair,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
    tensor_or_error,
)
from models.errors import ModelLoadError

KIND = "alignment"
DEFAULT_LAMBDAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class AffineAlignment(torch.nn.Module):
    """``h [..., Hd] -> W h + b [..., Ht]``; ``weight`` [Ht, Hd], ``bias`` [Ht]; ``meta``: a free dict."""

    def __init__(self, draft_hidden: int, target_hidden: int):
        super().__init__()
        self.draft_hidden, self.target_hidden = int(draft_hidden), int(target_hidden)
        self.weight = torch.nn.Parameter(torch.zeros(self.target_hidden, self.draft_hidden))
        self.bias = torch.nn.Parameter(torch.zeros(self.target_hidden))
        self.meta: dict = {}

    @classmethod
    def from_tensors(cls, weight: torch.Tensor, bias: torch.Tensor, meta: dict | None = None) -> "AffineAlignment":
        """A frozen float32 alignment holding copies of weight [Ht, Hd] and bias [Ht]."""
        a = cls(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            a.weight.copy_(weight)
            a.bias.copy_(bias)
        a.meta = dict(meta or {})
        return a.requires_grad_(False)

    @classmethod
    def identity(cls, hidden: int) -> "AffineAlignment":
        """W = I, b = 0: the raw draft state taken as the target state (same hidden size)."""
        return cls.from_tensors(torch.eye(hidden), torch.zeros(hidden))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., Hd] (any dtype) -> [..., Ht] in the weight dtype."""
        return torch.nn.functional.linear(h.to(self.weight.dtype), self.weight, self.bias)

    def aligned_logits(self, h_draft: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """The target's head on the aligned states: h_draft [F, Hd], lm_head_weight [V, Ht] -> [F, V] float32.

        The product runs in the head's dtype, as the target computes its own logits (and so a bf16
        head of V x Ht is never copied to fp32 per call); only the [F, V] result is upcast.
        """
        aligned = self.forward(h_draft).to(lm_head_weight.dtype)
        return (aligned @ lm_head_weight.T).float()


class RidgeAccumulator:
    """Streaming float64 sufficient statistics of pairs (x [n, Hd], y [n, Ht]) for ridge regression.

    Holds n, sum x [Hd], sum y [Ht], X^T X [Hd, Hd], X^T Y [Hd, Ht], sum y^2 [Ht]; memory is
    O(Hd^2 + Hd Ht) whatever n is. The same object scores any affine map on the data it has seen
    (``sse``), which is how every lambda is validated in one pass over the validation data.
    """

    def __init__(self):
        self.n, self.sx, self.sy, self.xtx, self.xty, self.syy = 0, None, None, None, None, None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch: x [n, Hd], y [n, Ht] (any float dtype; kept on their device)."""
        x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        if self.sx is not None:
            x, y = x.to(self.sx.device), y.to(self.sx.device)
        parts = (x.sum(0), y.sum(0), x.T @ x, x.T @ y, (y * y).sum(0))
        self.n += x.shape[0]
        if self.sx is None:  # the first batch fixes sizes and device
            self.sx, self.sy, self.xtx, self.xty, self.syy = parts
        else:
            for acc, part in zip((self.sx, self.sy, self.xtx, self.xty, self.syy), parts):
                acc += part

    def _centered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(xbar [Hd], ybar [Ht], Cxx [Hd, Hd], Cxy [Hd, Ht], Cyy diagonal [Ht]): sums around the means."""
        if self.n == 0:
            raise ValueError("RidgeAccumulator has seen no data")
        xbar, ybar = self.sx / self.n, self.sy / self.n
        cxx = self.xtx - self.n * torch.outer(xbar, xbar)
        return xbar, ybar, cxx, self.xty - self.n * torch.outer(xbar, ybar), self.syy - self.n * ybar * ybar

    def solve(self, lam: float) -> AffineAlignment:
        """Centered ridge: W^T = (Xc^T Xc + lam * tr(Xc^T Xc)/Hd * I)^{-1} Xc^T Yc, b = ybar - W xbar.

        The penalty is scaled by tr(Xc^T Xc)/Hd = n * (mean per-dim variance of x), so lambda is
        dimensionless: the same grid means the same for 1k or 1M rows and for any scale of the
        hidden states (it minimises mean squared error + lam * var(x) * ||W||^2). The bias is not
        penalised (it is the intercept of the centered problem).
        """
        xbar, ybar, cxx, cxy, _ = self._centered()
        hd = cxx.shape[0]
        scale = float(cxx.diagonal().sum()) / hd
        scale = scale if scale > 0 else 1.0  # constant x: any positive ridge makes the system solvable
        a = cxx + lam * scale * torch.eye(hd, dtype=cxx.dtype, device=cxx.device)
        chol, info = torch.linalg.cholesky_ex(a)
        wt = torch.cholesky_solve(cxy, chol) if int(info) == 0 else torch.linalg.pinv(a, hermitian=True) @ cxy
        w = wt.T  # [Ht, Hd]
        return AffineAlignment.from_tensors(w, ybar - w @ xbar, {"fit": "ridge", "lambda": lam, "n_train": self.n}
                                            ).to(cxx.device)

    def sse(self, alignment: AffineAlignment) -> tuple[float, float]:
        """(SSE, SST) of ``alignment`` on the accumulated data, in closed form, summed over dimensions.

        Residual r = (yc - W xc) + (ybar - W xbar - b); the cross term sums to 0 over the data, so
        SSE = sum_j [Cyy - 2 (W Cxy)_jj + (W Cxx W^T)_jj] + n ||ybar - W xbar - b||^2. Working on
        centered sums avoids the cancellation of raw sums of squares when R^2 is near 1.
        Dimensions with zero variance are left out of both (as sklearn's variance_weighted does).
        """
        xbar, ybar, cxx, cxy, cyy = self._centered()
        w = alignment.weight.detach().to(cxx.device, torch.float64)
        b = alignment.bias.detach().to(cxx.device, torch.float64)
        per_dim = cyy - 2 * (w * cxy.T).sum(1) + ((w @ cxx) * w).sum(1) + self.n * (ybar - w @ xbar - b) ** 2
        keep = cyy > 0
        return float(per_dim[keep].sum()), float(cyy[keep].sum())

    def r2(self, alignment: AffineAlignment) -> float:
        """Variance-weighted R^2 = 1 - SSE/SST of ``alignment`` on the accumulated data."""
        sse, sst = self.sse(alignment)
        return 1.0 - sse / sst if sst > 0 else float("nan")


def fit_ridge_stream(train_batches: Batches, val_batches: Batches, lambdas: Iterable[float] = DEFAULT_LAMBDAS
                     ) -> tuple[AffineAlignment, float, dict]:
    """Ridge for every lambda from one pass over train and one over validation; keep the best val R^2.

    train_batches, val_batches: callables returning an iterator of (x [n, Hd], y [n, Ht]) batches.
    Returns (alignment, best_lambda, {lambda: val_r2}); ``alignment.meta`` records lambda, n_train,
    n_val and val_r2.
    """

    train, val = RidgeAccumulator(), RidgeAccumulator()
    for x, y in train_batches():
        train.update(x, y)
    for x, y in val_batches():
        val.update(x, y)
    scores, best = {}, None
    for lam in lambdas:
        cand = train.solve(float(lam))
        scores[float(lam)] = val.r2(cand)
        if best is None or scores[float(lam)] > scores[best[0]]:  # ties keep the smaller lambda
            best = (float(lam), cand)
    if best is None:
        raise ValueError("fit_ridge needs at least one lambda")
    lam, out = best
    out.meta.update(n_val=val.n, val_r2=scores[lam])
    return out, lam, scores


def fit_ridge(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
              lambdas: Iterable[float] = DEFAULT_LAMBDAS, chunk: int = 65536) -> tuple[AffineAlignment, float, dict]:
    """In-memory ``fit_ridge_stream``: x [n, Hd], y [n, Ht]; chunks keep the float64 copies small."""
    def chunks(x, y):
        return lambda: ((x[i:i + chunk], y[i:i + chunk]) for i in range(0, x.shape[0], chunk))
    return fit_ridge_stream(chunks(x_train, y_train), chunks(x_val, y_val), lambdas)


def fit_sgd(batches: Batches, draft_hidden: int, target_hidden: int, epochs: int, lr: float,
            weight_decay: float = 0.0, init: AffineAlignment | None = None, seed: int = 0,
            progress: Callable[[int, float], None] | None = None) -> AffineAlignment:
    """Least squares by Adam on mini-batches (x [n, Hd], y [n, Ht]); ``batches()`` is called once per epoch.

    A first pass measures per-dim mean/std; the fit runs on standardised x and y (``lr`` then means
    the same at any hidden-state scale, and Adam sees a well-conditioned problem) and W, b come back
    in the original coordinates. Cosine decay of the lr to 0 lets the iterates settle on the optimum.
    ``weight_decay``: AdamW's, on the standardised W only. ``init``: start there (else W = 0, b = mean y).
    ``seed`` seeds torch's CPU RNG during the fit (so a ``batches`` shuffling with it is reproducible);
    ``progress(step, loss)`` gets the standardised MSE of every step.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # First pass: per-dim mean and std of x and y (float64 sums; no Hd x Hd matrix needed).
        n, steps_per_epoch, sums = 0, 0, None
        for x, y in batches():
            x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
            if x.shape[1] != draft_hidden or y.shape[1] != target_hidden or x.shape[0] != y.shape[0]:
                raise ValueError(f"fit_sgd: batch shapes {tuple(x.shape)}, {tuple(y.shape)} do not match "
                                 f"[n, {draft_hidden}], [n, {target_hidden}]")
            part = (x.sum(0), (x * x).sum(0), y.sum(0), (y * y).sum(0))
            sums = part if sums is None else tuple(s + p.to(s.device) for s, p in zip(sums, part))
            n, steps_per_epoch = n + x.shape[0], steps_per_epoch + 1
        if sums is None or n == 0:
            raise ValueError("fit_sgd: batches() yielded no data")
        dev = sums[0].device
        mx, my = sums[0] / n, sums[2] / n
        sx = (sums[1] / n - mx * mx).clamp(min=0).sqrt()
        sy = (sums[3] / n - my * my).clamp(min=0).sqrt()
        # A constant dimension keeps scale 1 instead of dividing by zero.
        sx, sy = torch.where(sx > 1e-12, sx, torch.ones_like(sx)), torch.where(sy > 1e-12, sy, torch.ones_like(sy))
        # Standardised model: (y - my)/sy = W' (x - mx)/sx + b'  <=>  W = sy W' / sx, b = my + sy b' - W mx.
        w = torch.zeros(target_hidden, draft_hidden, dtype=torch.float64, device=dev)
        b = torch.zeros(target_hidden, dtype=torch.float64, device=dev)
        if init is not None:
            w0, b0 = init.weight.detach().to(dev, torch.float64), init.bias.detach().to(dev, torch.float64)
            w = w0 * sx / sy[:, None]
            b = (w0 @ mx + b0 - my) / sy
        w, b = torch.nn.Parameter(w.float()), torch.nn.Parameter(b.float())
        opt = torch.optim.AdamW([{"params": [w], "weight_decay": weight_decay}, {"params": [b], "weight_decay": 0.0}],
                                lr=lr)
        total = max(1, epochs * steps_per_epoch)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        mxf, myf, sxf, syf = mx.float(), my.float(), sx.float(), sy.float()
        step = 0
        for _ in range(epochs):
            for x, y in batches():
                xs, ys = (x.to(dev, torch.float32) - mxf) / sxf, (y.to(dev, torch.float32) - myf) / syf
                loss = torch.nn.functional.mse_loss(torch.nn.functional.linear(xs, w, b), ys)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if progress is not None:
                    progress(step, float(loss.detach()))
    wd, bd = w.detach().double(), b.detach().double()
    w_out = sy[:, None] * wd / sx
    meta = {"fit": "sgd", "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "steps": step, "n_train": n}
    return AffineAlignment.from_tensors(w_out, my + sy * bd - w_out @ mx, meta).to(dev)


@torch.no_grad()
def alignment_metrics(alignment: AffineAlignment, x: torch.Tensor, y: torch.Tensor,
                      lm_head_weight: torch.Tensor | None = None, target_next: torch.Tensor | None = None,
                      draft_next: torch.Tensor | None = None, batch: int = 4096) -> dict:
    """Held-out quality of ``alignment`` on x [n, Hd] -> y [n, Ht], ``batch`` rows (and [batch, V] logits) at a time.

    r2: 1 - SSE/SST summed over dimensions, SST around the per-dim mean (= sklearn r2_score
    variance_weighted); cosine: mean row cosine; mse: per element. With lm_head_weight [V, Ht] and
    target_next [n]: top1_agreement = P(argmax head(aligned) == target_next) and target_top1_check,
    the same for head(y) (~1.0 when y is the true target state: checks the data). With draft_next [n]:
    draft_top1_agreement = P(draft_next == target_next). Hd == Ht adds identity_r2/_cosine/_mse (raw x).
    """
    dev = alignment.weight.device
    n = x.shape[0]
    spans = [(i, min(i + batch, n)) for i in range(0, n, batch)]
    ybar = sum(y[i:j].to(dev, torch.float64).sum(0) for i, j in spans) / n  # two passes: exact SST
    sst = torch.zeros_like(ybar)
    preds = {"": alignment} if x.shape[1] != y.shape[1] else {"": alignment, "identity_": None}
    sse = {k: torch.zeros_like(ybar) for k in preds}
    cos = {k: 0.0 for k in preds}
    head = lm_head_weight.to(dev) if lm_head_weight is not None else None
    hits = {"top1_agreement": 0, "target_top1_check": 0}
    for i, j in spans:
        xb, yb = x[i:j].to(dev), y[i:j].to(dev, torch.float64)
        sst += ((yb - ybar) ** 2).sum(0)
        for key, a in preds.items():
            p = (a(xb) if a is not None else xb).double()
            sse[key] += ((yb - p) ** 2).sum(0)
            cos[key] += float(torch.nn.functional.cosine_similarity(p, yb, dim=1).sum())
        if head is not None and target_next is not None:
            nxt = target_next[i:j].to(dev)
            hits["top1_agreement"] += int((alignment.aligned_logits(xb, head).argmax(-1) == nxt).sum())
            target_logits = y[i:j].to(dev, head.dtype) @ head.T
            hits["target_top1_check"] += int((target_logits.argmax(-1) == nxt).sum())
    keep = sst > 0  # constant dimensions carry no variance to explain (sklearn gives them weight 0)
    out = {"n": n}
    for key in preds:
        out[f"{key}r2"] = float(1.0 - sse[key][keep].sum() / sst[keep].sum())
        out[f"{key}cosine"] = cos[key] / n
        out[f"{key}mse"] = float(sse[key].sum()) / (n * y.shape[1])
    if head is not None and target_next is not None:
        out.update({k: v / n for k, v in hits.items()})
    if draft_next is not None and target_next is not None:
        out["draft_top1_agreement"] = int((draft_next.cpu() == target_next.cpu()).sum()) / n
    return out


def _hidden_size(module: torch.nn.Module) -> int | None:
    """Width of the state that feeds the module's output head (None when it cannot be told)."""
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[1])
    cfg = getattr(module, "config", None) or getattr(module, "cfg", None)
    size = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    return int(size) if size else None


def save_alignment(alignment: AffineAlignment, out_dir: str | Path, meta: dict | None = None, *,
                   target: torch.nn.Module | None = None, draft: torch.nn.Module | None = None) -> Path:
    """Write ``alignment.safetensors`` (weight [Ht, Hd], bias [Ht], float32) + ``alignment.json``.

    meta: free metadata (fit, lambda, metrics, ...), stored with draft_hidden and target_hidden;
    ``target`` / ``draft`` record their identities (``target_identity`` / ``draft_identity``) so
    that ``load_alignment`` refuses another pair.
    """
    info = dict(meta or {})
    if target is not None:
        info["target_identity"] = fingerprint(target)
    if draft is not None:
        info["draft_identity"] = fingerprint(draft)
    info.update(draft_hidden=alignment.draft_hidden, target_hidden=alignment.target_hidden)
    tensors = {"weight": alignment.weight.detach().float(), "bias": alignment.bias.detach().float()}
    return save_checkpoint(out_dir, KIND, tensors, info)


def load_alignment(path: str | Path, target: torch.nn.Module | None = None, draft: torch.nn.Module | None = None,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AffineAlignment:
    """The alignment in ``path``, checked against ``target`` / ``draft`` (either may be None = not checked).

    Raises ModelLoadError for a missing/corrupt/truncated checkpoint, another kind or format version
    (``load_checkpoint``), tensors that disagree with the recorded sizes, a target (or draft) whose
    hidden size differs from the map's, and a checkpoint made for another pair (``check_pair``).
    The metadata stays available as ``alignment.meta``.
    """
    tensors, meta = load_checkpoint(path, KIND)
    hd, ht = meta.get("draft_hidden"), meta.get("target_hidden")
    if not all(isinstance(v, int) and v > 0 for v in (hd, ht)):
        raise ModelLoadError(f"{KIND} checkpoint {path}: metadata lacks valid draft_hidden/target_hidden "
                             f"(found {hd!r}/{ht!r})")
    weight = tensor_or_error(tensors, "weight", path, KIND, (ht, hd))
    bias = tensor_or_error(tensors, "bias", path, KIND, (ht,))
    for side, module, want in (("target", target, ht), ("draft", draft, hd)):
        size = _hidden_size(module) if module is not None else None
        if size is not None and size != want:
            raise ModelLoadError(f"{KIND} checkpoint {path} expects {side} hidden size {want}, but the {side} "
                                 f"model in use has hidden size {size}; fit an alignment for this pair")
    check_pair(meta, path, KIND, target, draft)
    return AffineAlignment.from_tensors(weight, bias, meta).to(device=device, dtype=dtype or torch.float32)
