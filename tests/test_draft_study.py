"""The draft-design study: equal-size drafts built, trained alike from teacher shards (resumable), measured."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    TEACHER,
    make_prompts,
    run_script,
    script_result,
    tiny_model,
    tiny_tokenizer,
)

from models.errors import ConfigError
from training.drafts import study, teacher_data
from training.drafts.distill import _logits_at, kl_loss

PNG = b"\x89PNG\r\n\x1a\n"
# Tiny llama (hidden 32, head size 8): 4 heads x MLP 128 in one layer ~ 2 heads x MLP 64 in two.
TINY_SHAPES = [dict(name="wide", layers=1, heads=4, intermediate_size=128),
               dict(name="deep", layers=2, heads=2, intermediate_size=64)]


def cfg(**kw):
    base = dict(steps=12, batch_size=3, max_seq_len=48, lr=5e-3, warmup_steps=2, weight_decay=0.0,
                student_bf16=False, save_every=4, seed=0)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    target = tiny_model("llama", seed=0)
    target.generation_config.eos_token_id = 1
    paths = teacher_data.build_shards(target, tiny_tokenizer(), make_prompts(16), tmp_path_factory.mktemp("teacher"),
                                      TEACHER, {"t": 1}, progress=False)
    return target, teacher_data.load_shards(paths)


def test_shapes_are_checked():
    target = tiny_model("llama")
    shapes = study.read_shapes(TINY_SHAPES)
    counts = study.check_equal_budget(target, shapes, 0.05)
    assert abs(counts["wide"] / counts["deep"] - 1) < 0.05
    with pytest.raises(ConfigError, match="not of about equal size"):
        study.check_equal_budget(target, study.read_shapes(TINY_SHAPES + [dict(name="big", layers=2, heads=4,
                                                                                  intermediate_size=128)]), 0.05)
    with pytest.raises(ConfigError, match="at least two"):
        study.read_shapes(TINY_SHAPES[:1])
    with pytest.raises(ConfigError, match="positive integer"):
        study.read_shapes([dict(TINY_SHAPES[0], layers=0), TINY_SHAPES[1]])
    with pytest.raises(ConfigError, match="lacks"):
        study.read_shapes([{"name": "x", "layers": 1}, TINY_SHAPES[1]])
    with pytest.raises(ConfigError, match="repeated"):
        study.read_shapes([TINY_SHAPES[0], TINY_SHAPES[0]])


def test_study_draft_shares_the_targets_vocabulary_matrices():
    target = tiny_model("llama")
    for shape in study.read_shapes(TINY_SHAPES):
        draft = study.make_study_draft(target, shape, seed=0)
        assert draft.config.num_hidden_layers == shape.layers and len(draft.model.layers) == shape.layers
        layer = draft.model.layers[0]
        assert layer.self_attn.q_proj.out_features == shape.heads * 8 and layer.mlp.up_proj.out_features == shape.intermediate_size
        assert torch.equal(draft.model.embed_tokens.weight, target.model.embed_tokens.weight)
        assert torch.equal(draft.lm_head.weight, target.lm_head.weight) and torch.equal(draft.model.norm.weight, target.model.norm.weight)
        again = study.make_study_draft(target, shape, seed=0)
        assert all(torch.equal(a, b) for a, b in zip(draft.parameters(), again.parameters()))  # seeded
    assert target.config.num_hidden_layers == 2 and target.config.num_attention_heads == 4  # left alone


def test_teacher_states_line_up_with_the_batches(shards):
    """The stored states, gathered in the order of each batch's ``sel``, give the target's own logits there."""
    target, data = shards
    seqs, states = study.study_sequences(data, max_seq_len=14)  # short: most sequences lose prompt tokens
    assert all(len(ids) <= 14 and 1 <= start < len(ids) for ids, start in seqs)
    batches = study.training_batches(seqs, states, cfg(steps=5, batch_size=4), pad_id=1)
    teacher = study.teacher_logits_from_states(target.lm_head.weight, states)
    for ids, sel, rows in batches:
        with torch.no_grad():
            want = _logits_at(target, ids, sel)
        # fp16 storage of the states; positions whose prefix was cut see a shorter context in ``ids``,
        # so compare only uncut sequences exactly and the argmax everywhere it is not a near-tie
        got = teacher(ids, sel, rows)
        assert got.shape == want.shape
        top2 = want.topk(2).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.5
        uncut = torch.cat([torch.full((int(sel[r].sum()),), len(seqs[i][0]) < 14) for r, i in enumerate(rows)])
        mask = clear & uncut
        assert torch.equal(got.argmax(-1)[mask], want.argmax(-1)[mask])


def test_training_learns_and_resumes_exactly(shards, tmp_path):
    target, data = shards
    shapes = study.read_shapes(TINY_SHAPES)
    seqs, states = study.study_sequences(data, 48)
    batches = study.training_batches(seqs, states, cfg(), pad_id=1)
    teacher = study.teacher_logits_from_states(target.lm_head.weight, states)
    def mean_kl(draft):
        with torch.no_grad():
            return sum(kl_loss(teacher(*b), _logits_at(draft, b[0], b[1])).item() for b in batches) / len(batches)

    before = mean_kl(study.make_study_draft(target, shapes[1], seed=0))
    out, rec = study.train_shape(target, tiny_tokenizer(), shapes[1], batches, teacher, cfg(), tmp_path / "a", {"m": 1},
                                 progress=False)
    from transformers import AutoModelForCausalLM
    assert rec["steps"] == 12 and mean_kl(AutoModelForCausalLM.from_pretrained(out)) < 0.8 * before, rec
    assert (out / study.MARKER).is_file() and (out / "config.json").is_file()

    calls = {"n": 0}

    def failing(*batch):  # interrupted after 9 steps (state saved at step 8)
        calls["n"] += 1
        if calls["n"] > 9:
            raise KeyboardInterrupt
        return teacher(*batch)

    with pytest.raises(KeyboardInterrupt):
        study.train_shape(target, tiny_tokenizer(), shapes[1], batches, failing, cfg(), tmp_path / "b", {"m": 1},
                          progress=False)
    assert (tmp_path / "b" / ".deep.state.pt").is_file() and not (tmp_path / "b" / "deep").exists()
    out_b, rec_b = study.train_shape(target, tiny_tokenizer(), shapes[1], batches, teacher, cfg(), tmp_path / "b",
                                     {"m": 1}, progress=False)
    assert rec_b["kl_curve"] == rec["kl_curve"]  # the resumed run took the same steps
    a, b = (AutoModelForCausalLM.from_pretrained(p) for p in (out, out_b))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not (tmp_path / "b" / ".deep.state.pt").exists()
    # a finished draft is reused, not retrained
    _, again = study.train_shape(target, tiny_tokenizer(), shapes[1], batches, failing, cfg(), tmp_path / "b", {"m": 1},
                                 progress=False)
    assert again == rec_b


def test_spearman_and_verdict():
    assert study.spearman([1, 2, 4, 8], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert study.spearman([1, 2, 3], [1, 1, 1]) is None
    assert study.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    row = lambda n, layers, tps, top1, ms: dict(name=n, layers=layers, tokens_per_s=tps, top1=top1, draft_ms=ms,  # noqa: E731
                                               tau=1.5, speedup_vs_target_only=tps / 10)
    v = study.verdict([row("c", 4, 10, 0.4, 4), row("a", 1, 12, 0.3, 2), row("b", 2, 11, 0.35, 3)])
    assert v["claim_holds"] and v["fastest"] == "a" and v["most_accurate"] == "c" and v["fastest_is_shallowest"]
    assert v["spearman_depth_vs"]["tokens_per_s"] == pytest.approx(-1.0)
    assert v["shallow_over_deep"]["tokens_per_s"] == pytest.approx(1.2) and v["latency_spread"] == pytest.approx(1.0)
    assert "shallower half (a) vs deeper half (c)" in v["summary"]
    v = study.verdict([row("a", 1, 10, 0.3, 2), row("b", 2, 11, 0.35, 3), row("c", 4, 12, 0.4, 4)])
    assert not v["claim_holds"] and "does not hold" in v["summary"]
    # the shallower half wins although the fastest single design is not the shallowest one
    v = study.verdict([row("a", 1, 12, 0.3, 2), row("b", 2, 13, 0.3, 2), row("c", 4, 10, 0.2, 2), row("d", 8, 9, 0.1, 2)])
    assert v["claim_holds"] and not v["fastest_is_shallowest"] and v["shallow_over_deep"]["tokens_per_s"] == pytest.approx(25 / 19)


def test_draft_study_cli(tiny_pair_dirs, tmp_path, monkeypatch):
    """The preset end to end on a tiny pair: teacher shards made, two drafts trained, measured against
    the target alone (identical outputs), table, verdict, JSON, PNG and an offline wandb run."""
    from training.experiments.tracking import offline_runs, read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in make_prompts(12)))
    (data / "bench.jsonl").write_text("\n".join(json.dumps(dict(r, category=f"c{i % 2}")) for i, r in
                                                enumerate(make_prompts(6, seed=3))))
    shapes = "[" + ",".join("{name:%s,layers:%d,heads:%d,intermediate_size:%d}" % tuple(s.values()) for s in TINY_SHAPES) + "]"
    out = run_script("draft_study.py", "experiment=draft_study", f"model.target_model_name={tiny_pair_dirs / 'target'}",
                     f"data_dir={data}", f"output_dir={tmp_path / 'out'}", "logger=wandb",
                     "draft.teacher.files=[train.jsonl]", "draft.teacher.shard_prompts=4", "draft.teacher.batch_size=4",
                     "draft.teacher.max_new_tokens=8", "draft.teacher.dtype=float32",
                     f"draft_study.shapes={shapes}", "draft_study.teacher_shards=2", "draft_study.steps=6",
                     "draft_study.batch_size=2", "draft_study.max_seq_len=32", "draft_study.student_bf16=false",
                     "draft_study.prompts_per_category=1", "draft_study.max_new_tokens=8",
                     f"draft_study.reference={tiny_pair_dirs / 'draft'}",
                     "eval_draft.prompt_file=bench.jsonl", "eval_draft.num_prompts=3", "eval_draft.max_new_tokens=8",
                     "eval_draft.latency_repeats=2", "eval_draft.chain_depth=2", "benchmark.prompt_file=bench.jsonl")
    assert "the shallow-and-wide claim" in out and "wide" in out and "reference" in out
    [js] = (tmp_path / "out").glob("draft_study-*.json")
    result = json.loads(js.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"wide", "deep", "reference"} and not rows["reference"]["equal_recipe"]
    for r in rows.values():
        assert r["identical"] == r["prompts"] == 2  # greedy tree decoding with every draft == the target alone
        assert r["tokens_per_s"] > 0 and r["tau"] >= 1 and r["draft_ms"] > 0 and 0 <= r["top1"] <= 1
    assert rows["wide"]["layers"] == 1 and rows["deep"]["layers"] == 2
    assert result["verdict"]["fastest"] in ("wide", "deep") and result["provenance"]["git"]
    assert js.with_suffix(".png").read_bytes()[:8] == PNG
    [run_dir] = offline_runs(tmp_path / "out")
    run = read_offline_run(run_dir)
    assert run["job_type"] == "draft_study" and "deep/tokens_per_s" in run["summary"]
    assert run["summary"]["draft_study"]["nrows"] == 3
    # a rerun reuses the trained drafts (nothing retrained) and gives the same agreement
    again = run_script("draft_study.py", "experiment=draft_study", f"model.target_model_name={tiny_pair_dirs / 'target'}",
                       f"data_dir={data}", f"output_dir={tmp_path / 'out2'}",
                       "draft.teacher.files=[train.jsonl]", "draft.teacher.shard_prompts=4", "draft.teacher.batch_size=4",
                       "draft.teacher.max_new_tokens=8", "draft.teacher.dtype=float32",
                       f"draft_study.shapes={shapes}", "draft_study.teacher_shards=2", "draft_study.steps=6",
                       "draft_study.batch_size=2", "draft_study.max_seq_len=32", "draft_study.student_bf16=false",
                       "draft_study.prompts_per_category=1", "draft_study.max_new_tokens=8", "draft_study.reference=null",
                       "eval_draft.prompt_file=bench.jsonl", "eval_draft.num_prompts=3", "eval_draft.max_new_tokens=8",
                       "eval_draft.latency_repeats=2", "eval_draft.chain_depth=2", "benchmark.prompt_file=bench.jsonl")
    [js2] = (tmp_path / "out2").glob("draft_study-*.json")
    rows2 = {r["name"]: r for r in json.loads(js2.read_text())["rows"]}
    assert rows2["deep"]["top1"] == rows["deep"]["top1"] and rows2["deep"]["kl_curve"] == rows["deep"]["kl_curve"]


def test_draft_study_needs_its_preset(tiny_pair_dirs):
    code, _, err = script_result("draft_study.py", f"model.target_model_name={tiny_pair_dirs / 'target'}")
    assert code != 0 and "experiment=draft_study" in err
