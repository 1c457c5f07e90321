"""One table over a Hydra `-m` sweep: every job's swept overrides next to its results.

    python scripts/summarize_sweep.py outputs/multirun/2026-11-23_16-02-11

Reads each job directory of the sweep (<job>/.hydra/overrides.yaml, <job>/job_status.json and the
result JSON the job wrote: generate.json, benchmark-*.json, eval_draft-*.json), prints one row per
job and result row with the swept keys as columns and tokens/s, tau, speedup vs target-only, nodes
verified / drafted per step, ...; writes summary.csv and plot-<key>.png (tokens/s and tau against
each swept key) into the sweep directory. Failed, unfinished and never-started jobs are listed.
With ``--wandb`` the table and the plots also go to a wandb run (offline unless WANDB_MODE=online
and you are logged in) in the sweep's group (the sweep directory's name), job type summarize_sweep.
Exit status: 0 when at least one job has a result, 1 otherwise.
"""

import argparse
import sys
from pathlib import Path

from training.experiments.sweep import format_summary, summarize, write_summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory (hydra.sweep.dir)")
    parser.add_argument("--out", type=Path, default=None, help="where summary.csv and the plots go (default: sweep_dir)")
    parser.add_argument("--wandb", action="store_true", help="also log the table and plots to wandb (the sweep's group)")
    parser.add_argument("--project", default="treespec", help="wandb project (with --wandb)")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.sweep_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    written = write_summary(summary, out)
    print(format_summary(summary))
    print("\nwrote " + ", ".join(str(p) for p in written))
    if args.wandb:
        log_to_wandb(summary, written, out, args.project)
    return 0 if any(j.status == "ok" for j in summary.jobs) else 1


def log_to_wandb(summary, written: list[Path], out: Path, project: str) -> None:
    import os

    from omegaconf import OmegaConf

    from training.experiments.tracking import start_run

    cfg = OmegaConf.create({"output_dir": str(out), "logger": {
        "backend": "wandb", "project": project, "entity": None, "mode": os.environ.get("WANDB_MODE", "offline"),
        "tags": ["sweep-summary"], "group": Path(summary.sweep_dir).name, "dir": str(out)},
        "sweep_dir": str(summary.sweep_dir), "swept": list(summary.swept)})
    with start_run(cfg, "summarize_sweep", name="summary") as tracker:
        tracker.log_table("sweep/summary", summary.columns, [[r.get(c) for c in summary.columns] for r in summary.rows])
        for path in written:
            if path.suffix == ".png":
                tracker.log_image(f"sweep/{path.stem}", path)
        tracker.log({"sweep/jobs": len(summary.jobs), "sweep/ok": sum(j.status == "ok" for j in summary.jobs)})


if __name__ == "__main__":
    sys.exit(main())
