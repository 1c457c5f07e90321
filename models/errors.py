"""Errors users see. Each names the problem and, where there is one, the fix.

All derive from ``TreeSpecError`` (a ``ValueError``), so callers can catch the family or one kind.
"""


class TreeSpecError(ValueError):
    """Base class of every error treespec raises on purpose."""


class ConfigError(TreeSpecError):
    """An invalid configuration value (unknown method, negative depth, zero budget, ...)."""


class InputError(TreeSpecError):
    """An invalid generation input (empty prompt, prompt too long, batch > 1, ...)."""


class ModelLoadError(TreeSpecError):
    """A model path that does not exist, a hub id while offline, an unreadable checkpoint."""


class VocabularyMismatchError(TreeSpecError):
    """Draft and target do not share a vocabulary, so draft tokens mean nothing to the target."""


class DrafterError(TreeSpecError):
    """A ``Drafter`` that breaks its contract: ``propose`` must return logits [frontier, vocab]."""


class NumericalError(TreeSpecError):
    """NaN or inf where a model's logits must be finite (e.g. an fp16 overflow in the target)."""
