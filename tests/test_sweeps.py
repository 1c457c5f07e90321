"""Hydra sweeps (launcher presets, per-job results, scripts/summarize_sweep.py) and scripts/show_tree.py."""

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    noisy_copy,
    run_script,
    script_result,
    tiny_model,
    tiny_tokenizer,
)
from omegaconf import OmegaConf

from models.config import SpeculativeDecodingConfig
from models.paths import CONFIG_DIR

OPTIONS = sorted(f"{p.parent.relative_to(CONFIG_DIR).as_posix()}={p.stem}" for p in CONFIG_DIR.rglob("*.yaml")
                 if p.parent != CONFIG_DIR)
PNG = b"\x89PNG\r\n\x1a\n"


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


# ---------------------------------------------------------------------- configs
def test_launcher_presets_are_listed():
    assert {"hydra/launcher=local", "hydra/launcher=slurm"} <= set(OPTIONS)


@pytest.mark.parametrize("option", OPTIONS)
def test_every_config_composes(option):
    """Every option of every group, the hydra/launcher presets included, composes (with its Hydra part)."""
    cfg = compose([option])
    assert SpeculativeDecodingConfig.from_hydra(cfg).validate()
    if option.startswith("hydra/launcher="):
        assert cfg.hydra.runtime.choices["hydra/launcher"] == option.split("=")[1]
        assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")


def test_local_launcher_preset():
    cfg = compose(["hydra/launcher=local", "tree_search.max_nodes=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 2
    assert compose(["hydra/launcher=local", "hydra.launcher.n_jobs=1"]).hydra.launcher.n_jobs == 1
    hydra = OmegaConf.to_container(cfg.hydra, resolve=False)
    # Each job's output_dir is its own directory: TREESPEC_OUTPUT_DIR from hydra.job.env_set.
    assert hydra["job"]["env_set"]["TREESPEC_OUTPUT_DIR"] == "${hydra.runtime.output_dir}"
    assert hydra["callbacks"]["treespec_jobs"]["_target_"] == "training.experiments.sweep.JobRecorder"
    assert hydra["sweep"]["subdir"] == "${hydra.job.num}"
    assert compose([]).hydra.launcher._target_.endswith("BasicLauncher")  # plain -m is unchanged


def test_output_dir_follows_the_job_env(monkeypatch):
    monkeypatch.delenv("TREESPEC_OUTPUT_DIR", raising=False)
    assert compose([]).output_dir == "outputs"
    monkeypatch.setenv("TREESPEC_OUTPUT_DIR", "/tmp/some-job")
    cfg = compose([])
    assert cfg.output_dir == "/tmp/some-job"
    assert compose(["output_dir=/x"]).output_dir == "/x"  # an explicit override still wins


def test_slurm_launcher_preset_renders_an_sbatch_script(tmp_path, monkeypatch):
    """The slurm preset instantiates the submitit launcher and its parameters make a valid sbatch script
    (rendered offline: a stand-in srun on PATH, nothing submitted)."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.cpus_per_task == 8
    assert cfg.hydra.callbacks.treespec_jobs._target_ == "training.experiments.sweep.JobRecorder"
    assert "TREESPEC_OUTPUT_DIR" in cfg.hydra.job.env_set
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(cluster="slurm", folder=launcher.params["submitit_folder"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())  # the launcher's own mapping (submitit_launcher.launch)
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in launcher.params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ("--partition=gpu", "--time=30", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=32GB"):
        assert f"#SBATCH {line}" in script, line
    assert str(tmp_path / "sweep" / ".submitit") in script


# ---------------------------------------------------------------------- summarize_sweep on made-up sweeps
def make_job(sweep, num, overrides, config=None, result=None, result_name="generate.json", status=None):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config or {"output_dir": "outputs"}))
    if result is not None:
        (job / result_name).write_text(json.dumps(result))
    if status is not None:
        (job / "job_status.json").write_text(json.dumps(status))
    return job


def generate_result(tps, tau, method="tree", compare=None, flat=False):
    """What scripts/generate.py writes (generate.json: summary, GenerationStats.as_dict(), compare, config);
    ``flat``: a bare record of the headline numbers and the stats, read the same way."""
    stats = dict(method=method, new_tokens=12, steps=6, drafted_tokens=30, nodes_drafted=60, pruned_fraction=0.5,
                 acceptance_rate=0.2, mean_accepted_length=tau, tokens_per_s=tps, total_time_s=12 / tps,
                 time_s={"draft": 0.1, "verify": 0.2})
    if flat:
        return dict(new_tokens=12, tokens_per_s=tps, tau=tau, stats=stats)
    summary = dict(method=method, new_tokens=12, seconds=round(12 / tps, 3), tokens_per_s=tps, tau=tau,
                   acceptance_rate=0.2, nodes_verified_per_step=5.0, nodes_drafted_per_step=10.0, pruned_fraction=0.5,
                   stop_reason="max_new_tokens", time_share={"draft": 0.3, "verify": 0.7})
    return dict(prompt="w5 w6", text="w7 w8", summary=summary, stats=stats, config={"prompt": "w5 w6"},
                compare=None if compare is None else dict(tokens_per_s=tps / compare, speedup=compare, identical=True))


def benchmark_result(config=None):
    rows = {"target_only": dict(tokens_per_s=20.0, tau=1.0, new_tokens=8, speedup_vs_target_only=1.0),
            "tree": dict(tokens_per_s=30.0, tau=1.8, new_tokens=8, nodes_per_step=5.0, drafted_per_step=9.0,
                         pruned_fraction=0.44, speedup_vs_target_only=1.5)}
    return dict(config=config or {}, runs={"0.0": {"rows": rows, "skipped": []}})


def test_summarize_mixed_sweep(tmp_path):
    """Results of both kinds (generate.json, benchmark-*.json), a failed job, one still running and one
    never started: one table, the problems listed, nothing raised."""
    from training.experiments.sweep import format_summary, summarize, write_summary

    sweep = tmp_path / "sweep"
    (sweep).mkdir()
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
        "overrides": {"task": ["prompt='w5 w6'", "decoding.method=tree,target_only", "tree_search.max_nodes=4,8,16"]}}}))
    fixed = ["prompt='w5 w6'"]
    make_job(sweep, 0, [*fixed, "decoding.method=tree", "tree_search.max_nodes=4"], result=generate_result(50.0, 2.5),
             status={"status": "completed"})
    make_job(sweep, 1, [*fixed, "decoding.method=tree", "tree_search.max_nodes=8"], result=benchmark_result(),
             result_name="benchmark-20260101-000000.json")
    make_job(sweep, 2, [*fixed, "decoding.method=tree", "tree_search.max_nodes=16"],
             status={"status": "failed", "error": "RuntimeError: out of memory"})
    make_job(sweep, 3, [*fixed, "decoding.method=target_only", "tree_search.max_nodes=4"],
             result=generate_result(25.0, 1.0, method="target_only", flat=True))
    make_job(sweep, 4, [*fixed, "decoding.method=target_only", "tree_search.max_nodes=8"])  # still running
    summary = summarize(sweep)
    assert summary.swept == ["decoding.method", "tree_search.max_nodes"]
    assert summary.fixed == {"prompt": "'w5 w6'"}
    status = {j.num: j.status for j in summary.jobs}
    assert status == {0: "ok", 1: "ok", 2: "failed", 3: "ok", 4: "incomplete", 5: "not started"}
    rows = {(r["job"], r.get("method")): r for r in summary.rows}
    r0 = rows[0, "tree"]
    assert r0["tokens_per_s"] == 50.0 and r0["tau"] == 2.5 and r0["tree_search.max_nodes"] == 4
    assert r0["nodes_per_step"] == 5.0 and r0["drafted_per_step"] == 10.0  # from generate's stats: 30 / 6, 60 / 6
    assert r0["speedup_vs_target_only"] == pytest.approx(2.0)  # vs job 3: target_only at the same max_nodes
    assert rows[1, "tree"]["speedup_vs_target_only"] == 1.5 and rows[1, "target_only"]["temperature"] == 0.0
    assert "out of memory" in rows[2, None]["error"]
    written = write_summary(summary)
    assert {p.name for p in written} == {"summary.csv", "plot-decoding.method.png", "plot-tree_search.max_nodes.png"}
    assert all(p.read_bytes()[:8] == PNG for p in written if p.suffix == ".png")
    with (sweep / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 7  # 0, 1 (two methods), 2, 3, 4, 5
    assert {"job", "status", "decoding.method", "tree_search.max_nodes", "tokens_per_s", "tau",
            "speedup_vs_target_only", "nodes_per_step"} <= set(table[0])
    text = format_summary(summary)
    assert "3 job(s) without a result" in text and "not started" in text and "failed" in text
    # The CLI: a plain positional argument, exit 0 while some job has a result.
    code, out, err = script_result("summarize_sweep.py", str(sweep))
    assert code == 0, err[-2000:]
    assert "tokens_per_s" in out and "summary.csv" in out
    code, _, err = script_result("summarize_sweep.py", str(tmp_path / "nothing"))
    assert code == 2 and "no such sweep directory" in err


def test_generate_json_rows():
    """generate.json with compare=true: its own speedup vs the target alone; the summary's numbers first."""
    from training.experiments.sweep import result_rows

    (row,) = result_rows(generate_result(40.0, 2.0, compare=1.6))
    assert row["method"] == "tree" and row["tokens_per_s"] == 40.0 and row["tau"] == 2.0
    assert row["speedup_vs_target_only"] == 1.6 and row["nodes_per_step"] == 5.0 and row["drafted_per_step"] == 10.0
    assert row["time_s"] == 0.3 and row["pruned_fraction"] == 0.5 and row["new_tokens"] == 12
    assert result_rows({"config": {}, "note": "no metrics"}) == []


def test_summarize_matches_results_in_a_shared_output_dir(tmp_path):
    """Jobs of the basic launcher share output_dir: each result is matched to the job whose config it embeds."""
    from training.experiments.sweep import summarize

    shared, sweep = tmp_path / "shared", tmp_path / "sweep"
    shared.mkdir()
    for n in (4, 8):
        config = {"output_dir": str(shared), "tree_search": {"max_nodes": n, "mode": "dynamic"}}
        make_job(sweep, n // 8, [f"output_dir={shared}", f"tree_search.max_nodes={n}"], config=config)
        result = benchmark_result(config)
        result["runs"]["0.0"]["rows"]["tree"]["tokens_per_s"] = float(n)
        (shared / f"benchmark-{n}.json").write_text(json.dumps(result))
    (shared / "unrelated.json").write_text(json.dumps({"config": {"tree_search": {"max_nodes": 99}}}))
    summary = summarize(sweep)
    tree = {r["tree_search.max_nodes"]: r for r in summary.rows if r.get("method") == "tree"}
    assert tree[4]["tokens_per_s"] == 4.0 and tree[8]["tokens_per_s"] == 8.0
    assert tree[4]["source"].endswith("benchmark-4.json")


# ---------------------------------------------------------------------- real sweeps and show_tree
def test_joblib_sweep_then_summary(tiny_pair_dirs, tmp_path, monkeypatch):
    """A two-job -m sweep of generate.py through the joblib launcher preset, logged to wandb (offline):
    each job in its own directory with job_status.json, generate.json and its wandb run (grouped by the
    sweep); then summarize_sweep.py over it, its table and plots also logged to wandb in that group."""
    from training.experiments.tracking import offline_runs, read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = tmp_path / "sweep"
    # a real subprocess: the joblib launcher runs the jobs in worker processes of its own anyway
    run_script("generate.py", "-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep}", "logger=wandb",
               f"model.target_model_name={tiny_pair_dirs / 'target'}", f"model.draft_model_name={tiny_pair_dirs / 'draft'}",
               "prompt='w5 w6 w7'", "decoding.max_new_tokens=8", "pruning=none", "tree_search.max_nodes=2,4", in_process=False)
    names = set()
    for num, nodes in ((0, "2"), (1, "4")):
        job = sweep / str(num)
        assert f"tree_search.max_nodes={nodes}" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        status = json.loads((job / "job_status.json").read_text())
        assert status["status"] == "completed" and status["job_num"] == num
        assert Path(status["output_dir"]) == job.resolve()  # results land next to the overrides
        assert (job / "generate.json").is_file()
        [run_dir] = offline_runs(job)  # wandb offline: the job's run, in the sweep's group
        run = read_offline_run(run_dir)
        assert run["group"] == "sweep" and run["job_type"] == "generate" and f"max_nodes={nodes}" in run["name"]
        assert run["config"]["tree_search"]["max_nodes"] == int(nodes) and run["config"]["logger"]["backend"] == "wandb"
        assert run["summary"]["generate/new_tokens"] == 8 and run["summary"]["generate/tokens_per_s"] > 0
        assert run["summary"]["generate/tau"] >= 1
        names.add(run["name"])
    assert len(names) == 2
    assert (sweep / "summary.csv").is_file()  # written by the callback after the sweep
    (sweep / "summary.csv").unlink()
    code, out, err = script_result("summarize_sweep.py", str(sweep), "--wandb")
    assert code == 0, err[-2000:]
    with (sweep / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["tree_search.max_nodes"] for r in table] == ["2", "4"] and "tree_search.max_nodes" in out
    assert all(r["status"] == "ok" and float(r["tokens_per_s"]) > 0 and float(r["tau"]) >= 1 for r in table)
    assert (sweep / "plot-tree_search.max_nodes.png").read_bytes()[:8] == PNG
    [summary_run] = [r for r in offline_runs(sweep) if r.parent.parent == sweep]
    run = read_offline_run(summary_run)
    assert run["group"] == "sweep" and run["job_type"] == "summarize_sweep"
    assert run["summary"]["sweep/jobs"] == 2 and run["summary"]["sweep/ok"] == 2
    assert run["summary"]["sweep/summary"]["_type"] == "table-file" and run["summary"]["sweep/summary"]["nrows"] == 2
    assert "sweep/plot-tree_search.max_nodes" in run["summary"]


def test_show_tree_cli(tiny_pair_dirs, tmp_path):
    png = tmp_path / "tree.png"
    out = run_script("show_tree.py", f"model.target_model_name={tiny_pair_dirs / 'target'}",
                     f"model.draft_model_name={tiny_pair_dirs / 'draft'}", "prompt='w5 w6 w7'", "decoding.max_new_tokens=10",
                     "pruning=ratio", "step=2", f"output={png}", f"hydra.run.dir={tmp_path / 'h'}")
    assert png.read_bytes()[:8] == PNG and "step 2 of" in out and "verified" in out


# ---------------------------------------------------------------------- training/experiments/tree_plot.py
@pytest.fixture(scope="module")
def decoder():
    from speculative_decoder import SpeculativeDecoder

    target = tiny_model("llama")
    config = SpeculativeDecodingConfig.from_overrides(["pruning=ratio", "pruning.pruning_ratio=0.5",
                                                       "tree_search=dynamic", "tree_search.max_depth=3",
                                                       "tree_search.max_candidates=3", "tree_search.max_nodes=8",
                                                       "decoding.max_new_tokens=12"])
    return SpeculativeDecoder.from_models(target, noisy_copy(target, 0.3), tiny_tokenizer(), config)


def test_capture_step_sees_pruned_nodes(decoder):
    from training.experiments.tree_plot import (
        StepNotReached,
        capture_step,
        draw_tree,
        step_view,
    )

    record, drafted, stats, steps = capture_step(decoder, "w5 w6 w7", step=1)
    assert "_search" not in vars(decoder)  # the recording wrapper is gone afterwards
    assert drafted is not None and drafted.num_drafted > record.tree.num_drafted > 0  # ratio 0.5 cut some
    view = step_view(record, drafted, decoder.tokenizer, step=1, steps=steps, stats=stats, prompt="w5 w6 w7")
    assert view.num_drafted == drafted.num_drafted and view.num_verified == record.tree.num_drafted and not view.notes
    assert all(view.verified[i] for i in view.accepted) and view.accepted[0] == 0
    # The verified nodes are the drafted ones marked verified, in order, same tokens and same parents.
    kept = [i for i, v in enumerate(view.verified) if v]
    assert [int(drafted.tokens[i]) for i in kept] == record.tree.tokens.tolist()
    assert [kept.index(view.parents[i]) if i else -1 for i in kept] == record.tree.parents.tolist()
    assert view.labels[0] == f'"{decoder.tokenizer.decode([int(record.tree.tokens[0])])}"'
    assert view.bonus == f'"{decoder.tokenizer.decode([record.next_token])}"'
    assert 0 < min(view.draft_prob[1:]) and max(view.draft_prob) <= 1
    fig = draw_tree(view)
    assert "step 1 of" in fig.axes[0].get_title(loc="left")
    with pytest.raises(StepNotReached, match="choose step"):
        capture_step(decoder, "w5 w6 w7", step=steps + 1)
    assert "_search" not in vars(decoder)


def test_step_view_without_pruning_and_with_predictions(decoder, tmp_path):
    """No pruner: the drafted tree is the verified one; predicted acceptance shows when the tree has it."""
    from models.decoding.tree import DraftTree
    from training.experiments.tree_plot import draw_tree, escape, layout, step_view

    tree = DraftTree.from_root(5)
    tree.add_children(torch.tensor([0, 0]), torch.tensor([6, 7]), torch.log(torch.tensor([0.6, 0.3])),
                      accept_prob=torch.tensor([0.7, 0.2]))
    tree.add_children(torch.tensor([1]), torch.tensor([8]), torch.log(torch.tensor([0.5])), accept_prob=torch.tensor([0.4]))

    class Record:
        path, next_token = [0, 1], 9

    Record.tree = tree
    view = step_view(Record, None, decoder.tokenizer, step=3)
    assert view.verified == [True] * 4 and view.accepted == [0, 1]
    assert view.accept_prob == pytest.approx([1.0, 0.7, 0.2, 0.4])
    assert view.draft_prob == pytest.approx([1.0, 0.6, 0.3, 0.5])
    x, y = layout(view.parents, extra_child_of=1)
    assert x == [0, 1, 1, 2, 2] and y[1] == (y[3] + y[4]) / 2  # node 1's children: 3 and the bonus
    draw_tree(view).savefig(tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG
    assert escape("a\nb$c") == r"a\nb\$c" and escape("x" * 40, 8) == "x" * 7 + "\u2026"
