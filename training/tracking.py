"""Experiment tracking behind one tiny interface: ``start_run(cfg, job)`` -> ``.log(dict)``, ``.finish()``.

``logger=none`` (default) logs nothing; ``logger=wandb`` logs to Weights & Biases, offline unless
``logger.mode=online`` (or WANDB_MODE=online) and you are logged in; offline runs can be synced
later with ``wandb sync``.
"""

from __future__ import annotations

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

    def finish(self) -> None:
        pass


class _WandbTracker(_Tracker):
    def __init__(self, cfg: DictConfig, job: str):
        import wandb

        lg = cfg.logger
        self.run = wandb.init(project=lg.project, entity=lg.entity, mode=lg.mode, job_type=job,
                              tags=list(lg.tags or []), dir=str(cfg.output_dir),
                              config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, key: str, path) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path))})

    def finish(self) -> None:
        self.run.finish()


def start_run(cfg: DictConfig, job: str):
    backend = cfg.logger.backend if "logger" in cfg else "none"
    if backend == "wandb":
        return _WandbTracker(cfg, job)
    if backend == "none":
        return _NoTracker()
    raise ValueError(f"unknown logger.backend {backend!r}: none | wandb")
