"""Experiment tracking behind one tiny interface: ``start_run(cfg, job)`` -> ``.log(dict)``,
``.log_image(key, png)``, ``.log_table(key, columns, rows)``, ``.finish()`` (or ``with``).

``logger=none`` (default) logs nothing; ``logger=wandb`` logs to Weights & Biases, offline unless
``logger.mode=online`` (or WANDB_MODE=online) and you are logged in; offline runs can be synced
later with ``wandb sync``. Runs of one Hydra ``-m`` sweep share a wandb *group* (the sweep
directory's name, or ``logger.group``) and are named by their overrides, so a dashboard shows a
sweep as one group. ``read_offline_run`` reads back what an offline run wrote (tests use it).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class _Tracker:
    """``with start_run(cfg, job) as tracker:`` finishes the run however the block ends."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


class _NoTracker(_Tracker):
    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_image(self, key: str, path) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        pass

    def finish(self) -> None:
        pass


def _sweep_identity(cfg: DictConfig) -> tuple[str | None, str | None]:
    """(group, name) for a job of a Hydra multirun: the sweep directory's name and the job's
    overrides; (None, None) outside Hydra or for a single run."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None, None
    if hc.mode != RunMode.MULTIRUN:
        return None, None
    return Path(hc.sweep.dir).name, hc.job.override_dirname or f"job{hc.job.num}"


class _WandbTracker(_Tracker):
    def __init__(self, cfg: DictConfig, job: str, group: str | None = None, name: str | None = None):
        import wandb

        lg = cfg.logger
        sweep_group, sweep_name = _sweep_identity(cfg)
        self.run = wandb.init(project=lg.project, entity=lg.entity, mode=lg.mode, job_type=job,
                              group=lg.get("group") or group or sweep_group, name=name or sweep_name,
                              tags=list(lg.tags or []), dir=str(lg.get("dir") or cfg.output_dir),
                              config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, key: str, path) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path))})

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        import wandb

        self.run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def finish(self) -> None:
        self.run.finish()


def start_run(cfg: DictConfig, job: str, group: str | None = None, name: str | None = None):
    backend = cfg.logger.backend if "logger" in cfg else "none"
    if backend == "wandb":
        Path(str(cfg.logger.get("dir") or cfg.output_dir)).mkdir(parents=True, exist_ok=True)
        return _WandbTracker(cfg, job, group, name)
    if backend == "none":
        return _NoTracker()
    raise ValueError(f"unknown logger.backend {backend!r}: none | wandb")


# ---------------------------------------------------------------------- reading an offline run back
_BLOCK, _HEADER = 32768, 7  # wandb's run file: a 7-byte header, then LevelDB-style log blocks


def _records(path: Path):
    """The raw protobuf records of a ``run-*.wandb`` file (LevelDB log framing: per chunk a crc32,
    a little-endian length and a type, FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4; chunks never cross a
    32 KiB block, and a block's tail shorter than a chunk header is padding)."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += room
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def read_offline_run(run_dir: str | Path) -> dict:
    """What an offline wandb run recorded: ``group``, ``name``, ``job_type``, ``config`` (top-level
    keys -> values), ``history`` (one dict per ``log`` call) and ``summary`` (last value per key)."""
    from wandb.proto import wandb_internal_pb2 as pb

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    out = dict(group=None, name=None, job_type=None, config={}, history=[], summary={})

    def key_of(item) -> str:
        return item.key or "/".join(item.nested_key)

    def put(target: dict, item) -> None:
        """item.key, or item.nested_key as nested dicts (a table's or image's fields)."""
        path = [item.key] if item.key else list(item.nested_key)
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = json.loads(item.value_json)

    for raw in _records(files[0]):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(group=run.run_group or None, name=run.display_name or None, job_type=run.job_type or None)
            for item in run.config.update:
                out["config"][key_of(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][key_of(item)] = json.loads(item.value_json)
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                put(row, item)
            out["history"].append({k: v for k, v in row.items() if not k.startswith("_")})
            out["summary"].update(out["history"][-1])
        elif kind == "summary":
            for item in record.summary.update:
                if key_of(item):
                    out["summary"][key_of(item)] = json.loads(item.value_json)
    return out


def offline_runs(root: str | Path) -> list[Path]:
    """Offline run directories under ``root`` (``.../wandb/offline-run-*``), oldest first."""
    return sorted(Path(root).rglob("offline-run-*"))
