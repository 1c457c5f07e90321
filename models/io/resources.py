"""What a decoder loads beside its two models, each once and checked against the pair.

    resources = DecoderResources()
    alignment, predictor = resources.learned(config, target, drafter, device)
    cost = resources.cost_model(decoder)     # the cost-aware pruner's curves: read or measured once

The alignment and acceptance predictor named in the config (``demo:alignment`` / ``demo:predictor``
or checkpoint directories) are loaded once per decoder and refused when made for another pair. The
cost model comes from ``pruning.cost_profile`` when it names a file, else from the per-machine cache
(``$TREESPEC_CACHE/costs``), measured on first use for this machine, pair and linear kernel. The
decoder asks for both in ``prepare()``, before any timed ``generate``.
"""

from __future__ import annotations

from pathlib import Path

from models.config import SpeculativeDecodingConfig
from models.errors import ConfigError, ModelLoadError
from models.io.loading import resolve_checkpoint
from models.kernels.fast_linear import linear_kernel
from models.learned.acceptance_predictor import load_predictor
from models.learned.affine_alignment import load_alignment
from models.paths import cache_root
from models.policy.cost_model import CostModel
from models.policy.cost_profile import load_or_profile, profile_defaults


class DecoderResources:
    def __init__(self):
        self._loaded: dict = {}  # (kind, path or key) -> object

    def learned(self, config: SpeculativeDecodingConfig, target, drafter, device):
        """(alignment or None, predictor or None) as the config names them (None without a drafter)."""
        if drafter is None:
            return None, None
        loaded = {}
        for kind, name, load in (("alignment", config.affine_alignment.alignment_checkpoint, load_alignment),
                                 ("predictor", config.acceptance_predictor.checkpoint, load_predictor)):
            if not name:
                loaded[kind] = None
                continue
            path = resolve_checkpoint(name, kind, config.model.draft_model_name)
            if (kind, path) not in self._loaded:
                self._loaded[kind, path] = load(path, target=target, draft=drafter.identity_module, device=device)
            loaded[kind] = self._loaded[kind, path]
        if loaded["predictor"] is not None and loaded["predictor"].uses_alignment and loaded["alignment"] is None:
            raise ConfigError(f"the acceptance predictor {config.acceptance_predictor.checkpoint} reads aligned "
                              "features: also set affine_alignment.alignment_checkpoint (e.g. affine_alignment=demo)")
        return loaded["alignment"], loaded["predictor"]

    def cost_model(self, decoder) -> CostModel:
        """The cost-aware pruner's step costs for ``decoder`` (its config's ``pruning.cost_profile`` file,
        else the machine's cached profile, measured once: seconds to a minute)."""
        path = decoder.config.pruning.cost_profile
        key = ("cost", path, linear_kernel(decoder.target_model))  # the kernel changes the curves
        if key not in self._loaded:
            if path:
                try:
                    self._loaded[key] = CostModel.load(Path(path).expanduser())
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise ModelLoadError(f"cost profile {path} is unreadable: {e}; remake it with "
                                         "scripts/profile_costs.py") from None
            else:
                # sizes that fit a short context window beside a cached prefix (the curves extrapolate)
                d, room = profile_defaults(), max(1, decoder.context_limit // 2)
                sizes = dict(node_counts=[n for n in d["node_counts"] if n <= room] or [1],
                             widths=[w for w in d["widths"] if w + 1 <= room] or [1])
                self._loaded[key] = load_or_profile(decoder, cache_root(decoder.config.model.cache_dir) / "costs",
                                                    **sizes)
        return self._loaded[key]
