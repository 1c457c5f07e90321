"""Held-out protocol: a tuning set and a disjoint test set of every prompt file (``benchmark.split``).

Defaults (tree sizes, prompt lookup, copy mode, predictor thresholds, ...) are chosen on the ``tune``
half; the numbers reported for them come from the ``test`` half. Within each category the prompts
alternate in file order: positions 0, 2, 4, ... are ``tune``, 1, 3, 5, ... are ``test``, so both halves
cover every category alike and a prompt's half never depends on which other prompts were selected.
``all`` keeps every prompt (for runs that neither tune nor report a default).
"""

from __future__ import annotations

from models.errors import ConfigError

SPLITS = ("tune", "test", "all")


def split_rows(rows: list[dict], split: str) -> list[dict]:
    """The rows of ``split`` (file order kept); rows without a ``category`` count as one category."""
    if split not in SPLITS:
        raise ConfigError(f"invalid config value benchmark.split={split!r}: one of {SPLITS}")
    if split == "all":
        return list(rows)
    seen: dict[str, int] = {}
    out = []
    for row in rows:
        cat = row.get("category") or ""
        k = seen.get(cat, 0)
        seen[cat] = k + 1
        if (k % 2 == 0) == (split == "tune"):
            out.append(row)
    return out
