"""Hydra `-m` sweeps: what each job leaves behind, and one table over a whole sweep directory.

Layout (configs/config.yaml, configs/hydra/launcher/{local,slurm}.yaml):

    <hydra.sweep.dir>/multirun.yaml            the sweep's config and overrides (as typed)
    <hydra.sweep.dir>/<job num>/.hydra/         overrides.yaml, config.yaml, hydra.yaml of the job
    <hydra.sweep.dir>/<job num>/job_status.json completed | failed (+ error), times (``JobRecorder``)
    <hydra.sweep.dir>/<job num>/<results>.json  what the script wrote into output_dir

With the launcher presets, ``output_dir`` is the job's own directory while the job runs (they set
TREESPEC_OUTPUT_DIR through ``hydra.job.env_set``), so every result file sits next to the overrides
that produced it, and parallel jobs never share (or overwrite) an output file. Without them (the
basic launcher), jobs share output_dir; a result found there is matched to a job by the resolved
config the result embeds (its ``config`` key), compared with the job's config on every overridden key.

``summarize(sweep_dir)`` reads every job, one row per job and result row (a benchmark JSON has a
row per temperature and method), with the swept keys as columns and the metrics (tokens/s, tau,
speedup vs target-only, nodes verified/drafted per step, ...); ``write_summary`` writes
summary.csv and plot-<key>.png per swept key (tokens/s and tau against the key's values).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from models.paths import repo_path

STATUS_FILE = "job_status.json"
SKIP_DIRS = {".hydra", ".submitit", "wandb", "__pycache__"}
# Result JSONs a job may leave: generate.json (scripts/generate.py), benchmark-*.json, eval_draft-*.json, ...
NOT_RESULTS = {STATUS_FILE, "summary.json"}

# (column, keys tried in a result row, first found wins)
METRICS = (
    ("tokens_per_s", ("tokens_per_s",)),
    ("tau", ("tau", "mean_accepted_length")),
    ("speedup_vs_target_only", ("speedup_vs_target_only",)),
    ("speedup_vs_hf_assisted", ("speedup_vs_hf_assisted",)),
    ("nodes_per_step", ("nodes_per_step", "nodes_verified_per_step")),  # nodes verified per step (root excluded)
    ("drafted_per_step", ("drafted_per_step", "nodes_drafted_per_step")),  # nodes drafted per step, before pruning
    ("pruned_fraction", ("pruned_fraction",)),
    ("acceptance_rate", ("acceptance_rate",)),
    ("new_tokens", ("new_tokens",)),
    ("time_s", ("time_s", "seconds", "total_time_s")),
)
PLOTTED = ("tokens_per_s", "tau")


# ---------------------------------------------------------------------- the callback
class JobRecorder(Callback):
    """Writes ``job_status.json`` into each job's directory when it ends: status (completed /
    failed), the error and its traceback, start/end time, the task's return value, the output_dir
    the job wrote to. After a whole sweep (every job completed) it prints the summary and writes
    summary.csv and the plots, as ``scripts/summarize_sweep.py`` would."""
    def __init__(self, summarize: bool = True):
        self.summarize = summarize
        self._started: dict[str, tuple[float, str | None]] = {}

    def on_job_start(self, config, **kwargs) -> None:
        # Called inside hydra.job.env_set, so output_dir resolves as the job sees it.
        try:

            out = str(repo_path(config.output_dir))
        except Exception:  # noqa: BLE001 - a record, never a reason to fail the job
            out = None
        self._started[str(config.hydra.runtime.output_dir)] = (time.time(), out)

    def on_job_end(self, config, job_return, **kwargs) -> None:
        job_dir = Path(str(config.hydra.runtime.output_dir))
        started, out = self._started.pop(str(job_dir), (None, None))
        value = getattr(job_return, "_return_value", None)
        status = getattr(getattr(job_return, "status", None), "name", "UNKNOWN")
        record = dict(status=status.lower(), job_num=_safe(lambda: int(config.hydra.job.num)),
                      overrides=_safe(lambda: list(config.hydra.overrides.task)), output_dir=out,
                      started=_iso(started), finished=_iso(time.time()),
                      seconds=round(time.time() - started, 3) if started else None)
        if isinstance(value, BaseException):
            record["error"] = f"{type(value).__name__}: {value}"
            record["traceback"] = "".join(traceback.format_exception(value))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            record["return_value"] = value
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
            (job_dir / STATUS_FILE).write_text(json.dumps(_jsonable(record), indent=1))
        except OSError:
            pass

    def on_multirun_end(self, config, **kwargs) -> None:
        if not self.summarize:
            return
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            summary = summarize(sweep_dir)
            write_summary(summary, sweep_dir)
            print(f"\n{format_summary(summary)}\nwrote {sweep_dir / 'summary.csv'} "
                  f"(again: python scripts/summarize_sweep.py {sweep_dir})", flush=True)
        except Exception as e:  # noqa: BLE001 - the sweep itself succeeded
            print(f"sweep summary failed ({type(e).__name__}: {e}); run scripts/summarize_sweep.py", flush=True)


def _safe(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return None


def _iso(t: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) if t else None


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x if isinstance(x, (int, float, str, bool)) or x is None else str(x)


# ---------------------------------------------------------------------- reading a sweep
@dataclass
class Job:
    num: int | None
    dir: Path | None  # None: the sweep expected this job but it has no directory (not started)
    overrides: dict[str, str]  # key -> value as typed
    values: dict[str, object]  # key -> parsed value (numbers as numbers)
    status: str = "incomplete"  # ok | failed | incomplete | no result | not started | unreadable
    error: str | None = None
    results: list[Path] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)  # {"source": ..., "temperature": ..., "method": ..., metrics}


@dataclass
class Summary:
    sweep_dir: Path
    jobs: list[Job]
    swept: list[str]  # override keys whose values differ between jobs
    fixed: dict[str, str]  # overrides every job shares
    columns: list[str]
    rows: list[dict]  # one per job and result row (failed / incomplete jobs: one row, no metrics)

    @property
    def problems(self) -> list[Job]:
        return [j for j in self.jobs if j.status != "ok"]


def parse_overrides(lines: list[str]) -> tuple[dict[str, str], dict[str, object]]:
    """Hydra overrides -> ({key: value as typed}, {key: parsed value}); ``+``/``++``/``~`` kept in the key."""
    shown, values = {}, {}
    try:

        for o in OverridesParser.create().parse_overrides(list(lines)):
            key = o.input_line.split("=", 1)[0]
            shown[key] = o.get_value_element_as_str() if o.value_type is not None else ""
            values[key] = _plain(o.value()) if o.value_type is not None and not o.is_sweep_override() else shown[key]
    except Exception:  # noqa: BLE001 - keep going on anything Hydra's grammar refuses
        for line in lines:
            key, _, value = str(line).partition("=")
            shown[key], values[key] = value, _number(value)
    return shown, values


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _number(s: str):
    try:
        return int(s)
    except ValueError:
        try:
            return float(s)
        except ValueError:
            return s


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Every directory under ``sweep_dir`` holding ``.hydra/overrides.yaml`` (not inside .submitit)."""
    found = [p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")
             if not any(part.startswith(".submitit") for part in p.relative_to(sweep_dir).parts)]
    return sorted((d for d in found if d != sweep_dir), key=lambda d: _num_key(d, sweep_dir))


def _num_key(d: Path, root: Path):
    rel = d.relative_to(root).as_posix()
    return (0, int(rel), rel) if rel.isdigit() else (1, 0, rel)


def expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The jobs the sweep's overrides (multirun.yaml) expand to, in Hydra's basic-sweeper order
    (job num = index); None when that cannot be worked out (another sweeper, glob sweeps, ...)."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    try:

        cfg = OmegaConf.load(path)
        if "basic" not in str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="basic")).lower():
            return None
        lines = list(OmegaConf.select(cfg, "hydra.overrides.task", default=[]) or [])
        params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
        if params:
            lines = [f"{k}={v}" for k, v in params.items()] + lines
        lists: dict[str, list[str]] = {}
        for o in OverridesParser.create().parse_overrides(lines):
            key = o.get_key_element()
            if o.is_sweep_override():
                if not o.is_discrete_sweep() or o.is_hydra_override():
                    return None
                lists[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
            else:
                lists[key] = [f"{key}={o.get_value_element_as_str()}" if o.value_type is not None else key]
        return [list(x) for x in itertools.product(*lists.values())]
    except Exception:  # noqa: BLE001
        return None


def read_job(job_dir: Path, sweep_dir: Path) -> Job:

    try:
        lines = [str(x) for x in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")]
    except Exception as e:  # noqa: BLE001
        return Job(None, job_dir, {}, {}, status="unreadable", error=f".hydra/overrides.yaml: {e}")
    shown, values = parse_overrides(lines)
    num = _safe(lambda: int(OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra.job.num))
    if num is None:
        num = _safe(lambda: int(job_dir.relative_to(sweep_dir).as_posix()))
    job = Job(num, job_dir, shown, values)
    record = _safe(lambda: json.loads((job_dir / STATUS_FILE).read_text())) or {}
    job.results = result_files(job_dir)
    if not job.results:
        job.results = shared_results(job_dir, record.get("output_dir"), shown)
    for path in job.results:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            job.error = f"{path.name}: {e}"
            continue
        job.rows += [dict(source=_rel(path, sweep_dir), **row) for row in result_rows(data)]
    if record.get("status") == "failed":
        job.status, job.error = "failed", record.get("error") or "failed"
    elif job.rows:
        job.status = "ok"
    elif record.get("status") == "completed":
        job.status = "no result"
        job.error = job.error or "completed without a result file this summary reads"
    else:
        job.status = "incomplete"
        job.error = job.error or "no result and no job_status.json: still running, killed, or failed"
    return job


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def result_files(job_dir: Path) -> list[Path]:
    """Result JSONs under a job directory (its .hydra, .submitit, wandb folders excluded)."""
    out = []
    for p in sorted(job_dir.rglob("*.json")):
        rel = p.relative_to(job_dir).parts
        if p.name in NOT_RESULTS or any(part in SKIP_DIRS or part.startswith(".") for part in rel[:-1]):
            continue
        if any((job_dir / Path(*rel[:i]) / ".hydra").is_dir() for i in range(1, len(rel))):
            continue  # a nested job directory (non-numeric subdirs), read on its own
        out.append(p)
    return out


def shared_results(job_dir: Path, output_dir: str | None, overrides: dict[str, str]) -> list[Path]:
    """Jobs that shared output_dir (basic launcher): the result there whose embedded config matches
    this job's config on every overridden key, the earliest written after the job started."""

    try:
        cfg = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    except Exception:  # noqa: BLE001
        return []
    if output_dir is None:
        raw = cfg._get_node("output_dir") if "output_dir" in cfg else None
        text = None if raw is None else raw._value()
        if not isinstance(text, str) or "${" in text:
            text = _safe(lambda: str(cfg.output_dir)) or "outputs"

        output_dir = str(repo_path(text))
    out = Path(output_dir)
    if not out.is_dir() or out.resolve() == job_dir.resolve():
        return []
    started = (job_dir / ".hydra" / "config.yaml").stat().st_mtime - 1.0
    keys = [k.lstrip("+~") for k in overrides if not k.lstrip("+~").startswith("hydra")]
    keys = [k.split("@", 1)[0].replace("/", ".") for k in keys]
    matches = []
    for p in out.glob("*.json"):
        if p.stat().st_mtime < started:
            continue
        data = _safe(lambda p=p: json.loads(p.read_text()))
        embedded = data.get("config") if isinstance(data, dict) else None
        if not isinstance(embedded, dict):
            continue
        if all(_same(cfg, embedded, k) for k in keys):
            matches.append(p)
    return sorted(matches, key=lambda p: p.stat().st_mtime)[:1]


def _same(cfg, embedded: dict, key: str) -> bool:

    mine = _safe(lambda: OmegaConf.select(cfg, key, throw_on_missing=False))
    if mine is not None and OmegaConf.is_config(mine):
        mine = _safe(lambda: OmegaConf.to_container(mine, resolve=True))
    theirs = embedded
    for part in key.split("."):
        if not isinstance(theirs, dict) or part not in theirs:
            return False
        theirs = theirs[part]
    return mine == theirs


def result_rows(data) -> list[dict]:
    """Metric rows of one result JSON: a table of rows per method (benchmark: under runs/<temperature>,
    eval_draft: under speed), else one row from the top-level record (generate.json, see ``metrics_of``)."""
    rows = []
    if isinstance(data, dict):
        runs = data.get("runs")
        if isinstance(runs, dict):
            for temperature, run in runs.items():
                table = run.get("rows") if isinstance(run, dict) else None
                if isinstance(table, dict):
                    rows += [dict(temperature=_number(str(temperature)), method=m, **metrics_of(r))
                             for m, r in table.items() if isinstance(r, dict)]
        if not rows:
            for where in (data, data.get("speed")):
                table = where.get("rows") if isinstance(where, dict) else None
                if isinstance(table, dict) and all(isinstance(r, dict) for r in table.values()):
                    rows += [dict(method=m, **metrics_of(r)) for m, r in table.items()]
                    break
        if not rows:
            flat = metrics_of(data)
            if any(flat.get(k) is not None for k in PLOTTED):
                method = data.get("method") or next((d["method"] for d in (data.get("summary"), data.get("stats"))
                                                     if isinstance(d, dict) and d.get("method")), None)
                temp = data.get("temperature")
                rows.append(dict(**({"temperature": temp} if temp is not None else {}),
                                 **({"method": method} if method else {}), **flat))
    return rows


def metrics_of(record: dict) -> dict:
    """The METRICS of one result record. generate.json: its ``summary``, then ``stats``
    (GenerationStats.as_dict(); nodes per step derived from its counts), and ``compare.speedup``
    (compare=true: the target alone on the same prompt) as the speedup vs target-only."""
    parts = [record.get(k) if isinstance(record.get(k), dict) else {} for k in ("stats", "summary")]
    merged = {**parts[0], **parts[1], **{k: v for k, v in record.items() if k not in ("stats", "summary")}}
    compare = record.get("compare")
    if isinstance(compare, dict) and _is_number(compare.get("speedup")):
        merged.setdefault("speedup_vs_target_only", compare["speedup"])
    steps = merged.get("steps")
    if steps:
        if merged.get("drafted_tokens") is not None:
            merged.setdefault("nodes_per_step", merged["drafted_tokens"] / steps)
        if merged.get("nodes_drafted") is not None:
            merged.setdefault("drafted_per_step", merged["nodes_drafted"] / steps)
    out = {}
    for column, keys in METRICS:
        value = next((merged[k] for k in keys if _is_number(merged.get(k))), None)
        out[column] = value
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summarize(sweep_dir: str | Path) -> Summary:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no such sweep directory: {sweep_dir}")
    jobs = [read_job(d, sweep_dir) for d in find_job_dirs(sweep_dir)]
    expected = expected_jobs(sweep_dir)
    if expected and all(j.num is not None for j in jobs):  # jobs the sweep planned that never started
        have = {j.num for j in jobs}
        for num, lines in enumerate(expected):
            if num not in have:
                shown, values = parse_overrides(lines)
                jobs.append(Job(num, None, shown, values, status="not started", error="no job directory"))
        jobs.sort(key=lambda j: (j.num is None, j.num or 0))
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no Hydra job directories (<job>/.hydra/overrides.yaml)")
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    swept = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    if not swept and len(jobs) == 1:
        swept = keys
    fixed = {k: jobs[0].overrides[k] for k in keys if k not in swept and k in jobs[0].overrides}
    rows = []
    for j in jobs:
        base = dict(job=j.num if j.num is not None else (j.dir.name if j.dir else ""), status=j.status,
                    **{k: j.values.get(k) for k in swept})
        if j.rows:
            rows += [dict(base, **r, error=j.error if j.status != "ok" else None) for r in j.rows]
        else:
            rows.append(dict(base, error=j.error))
    _fill_speedup(rows, swept)
    extra = [c for c in ("temperature", "method") if any(r.get(c) is not None for r in rows)]
    metrics = [c for c, _ in METRICS if any(r.get(c) is not None for r in rows)]
    columns = ["job", "status", *swept, *extra, *metrics, "source", "error"]
    return Summary(sweep_dir, jobs, swept, fixed, columns, rows)


def _fill_speedup(rows: list[dict], swept: list[str]) -> None:
    """Rows without speedup_vs_target_only (generate runs): when the sweep has a target-only job with the
    same other swept values (decoding.method=target_only,...), tokens/s over that job's."""
    method_key = next((k for k in swept if k.lstrip("+") == "decoding.method"), None)

    def method(r):
        return r.get(method_key) if method_key else r.get("method")

    others = [k for k in swept if k != method_key]
    base = {}
    for r in rows:
        if method(r) == "target_only" and _is_number(r.get("tokens_per_s")) and r["tokens_per_s"] > 0:
            base.setdefault((tuple(repr(r.get(k)) for k in others), r.get("temperature")), r["tokens_per_s"])
    if not base:
        return
    for r in rows:
        if r.get("speedup_vs_target_only") is None and _is_number(r.get("tokens_per_s")):
            ref = base.get((tuple(repr(r.get(k)) for k in others), r.get("temperature")))
            if ref:
                r["speedup_vs_target_only"] = r["tokens_per_s"] / ref


# ---------------------------------------------------------------------- writing it
def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def write_summary(summary: Summary, out_dir: str | Path | None = None) -> list[Path]:
    """summary.csv and one plot-<key>.png per swept key in ``out_dir`` (default: the sweep dir)."""
    out_dir = Path(out_dir or summary.sweep_dir)
    path = out_dir / "summary.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(summary.columns)
        for r in summary.rows:
            w.writerow([_cell(r.get(c)) if c != "error" else (r.get(c) or "") for c in summary.columns])
    written = [path]
    for key in summary.swept:
        png = plot_key(summary, key, out_dir / f"plot-{_slug(key)}.png")
        if png is not None:
            written.append(png)
    return written


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_") or "key"


def format_summary(summary: Summary, width: int = 28) -> str:
    cols = [c for c in summary.columns if c not in ("source", "error")]
    cells = [[_cell(r.get(c))[:width] for c in cols] for r in summary.rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = [f"sweep {summary.sweep_dir}: {len(summary.jobs)} jobs, swept: {', '.join(summary.swept) or '-'}"]
    if summary.fixed:
        lines.append("fixed: " + " ".join(f"{k}={v}" for k, v in summary.fixed.items()))
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    if summary.problems:
        lines.append(f"\n{len(summary.problems)} job(s) without a result:")
        for j in summary.problems:
            where = _rel(j.dir, summary.sweep_dir) if j.dir else "-"
            over = " ".join(f"{k}={j.overrides[k]}" for k in summary.swept if k in j.overrides)
            lines.append(f"  job {j.num if j.num is not None else where} [{j.status}] {over}: "
                         f"{(j.error or '').splitlines()[0] if j.error else ''}  ({where})")
    return "\n".join(lines)


def plot_key(summary: Summary, key: str, path: Path) -> Path | None:
    """tokens/s and tau against the values of one swept key; one line per other setting (other swept
    keys, temperature, method), so each line varies ``key`` alone."""
    from matplotlib.figure import Figure

    rows = [r for r in summary.rows if r.get("status") == "ok" and any(_is_number(r.get(m)) for m in PLOTTED)]
    if not rows:
        return None
    values = list(dict.fromkeys(_hashable(r.get(key)) for r in rows))
    numeric = all(_is_number(v) for v in values)
    order = sorted(values) if numeric else values
    position = {v: (v if numeric else i) for i, v in enumerate(order)}
    group_keys = [k for k in summary.swept if k != key] + [c for c in ("temperature", "method") if c in summary.columns]
    group_keys = [k for k in group_keys if len({_hashable(r.get(k)) for r in rows}) > 1]  # only what tells lines apart
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(_hashable(r.get(k)) for k in group_keys), []).append(r)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, len(PLOTTED))
    for ax, metric in zip(axes, PLOTTED):
        for label, members in groups.items():
            pts = sorted((position[_hashable(r.get(key))], r[metric]) for r in members if _is_number(r.get(metric)))
            if not pts:
                continue
            name = ", ".join(f"{k}={_cell(v)}" for k, v in zip(group_keys, label)) or None
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel(key)
        ax.set_ylabel({"tokens_per_s": "tokens/s", "tau": "tau (tokens per verify step)"}[metric])
        ax.grid(alpha=0.3)
        if not numeric:
            ax.set_xticks(range(len(order)), [_cell(v) for v in order], rotation=20, ha="right")
        elif len(order) <= 12:
            ax.set_xticks(order, [_cell(v) for v in order])
    handles, labels = axes[0].get_legend_handles_labels()
    if any(labels):
        fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize=8)
    fig.suptitle(f"{summary.sweep_dir.name}: {key}")
    fig.savefig(path, dpi=100)
    return path


def _hashable(v):
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v
