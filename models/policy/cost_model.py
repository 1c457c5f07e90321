"""CostModel: what one decode step costs on this machine, for the tree policy (step 3 of the loop).

The policy picks the node set that maximises tokens per unit time,

    (expected accepted + 1) / (draft time + verify time(N)),

so it needs two measured curves (``models/policy/cost_profile.py`` measures them with the real pair):

    verify_ms[N]   one target forward over N new tokens after a cached prefix; N counts every tree
                   node sent to verification *including the root* (target-only decoding is N = 1)
    draft_ms[F]    one draft forward (one tree level) over a frontier of F nodes

Between measured points the curves are interpolated linearly; beyond the ends they are extended
along the line through the two outermost points, and never go below 0. ``key`` says what the
profile was measured for (device, dtype, threads, versions, the pair's fingerprints, context), so a
cached profile is reused only on the machine and pair it describes; ``meta`` holds the rest
(settings, raw samples, when). Pure: the only I/O is JSON (de)serialisation (``save`` / ``load``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

__all__ = ["CostModel", "interpolate", "monotone"]


def interpolate(points: dict[int, float], x: float) -> float:
    """Piecewise-linear ``points`` at ``x``; linear extrapolation through the two outermost points
    on either side; clamped to >= 0, and beyond the largest measured size never below the cost
    measured there (more tokens never cost less than the most measured: a noisy profile whose
    last two points fall must not extrapolate to free verification). One point: constant. No
    points: 0."""
    if not points:
        return 0.0
    xs = sorted(points)
    if len(xs) == 1:
        return max(float(points[xs[0]]), 0.0)
    if x <= xs[0]:
        a, b = xs[0], xs[1]
    elif x >= xs[-1]:
        a, b = xs[-2], xs[-1]
    else:
        b = next(v for v in xs if v >= x)
        a = xs[xs.index(b) - 1]
    ya, yb = float(points[a]), float(points[b])
    y = ya + (yb - ya) * (x - a) / (b - a)
    if x > xs[-1]:
        y = max(y, float(points[xs[-1]]))
    return max(y, 0.0)


def monotone(points: dict[int, float]) -> dict[int, float]:
    """The least-squares non-decreasing fit of ``points`` (pool adjacent violators): verifying more
    tokens never costs less, so a measured point above a later one is noise (a slow spell of the
    machine) and both are pooled to their mean instead of telling the policy that, say, 4 nodes cost
    more than 12."""
    xs = sorted(points)
    blocks: list[list[float]] = []  # [sum, count] per pooled block, left to right
    for x in xs:
        blocks.append([float(points[x]), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    out, i = {}, 0
    for total, count in blocks:
        for _ in range(int(count)):
            out[xs[i]] = total / count
            i += 1
    return out


def _int_keys(d: dict, name: str) -> dict[int, float]:
    out = {}
    for k, v in (d or {}).items():
        k, v = int(k), float(v)
        if k < 1:
            raise ValueError(f"{name}: sizes must be >= 1, got {k}")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}[{k}] = {v}: times must be finite and >= 0")
        out[k] = v
    return dict(sorted(out.items()))


@dataclass
class CostModel:
    """Measured step costs (milliseconds). See the module docstring for what N and F count."""

    verify_ms: dict[int, float]  # N (tree nodes incl. root) -> target forward ms
    draft_ms: dict[int, float] = field(default_factory=dict)  # F (frontier width) -> one draft level ms
    key: dict = field(default_factory=dict)  # what it was measured for (compared exactly on reuse)
    meta: dict = field(default_factory=dict)  # settings, raw samples, timestamps (informative)

    def __post_init__(self):
        self.verify_ms = _int_keys(self.verify_ms, "verify_ms")
        self.draft_ms = _int_keys(self.draft_ms, "draft_ms")
        if not self.verify_ms:
            raise ValueError("a CostModel needs at least one verify_ms point")
        self._verify_fit = monotone(self.verify_ms)

    @classmethod
    def synthetic(cls, verify: dict, draft: dict | None = None, **meta) -> "CostModel":
        """A hand-made profile (tests, what-if studies); its key says so."""
        return cls(verify_ms=dict(verify), draft_ms=dict(draft or {}), key={"synthetic": True}, meta=dict(meta))

    # ------------------------------------------------------------------ queries
    def verify(self, n: float) -> float:
        """ms of one target forward over ``n`` tokens (tree nodes including the root), from the
        measured points made non-decreasing in ``n`` (``monotone``)."""
        return interpolate(self._verify_fit, n)

    def draft(self, width: float) -> float:
        """ms of one draft level over a frontier of ``width`` nodes (0 when no draft was profiled)."""
        return interpolate(self.draft_ms, width)

    def draft_total(self, levels) -> float:
        """Draft time of a step whose draft forwards had frontier widths ``levels``."""
        return sum(self.draft(w) for w in levels)

    def step_ms(self, levels: Sequence[int], n_nodes: int) -> float:
        """ms of one decode step: one draft forward per entry of ``levels`` (its frontier width; the
        root's own forward is a level of width 1) plus the verify forward over the root and
        ``n_nodes`` drafted nodes, i.e. ``sum(draft(w) for w in levels) + verify(n_nodes + 1)``."""
        return self.draft_total(levels) + self.verify(n_nodes + 1)

    def rate(self, expected_accepted: float, draft_ms: float, n_nodes: int) -> float:
        """Expected tokens per ms of a step that verifies ``n_nodes`` drafted nodes expected to yield
        ``expected_accepted`` accepted tokens (+1: the target's own token)."""
        return (expected_accepted + 1.0) / max(draft_ms + self.verify(n_nodes + 1), 1e-9)

    def best_size(self, expected_cum: Sequence[float], draft_ms: float) -> int:
        """How many drafted nodes to verify: the k in ``0 .. len(expected_cum) - 1`` maximising
        ``(expected_cum[k] + 1) / (draft_ms + verify(k + 1))``.

        ``expected_cum[k]`` is the sum of the k largest path probabilities (so ``expected_cum[0]``
        is 0); ``draft_ms`` is what drafting this step cost. Ties go to the smaller k.
        """
        cum = [float(x) for x in expected_cum]
        if not cum:
            raise ValueError("expected_cum must hold at least expected_cum[0] = 0")
        best, best_rate = 0, -1.0
        for k, e in enumerate(cum):
            r = self.rate(e, draft_ms, k)
            if r > best_rate * (1 + 1e-12):
                best, best_rate = k, r
        return best

    # ------------------------------------------------------------------ display
    def table(self) -> str:
        """Both curves as a printable table, each with its ratio to the smallest size (N = 1, F = 1)."""
        lines = ["verify (target forward over N tokens, root included; 'used' = the non-decreasing fit the "
                 "policy reads)", f"{'N':>6} {'ms':>10} {'used':>10} {'x N=1':>8}"]
        v1 = self.verify(1)
        for n, ms in self.verify_ms.items():
            used = self._verify_fit[n]
            lines.append(f"{n:>6} {ms:>10.3f} {used:>10.3f} {used / v1 if v1 > 0 else float('nan'):>8.2f}")
        lines += ["", "draft (one level over a frontier of F nodes)", f"{'F':>6} {'ms':>10} {'x F=1':>8}"]
        if not self.draft_ms:
            lines.append(f"{'-':>6} {'-':>10} {'-':>8}")
        d1 = self.draft(1)
        for w, ms in self.draft_ms.items():
            lines.append(f"{w:>6} {ms:>10.3f} {ms / d1 if d1 > 0 else float('nan'):>8.2f}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return {"verify_ms": {str(k): v for k, v in self.verify_ms.items()},
                "draft_ms": {str(k): v for k, v in self.draft_ms.items()},
                "key": self.key, "meta": self.meta}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        return cls(verify_ms=d["verify_ms"], draft_ms=d.get("draft_ms", {}), key=d.get("key", {}),
                   meta=d.get("meta", {}))

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        """Write ``to_json()`` atomically (a crash never leaves a half-written profile)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json() + "\n")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        return cls.from_json(Path(path).read_text())
