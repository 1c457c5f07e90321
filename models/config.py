"""Typed configuration. The YAML files under ``configs/`` are the only home of defaults: these
dataclasses declare types and checks, and their default instances are read from the YAML.

    SpeculativeDecodingConfig()                       # the defaults of configs/config.yaml
    SpeculativeDecodingConfig.from_overrides(["tree_search=static", "decoding.method=chain"])
    SpeculativeDecodingConfig.from_hydra(cfg)         # inside a @hydra.main script
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, List, Optional

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models.errors import ConfigError
from models.paths import CONFIG_DIR

METHODS = ("target_only", "chain", "tree")
TREE_MODES = ("static", "dynamic")
CHILD_DRAWS = ("topk", "iid", "without_replacement")
DTYPES = ("float32", "bfloat16", "float16")
CPU_LINEAR = ("auto", "invariant", "hybrid", "mkl", "onednn")  # model.cpu_linear (models/kernels/fast_linear.py)
RANK_BY = ("draft", "predictor")
PRUNING_STRATEGIES = ("none", "threshold", "adaptive", "level", "ratio", "budget", "cost_aware")


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config value {key}={value!r}: {rule}")


@dataclass
class ModelConfig:
    target_model_name: str
    draft_model_name: Optional[str]
    device: str
    dtype: str
    attn_implementation: Optional[str]
    cache_dir: Optional[str]
    data_dir: str  # prompt sets; the demo draft is distilled on its train-only files
    cpu_linear: str  # CPU linear kernels: auto | invariant | hybrid | mkl | onednn (models/kernels/fast_linear.py)

    def __post_init__(self):
        _check(bool(self.target_model_name), "model.target_model_name", self.target_model_name, "must be a local path or 'demo:target'")
        _check(self.dtype in DTYPES, "model.dtype", self.dtype, f"one of {DTYPES}")
        _check(self.cpu_linear in CPU_LINEAR, "model.cpu_linear", self.cpu_linear, f"one of {CPU_LINEAR}")


@dataclass
class DecodingConfig:
    method: str
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    seed: Optional[int]  # sampling: null = fresh randomness per call; an int = reproducible
    use_chat_template: bool
    stop_on_eos: bool

    def __post_init__(self):
        _check(self.method in METHODS, "decoding.method", self.method, f"one of {METHODS}")
        _check(self.max_new_tokens >= 1, "decoding.max_new_tokens", self.max_new_tokens, "must be >= 1")
        _check(self.temperature >= 0, "decoding.temperature", self.temperature, "must be >= 0 (0 = greedy)")
        _check(self.top_k >= 0, "decoding.top_k", self.top_k, "must be >= 0 (0 = off)")
        _check(0 < self.top_p <= 1, "decoding.top_p", self.top_p, "must be in (0, 1] (1 = off)")
        _check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0),
               "decoding.seed", self.seed, "null (fresh randomness per call) or an integer >= 0")

    @property
    def greedy(self) -> bool:
        """Greedy when sampling is off or the temperature is 0 (the greedy limit)."""
        return not self.do_sample or self.temperature == 0


@dataclass
class TreeSearchConfig:
    mode: str
    max_depth: int
    max_candidates: int
    max_nodes: int
    branching: List[int]
    child_draw: str
    rank_by: str
    lookup_tokens: int
    lookup_max_ngram: int
    lookup_min_ngram: int
    lookup_max_tokens: int  # copy mode: the span doubles after a fully accepted copy, up to this (<= lookup_tokens: fixed)

    def __post_init__(self):
        _check(self.mode in TREE_MODES, "tree_search.mode", self.mode, f"one of {TREE_MODES}")
        _check(self.rank_by in RANK_BY, "tree_search.rank_by", self.rank_by, f"one of {RANK_BY}")
        _check(self.max_depth >= 1, "tree_search.max_depth", self.max_depth, "must be >= 1")
        _check(self.max_candidates >= 1, "tree_search.max_candidates", self.max_candidates, "must be >= 1")
        _check(self.max_nodes >= 1, "tree_search.max_nodes", self.max_nodes, "node budget must be >= 1")
        _check(self.child_draw in CHILD_DRAWS, "tree_search.child_draw", self.child_draw, f"one of {CHILD_DRAWS}")
        _check(self.lookup_tokens >= 0, "tree_search.lookup_tokens", self.lookup_tokens, "must be >= 0 (0 = off)")
        _check(1 <= self.lookup_min_ngram <= self.lookup_max_ngram, "tree_search.lookup_min_ngram",
               (self.lookup_min_ngram, self.lookup_max_ngram), "needs 1 <= lookup_min_ngram <= lookup_max_ngram")
        _check(self.lookup_max_tokens >= 0, "tree_search.lookup_max_tokens", self.lookup_max_tokens,
               "must be >= 0 (<= lookup_tokens: a fixed span)")
        if self.mode == "static":
            b = list(self.branching)
            _check(len(b) >= self.max_depth and all(x >= 1 for x in b), "tree_search.branching", b,
                   f"static mode needs a positive branching factor for each of the {self.max_depth} levels")
            size, width = 0, 1
            for x in b[: self.max_depth]:
                width *= x
                size += width
            _check(size <= self.max_nodes, "tree_search.branching", b,
                   f"the static tree has {size} nodes, more than tree_search.max_nodes={self.max_nodes}")


@dataclass
class PruningConfig:
    strategy: str
    min_acceptance_prob: float
    level_topk: int
    pruning_ratio: float
    max_verify_nodes: int
    adaptive_pruning: bool
    adaptive_rate: float
    cost_profile: Optional[str]

    def __post_init__(self):
        _check(self.strategy in PRUNING_STRATEGIES, "pruning.strategy", self.strategy, f"one of {PRUNING_STRATEGIES}")
        _check(0 <= self.min_acceptance_prob <= 1, "pruning.min_acceptance_prob", self.min_acceptance_prob, "in [0, 1]")
        _check(self.level_topk >= 1, "pruning.level_topk", self.level_topk, "must be >= 1")
        _check(0 <= self.pruning_ratio < 1, "pruning.pruning_ratio", self.pruning_ratio, "in [0, 1)")
        _check(self.max_verify_nodes >= 1, "pruning.max_verify_nodes", self.max_verify_nodes, "must be >= 1")
        _check(0 < self.adaptive_rate <= 5, "pruning.adaptive_rate", self.adaptive_rate, "in (0, 5]")
        _check(not self.adaptive_pruning or self.strategy in ("threshold", "adaptive"), "pruning.adaptive_pruning",
               self.adaptive_pruning, "adapts the threshold: use it with strategy threshold (or strategy adaptive)")


@dataclass
class AffineAlignmentConfig:
    alignment_checkpoint: Optional[str]  # a checkpoint directory, or demo:alignment; null = none
    draft_from_aligned: bool  # propose children from the aligned distribution, not the draft's own

    def __post_init__(self):
        _check(self.alignment_checkpoint is None or isinstance(self.alignment_checkpoint, str),
               "affine_alignment.alignment_checkpoint", self.alignment_checkpoint, "a path, demo:alignment or null")
        _check(not self.draft_from_aligned or bool(self.alignment_checkpoint), "affine_alignment.draft_from_aligned",
               self.draft_from_aligned, "needs affine_alignment.alignment_checkpoint")


@dataclass
class AcceptancePredictorConfig:
    checkpoint: Optional[str]  # a checkpoint directory, or demo:predictor; null = none

    def __post_init__(self):
        _check(self.checkpoint is None or isinstance(self.checkpoint, str), "acceptance_predictor.checkpoint",
               self.checkpoint, "a path, demo:predictor or null")


def _group(name: str, cls: type):
    return field(default_factory=lambda: _structured(cls, default_config()[name], name))


@dataclass
class SpeculativeDecodingConfig:
    model: ModelConfig = _group("model", ModelConfig)
    decoding: DecodingConfig = _group("decoding", DecodingConfig)
    tree_search: TreeSearchConfig = _group("tree_search", TreeSearchConfig)
    affine_alignment: AffineAlignmentConfig = _group("affine_alignment", AffineAlignmentConfig)
    acceptance_predictor: AcceptancePredictorConfig = _group("acceptance_predictor", AcceptancePredictorConfig)
    pruning: PruningConfig = _group("pruning", PruningConfig)

    def __post_init__(self):
        _check(self.tree_search.rank_by != "predictor" or bool(self.acceptance_predictor.checkpoint),
               "tree_search.rank_by", self.tree_search.rank_by, "'predictor' needs acceptance_predictor.checkpoint")

    def validate(self) -> "SpeculativeDecodingConfig":
        """Re-check every value: configs are dataclasses that users change in place after building
        them, so the decoder calls this at every ``generate`` (same ConfigError as at construction)."""
        for f in fields(self):
            group = getattr(self, f.name)
            _check(isinstance(group, _TYPES[f.name]), f.name, type(group).__name__, f"a {_TYPES[f.name].__name__}")
            try:
                group.__post_init__()
            except TypeError as e:  # e.g. a string where a number belongs
                raise ConfigError(f"invalid config group {f.name!r}: {e}") from None
        self.__post_init__()
        return self

    @classmethod
    def from_hydra(cls, cfg: DictConfig) -> "SpeculativeDecodingConfig":
        """Typed, validated view of a composed Hydra config (other top-level keys are ignored)."""
        return cls(**{name: _structured(group, cfg[name], name) for name, group in _TYPES.items()})

    @classmethod
    def from_overrides(cls, overrides: list[str] | None = None) -> "SpeculativeDecodingConfig":
        return cls.from_hydra(compose(overrides))

    def to_dict(self) -> dict:
        return {f.name: OmegaConf.to_container(OmegaConf.structured(getattr(self, f.name))) for f in fields(self)}


_TYPES = {"model": ModelConfig, "decoding": DecodingConfig, "tree_search": TreeSearchConfig,
          "affine_alignment": AffineAlignmentConfig, "acceptance_predictor": AcceptancePredictorConfig,
          "pruning": PruningConfig}


def _structured(cls: type, values, name: str):
    """Merge ``values`` into the schema ``cls`` (type-checked by OmegaConf) and build the dataclass."""
    try:
        if isinstance(values, DictConfig):  # resolve interpolations against the full config first
            values = OmegaConf.to_container(values, resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(cls), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config group {name!r}: {e}") from None


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``configs/config.yaml`` with Hydra (outside a running Hydra app)."""

    gh = GlobalHydra.instance()
    running = gh.hydra  # a @hydra.main app may be running: put its state back afterwards
    gh.clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides or []))
    except HydraException as e:
        raise ConfigError(f"bad config override: {e}") from None
    finally:
        gh.hydra = running


@lru_cache(maxsize=1)
def default_config() -> DictConfig:
    """The composed defaults (cached; read-only)."""
    cfg = compose()
    OmegaConf.set_readonly(cfg, True)
    return cfg
