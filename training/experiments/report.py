"""What ``scripts/benchmark.py`` shows of a ``run_benchmark`` result: rich tables, PNG plots, the headline.

    print_report(out, console)              # overall, per category (speedup, tau), time per phase
    plot_benchmark(runs, stem)              # <stem>-categories.png, <stem>-acceptance_depth.png, <stem>-phases.png
    headline(runs)                          # the number a Hydra sweeper optimises

``runs`` maps a temperature label to a ``run_benchmark`` result; every figure has one row of axes per
temperature. Plots use matplotlib's object API (``matplotlib.figure.Figure``), no pyplot state.
"""

from __future__ import annotations

import sys
from pathlib import Path

from training.experiments.benchmark import BASELINES, OUTSIDE, PHASE_KEYS, is_peer

OVERALL = "overall"
MAX_DEPTHS_SHOWN = 5  # the table's per-depth column; the JSON and the plot have every depth
PLOTS = ("categories", "acceptance_depth", "phases")


def _fmt(value, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _depths(rates) -> str:
    """Acceptance per depth as whole percentages, e.g. "41 46 55"."""
    if not rates:
        return "-"
    shown = " ".join("-" if v is None else f"{100 * v:.0f}" for v in rates[:MAX_DEPTHS_SHOWN])
    return shown + (" .." if len(rates) > MAX_DEPTHS_SHOWN else "")


def _plain(name: str):
    """A method or category name as plain text: rich would read ``llama_cpp[ngram-simple]`` as markup."""
    from rich.text import Text

    return Text(str(name))


def _table(title: str, columns: list[str], caption: str | None = None):
    from rich import box
    from rich.table import Table

    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                  collapse_padding=True, title_justify="left", caption_justify="left")
    for i, name in enumerate(columns):
        table.add_column(_plain(name), justify="left" if i == 0 else "right", no_wrap=True)
    return table


def overall_table(rows: dict, memory: dict | None = None):
    mem = (memory or {}).get("measure", "peak memory")
    table = _table("overall", ["method", "tok/s", "tau", "accept", "by depth %", "x target", "x HF assisted",
                               "identical", "peak MiB"],
                   caption=f"by depth %: accepted at depth 1, 2, .. / steps that reached it\npeak MiB: {mem}")
    for m, r in rows.items():
        ident = "-" if r["identical"] is None else f"{r['identical']}/{r['prompts']}"
        peak = r.get("peak_memory_bytes")
        table.add_row(_plain(m), _fmt(r["tokens_per_s"]), _fmt(r["tau"]), _fmt(r["acceptance_rate"], 3),
                      _depths(r.get("acceptance_per_depth")), _fmt(r.get("speedup_vs_target_only")),
                      _fmt(r.get("speedup_vs_hf_assisted")), ident, _fmt(peak / 2 ** 20 if peak else None, 0))
    return table


def with_overall(out: dict) -> dict:
    """{category: {method: row}} and, last, the overall rows under ``overall`` (``overall (all)`` if a
    category is itself called overall)."""
    cats = dict(out.get("categories") or {})
    label = OVERALL if OVERALL not in cats else f"{OVERALL} (all)"
    return {**cats, label: out["rows"]}


def category_table(out: dict, key: str, title: str, methods: list[str] | None = None, digits: int = 2):
    """Categories (and overall) x methods, the cell ``row[key]``."""
    rows = with_overall(out)
    methods = methods if methods is not None else list(out["rows"])
    last = list(out.get("categories") or {})[-1:]
    table = _table(title, ["category", "prompts", *methods])
    for cat, by_method in rows.items():
        n = max((r["prompts"] for r in by_method.values()), default=0)
        table.add_row(_plain(cat), str(n), *(_fmt(by_method[m].get(key), digits) if m in by_method else "-" for m in methods),
                      end_section=[cat] == last)
    return table


def phase_table(rows: dict):
    """ms per new token in each phase (only phases some method spent time in), and the total."""
    used = [k for k in PHASE_KEYS if any((r["phase_ms_per_token"].get(k) or 0) > 0 for r in rows.values())]
    table = _table("time per phase, ms per new token", ["method", *used, "total"],
                   caption=f"{OUTSIDE}: wall time outside the decoder's phases (HF, llama.cpp: all)")
    for m, r in rows.items():
        ms = r["phase_ms_per_token"]
        total = sum(v for v in ms.values() if v is not None) if r["new_tokens"] else None
        table.add_row(_plain(m), *(_fmt(ms.get(k), 1) if k in ms else "-" for k in used), _fmt(total, 1))
    return table


def print_report(out: dict, console) -> None:
    """The tables of one ``run_benchmark`` result on a rich ``Console``."""
    rows = out["rows"]
    console.print()
    console.print(overall_table(rows, out.get("memory")))
    if out.get("categories"):
        methods = list(rows)
        drafting = [m for m, r in rows.items() if r["tau"] is not None and m != "target_only"]
        tables = [("tokens_per_s", "tok/s by category", methods, 2)]
        if "target_only" in rows:
            tables.append(("speedup_vs_target_only", "speedup vs target_only by category",
                           [m for m in methods if m != "target_only"], 2))
        if drafting:
            tables += [("tau", "tau by category", drafting, 2),
                       ("acceptance_rate", "acceptance rate by category", drafting, 3)]
        for key, title, names, digits in tables:
            console.print()
            console.print(category_table(out, key, title, names, digits))
    console.print()
    console.print(phase_table(rows))


def make_console(width: int = 100):
    """A rich Console: the terminal's width on a terminal, else ``width`` columns (logs, pipes)."""

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else width, highlight=False)


# ---------------------------------------------------------------------- headline
def headline(runs: dict) -> dict:
    """The sweep objective: at the first temperature, the overall speedup vs target_only of ``tree``
    (else ``chain``, else the first other treespec run); tokens/s when target_only did not run."""
    temperature, out = next(iter(runs.items()))
    rows = out["rows"]
    others = [m for m in rows if m != "target_only" and not is_peer(m)]  # treespec runs, not the peers
    method = next((m for m in ("tree", "chain") if m in rows), others[0] if others else next(iter(rows)))
    metric = "speedup_vs_target_only" if rows[method].get("speedup_vs_target_only") is not None else "tokens_per_s"
    return {"temperature": temperature, "method": method, "metric": metric, "value": rows[method][metric]}


# ---------------------------------------------------------------------- plots
def _colors(methods: list[str]) -> dict:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _grouped_bars(ax, groups: list[str], values: dict[str, list], colors: dict, ylabel: str) -> None:
    """Bars per group (x) and method (colour); None values leave a gap."""
    methods = list(values)
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        ys = [v if v is not None else 0.0 for v in values[m]]
        bars = ax.bar(xs, ys, width, label=m, color=colors[m])
        for bar, v in zip(bars, values[m]):
            if v is None:
                bar.set_visible(False)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def plot_benchmark(runs: dict, stem: str | Path) -> dict[str, str]:
    """Three PNGs next to ``stem`` (a path without suffix); returns {name: path}."""
    from matplotlib.figure import Figure

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(m for out in runs.values() for m in out["rows"]))
    colors = _colors(methods)
    n = len(runs)
    paths = {}

    # tau and speedup per category
    n_groups = max(len(out.get("categories") or {}) + 1 for out in runs.values())
    fig = Figure(figsize=(max(8.0, 1.6 * n_groups + 4), 3.6 * n), layout="constrained")
    axes = fig.subplots(n, 2, squeeze=False)
    for (temperature, out), (ax_tau, ax_speed) in zip(runs.items(), axes):
        cats = with_overall(out)
        groups = list(cats)
        tau_methods = [m for m, r in out["rows"].items() if r["tau"] is not None]
        _grouped_bars(ax_tau, groups, {m: [cats[c].get(m, {}).get("tau") for c in groups] for m in tau_methods},
                      colors, "tau (tokens / verify forward)")
        ax_tau.set_title(f"T={temperature}: tau by category", fontsize=10)
        base = next((b for b in BASELINES if b in out["rows"]), None)
        if base is not None:
            speed_methods = [m for m in out["rows"] if m != base]
            _grouped_bars(ax_speed, groups, {m: [cats[c].get(m, {}).get(f"speedup_vs_{base}") for c in groups]
                                             for m in speed_methods}, colors, f"speedup vs {base} (tok/s ratio)")
            ax_speed.axhline(1.0, color="black", lw=0.8, ls="--")
            ax_speed.set_title(f"T={temperature}: speedup vs {base} by category", fontsize=10)
        else:
            ax_speed.text(0.5, 0.5, "no baseline (target_only / hf_assisted) ran", ha="center", va="center",
                          transform=ax_speed.transAxes)
            ax_speed.set_axis_off()
        for ax in (ax_tau, ax_speed):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    paths["categories"] = _save(fig, stem, "categories")

    # acceptance per depth
    fig = Figure(figsize=(7.0, 3.4 * n), layout="constrained")
    axes = fig.subplots(n, 1, squeeze=False)
    for (temperature, out), (ax,) in zip(runs.items(), axes):
        drawn = False
        for m, r in out["rows"].items():
            rates = r.get("acceptance_per_depth") or []
            pts = [(d + 1, v) for d, v in enumerate(rates) if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m, color=colors[m])
                drawn = True
        ax.set_xlabel("depth d")
        ax.set_ylabel("P(accept at d | reached d-1)")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.set_title(f"T={temperature}: acceptance per depth", fontsize=10)
        if drawn:
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no drafted tokens", ha="center", va="center", transform=ax.transAxes)
    paths["acceptance_depth"] = _save(fig, stem, "acceptance_depth")

    # time per phase: stacked bars per method
    fig = Figure(figsize=(max(7.0, 1.1 * len(methods) + 3), 3.6 * n), layout="constrained")
    axes = fig.subplots(n, 1, squeeze=False)
    phase_colors = _colors(list(PHASE_KEYS))
    for (temperature, out), (ax,) in zip(runs.items(), axes):
        names = list(out["rows"])
        bottom = [0.0] * len(names)
        for k in PHASE_KEYS:
            ys = [out["rows"][m]["phase_ms_per_token"].get(k) or 0.0 for m in names]
            if any(ys):
                ax.bar(range(len(names)), ys, 0.6, bottom=bottom, label=k, color=phase_colors[k])
                bottom = [b + y for b, y in zip(bottom, ys)]
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("ms per new token")
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"T={temperature}: time per phase ({OUTSIDE}: not inside a decoder phase)", fontsize=10)
        ax.legend(fontsize=7, ncols=2)
    paths["phases"] = _save(fig, stem, "phases")
    return paths


def _save(fig, stem: Path, name: str) -> str:
    path = stem.parent / f"{stem.name}-{name}.png"
    fig.savefig(path, dpi=110)
    return str(path)
