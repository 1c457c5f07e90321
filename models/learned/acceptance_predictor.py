"""Learned acceptance probability of a drafted node: P(node accepted | its parent accepted).

A small MLP over the per-node features of ``models.learned.node_features`` (a chosen subset of
``FEATURE_NAMES``, or C2T's ``joint_prob, draft_entropy, depth`` as a baseline). Inputs are
standardised with the training rows' mean/std, and the output logit is divided by a temperature
fitted on held-out calibration rows (temperature scaling), so ``forward`` returns calibrated
probabilities that a tree search can multiply along paths. Training lives in
``training/learned/predictor.py``; this module is what decoding needs: the model and its
checkpoint (``models/checkpoint.py``, kind ``"predictor"``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.checkpoint import (
    check_pair,
    load_checkpoint,
    save_checkpoint,
    tensor_or_error,
)
from models.errors import ConfigError, ModelLoadError
from models.learned.node_features import (
    ALIGNED_FEATURES,
    FEATURE_NAMES,
    FEATURE_SPEC_VERSION,
    select_columns,
)

KIND = "predictor"
# Everything ``select_columns`` can produce: the spec's columns plus C2T's derived joint probability.
KNOWN_FEATURES = FEATURE_NAMES + ("joint_prob",)


class AcceptanceProbabilityPredictor(torch.nn.Module):
    """MLP: standardised features [M, F] -> logit [M]; ``forward`` gives sigmoid(logit / T).

    ``feature_names``: the F input columns (names in ``KNOWN_FEATURES``), in this order.
    ``hidden``: widths of the GELU hidden layers; ``()`` is logistic regression.
    ``mean``/``std`` [F]: input standardisation (defaults 0 / 1 until a fit sets them).
    The buffer ``log_temperature`` (scalar, 0 = T 1.0 untrained) is set by calibration.
    """

    def __init__(self, feature_names: list[str] | tuple[str, ...], hidden: tuple[int, ...] = (64, 64),
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        unknown = [n for n in feature_names if n not in KNOWN_FEATURES]
        if not feature_names or unknown:
            raise ConfigError(f"acceptance predictor features must be a non-empty subset of {list(KNOWN_FEATURES)}; "
                              f"got {list(feature_names)} (unknown: {unknown})")
        if any(int(h) < 1 for h in hidden):
            raise ConfigError(f"acceptance predictor hidden widths must be positive, got {tuple(hidden)}")
        self.feature_names = list(feature_names)
        self.hidden = tuple(int(h) for h in hidden)
        f = len(self.feature_names)
        self.register_buffer("mean", torch.zeros(f) if mean is None else torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.ones(f) if std is None else torch.as_tensor(std, dtype=torch.float32))
        self.register_buffer("log_temperature", torch.zeros(()))
        layers, width = [], f
        for h in self.hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.GELU()]
            width = h
        layers.append(torch.nn.Linear(width, 1))
        self.net = torch.nn.Sequential(*layers)
        self.meta: dict = {}  # a loaded checkpoint's metadata (pair identity, training config, metrics)

    @property
    def uses_alignment(self) -> bool:
        """True when some input needs an ``AffineAlignment`` (the aligned_* columns)."""
        return any(n in ALIGNED_FEATURES for n in self.feature_names)

    @property
    def temperature(self) -> float:
        return float(self.log_temperature.exp())

    def logits(self, full_features: torch.Tensor) -> torch.Tensor:
        """Raw (uncalibrated) logits [M] of full feature rows [M, NUM_FEATURES], on their device."""
        x = select_columns(full_features.float(), self.feature_names)  # [M, F]
        # std is clamped at fit time, so a constant training column cannot divide by zero here.
        return self.net((x - self.mean) / self.std).squeeze(-1)

    def forward(self, full_features: torch.Tensor) -> torch.Tensor:
        """Calibrated P(node accepted | parent accepted) [M] for feature rows [M, NUM_FEATURES].

        Call under ``torch.no_grad()``/``inference_mode()`` when decoding: with M ~ 4..64 rows the
        cost is a few tiny matmuls, dominated by autograd bookkeeping if that is left on."""
        return torch.sigmoid(self.logits(full_features) / self.log_temperature.exp())


def save_predictor(predictor: AcceptanceProbabilityPredictor, out_dir: str | Path, meta: dict) -> Path:
    """Write ``predictor.safetensors`` + ``predictor.json`` into ``out_dir``; returns the directory.

    ``meta`` should carry ``target_identity``/``draft_identity`` (``checkpoint.fingerprint`` of the
    pair the traces came from) so that ``load_predictor`` can refuse another pair, plus whatever
    training config and metrics are worth keeping. The architecture fields are added here."""
    info = {**meta, "feature_names": predictor.feature_names, "hidden": list(predictor.hidden),
            "feature_spec_version": FEATURE_SPEC_VERSION, "temperature": predictor.temperature}
    return save_checkpoint(out_dir, KIND, dict(predictor.state_dict()), info)


def load_predictor(path: str | Path, target: torch.nn.Module | None = None, draft: torch.nn.Module | None = None,
                   device: torch.device | str | None = None) -> AcceptanceProbabilityPredictor:
    """The predictor saved in ``path`` (its directory or one of its two files), in eval mode.

    Raises ``ModelLoadError`` naming the problem: missing/corrupt/truncated files, another kind or
    feature-spec version, a checkpoint made for another target/draft (when those are given),
    unknown feature names, missing, mis-shaped or non-finite tensors."""
    tensors, meta = load_checkpoint(path, KIND, spec_versions=(FEATURE_SPEC_VERSION,))
    check_pair(meta, path, KIND, target, draft)
    names, hidden = meta.get("feature_names"), meta.get("hidden")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ModelLoadError(f"{KIND} checkpoint {path}: 'feature_names' must be a non-empty list of names, "
                             f"got {names!r}")
    unknown = [n for n in names if n not in KNOWN_FEATURES]
    if unknown:
        raise ModelLoadError(f"{KIND} checkpoint {path} reads unknown features {unknown} "
                             f"(feature-spec version {FEATURE_SPEC_VERSION} knows {list(KNOWN_FEATURES)})")
    if not isinstance(hidden, list) or not all(isinstance(h, int) and h > 0 for h in hidden):
        raise ModelLoadError(f"{KIND} checkpoint {path}: 'hidden' must be a list of positive widths, got {hidden!r}")
    predictor = AcceptanceProbabilityPredictor(names, tuple(hidden))
    # The architecture in the json fixes every shape; a tensor that disagrees is a broken checkpoint.
    state = {name: tensor_or_error(tensors, name, path, KIND, tuple(ref.shape))
             for name, ref in predictor.state_dict().items()}
    predictor.load_state_dict(state)
    predictor.meta = meta
    return predictor.to(device).eval() if device is not None else predictor.eval()
