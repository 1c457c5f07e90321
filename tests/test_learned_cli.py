"""The learned-core pipeline end to end on a tiny pair, through the scripts users run:
collect_traces -> train_alignment -> train_predictor (with shift traces) -> generate with both plugged in."""

import json

import pytest
from conftest import run_script


def test_traces_alignment_predictor_generate(tiny_pair_dirs, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name, n in (("train_a.jsonl", 12), ("spec_bench.jsonl", 4)):
        (data / name).write_text("\n".join(json.dumps({"id": f"{name}-{i}", "category": "c",
                                                       "prompt": " ".join(f"w{(i * 7 + j) % 90 + 2}" for j in range(4))})
                                           for i in range(n)))
    pair = [f"model.target_model_name={tiny_pair_dirs / 'target'}", f"model.draft_model_name={tiny_pair_dirs / 'draft'}",
            f"data_dir={data}", f"output_dir={tmp_path}", "hydra.run.dir=" + str(tmp_path / "h")]
    common = ["collect_traces.max_new_tokens=24", "collect_traces.shard_prompts=4", "collect_traces.tree_search.max_depth=3",
              "collect_traces.tree_search.max_nodes=10", "collect_traces.tree_search.max_candidates=3"]
    traces, shift = tmp_path / "traces", tmp_path / "shift"
    out = run_script("collect_traces.py", *pair, *common, "collect_traces.files=[train_a.jsonl]",
                     "collect_traces.num_prompts=12", f"collect_traces.out_dir={traces}")
    assert "nodes:" in out and len(list(traces.glob("shard-*.safetensors"))) == 3
    out = run_script("collect_traces.py", *pair, *common, "collect_traces.files=[spec_bench.jsonl]",
                     "collect_traces.num_prompts=4", f"collect_traces.out_dir={shift}", "collect_traces.allow_eval=true")
    align = tmp_path / "alignment"
    out = run_script("train_alignment.py", *pair, f"train_alignment.traces={traces}", f"train_alignment.out_dir={align}",
                     "train_alignment.val_fraction=0.2", "train_alignment.test_fraction=0.2")
    metrics = json.loads((align / "metrics.json").read_text())
    for key in ("r2", "cosine", "top1_agreement", "draft_top1_agreement", "ridge_lambda"):
        assert key in metrics, key
    assert (align / "alignment.png").stat().st_size > 0
    pred = tmp_path / "predictor"
    out = run_script("train_predictor.py", *pair, f"train_predictor.traces={traces}", f"train_predictor.out_dir={pred}",
                     f"train_predictor.alignment={align}", f"train_predictor.shift_traces={shift}",
                     "train_predictor.epochs=3", "train_predictor.hidden=[16]", "train_predictor.cal_fraction=0.25",
                     "train_predictor.test_fraction=0.25")
    report = json.loads((pred / "metrics.json").read_text())
    for key in ("auroc", "brier", "ece_uncalibrated", "ece_calibrated", "temperature", "baseline_auroc", "baseline_ece",
                "c2t_auroc", "c2t_ece", "n_train", "n_heldout"):
        assert key in report, key
    assert report["shift"]["n"] > 0 and (pred / "reliability.png").is_file() and (pred / "reliability-shift.png").is_file()
    # Training on evaluation-set traces is refused.
    with pytest.raises(AssertionError, match="evaluation set"):
        run_script("train_predictor.py", *pair, f"train_predictor.traces={shift}", f"train_predictor.out_dir={tmp_path / 'x'}")
    out = run_script("generate.py", *pair, "prompt='w5 w6 w7'", "decoding.max_new_tokens=12",
                     f"affine_alignment.alignment_checkpoint={align}", f"acceptance_predictor.checkpoint={pred}",
                     "tree_search.rank_by=predictor")
    assert "12 new tokens in" in out and "expected" in out
