"""Collect verification traces (node features + conditional labels + alignment pairs), resumable.

    python scripts/collect_traces.py                                    # demo pair, train-only prompts
    python scripts/collect_traces.py model.draft_model_name=demo:draft-lm
    python scripts/collect_traces.py collect_traces.files=[spec_bench.jsonl] collect_traces.allow_eval=true \
        collect_traces.tag=spec_bench collect_traces.num_prompts=20         # shift evaluation only
    python scripts/collect_traces.py logger=wandb

Prints the trace directory; pass it to scripts/train_alignment.py and scripts/train_predictor.py.
"""

import logging

import hydra
from omegaconf import DictConfig

from training.experiments.tracking import start_run
from training.learned.traces import load_traces, run_collect


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    logging.getLogger("training").setLevel(logging.INFO)
    with start_run(cfg, "collect_traces") as tracker:
        out = run_collect(cfg, tracker)
        traces = load_traces(out)
        summary = {"nodes": int(traces["label"].numel()), "pairs": int(traces["target_next"].numel()),
                   "prompts": len(traces["meta"]["prompt_ids"]), "positive_rate": float(traces["label"].mean())}
        tracker.log({f"traces/{k}": v for k, v in summary.items()})
    print(f"traces: {out}")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    return summary["nodes"]


if __name__ == "__main__":
    main()
