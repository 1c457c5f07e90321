"""Verification traces: labels, accepted flags and alignment pairs say exactly what verification saw;
shards round-trip, resume and refuse damage; evaluation prompt sets stay out of training data."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import noisy_copy, tiny_model, tiny_tokenizer

from models.decoding.verification import verify_greedy
from models.errors import ConfigError, ModelLoadError
from speculative_decoder import SpeculativeDecoder, SpeculativeDecodingConfig
from training.learned.traces import (
    TraceRecorder,
    collect,
    load_traces,
    read_prompt_rows,
    split_by_prompt,
)

# pruning=none: what the recorder stores must not depend on this machine's measured cost curves (under
# load the cost-aware policy may verify no drafted node at all on the tiny pair).
TREE = ["pruning=none", "decoding.method=tree", "tree_search=dynamic", "tree_search.max_depth=4", "tree_search.max_candidates=3",
        "tree_search.max_nodes=12", "tree_search.lookup_tokens=0"]  # traces are of drafted nodes only
PROMPT = [5, 9, 17, 33, 2]
TEMPERATURE = 0.8


def tiny_pair():
    target = tiny_model("llama")
    target.generation_config.eos_token_id = None
    return target, noisy_copy(target, 0.3)


def make_decoder(target, draft, *overrides) -> SpeculativeDecoder:
    config = SpeculativeDecodingConfig.from_overrides(TREE + list(overrides))
    return SpeculativeDecoder.from_models(target, draft, tiny_tokenizer(), config)


def traced_run(decoder, max_new: int, **gen):
    """(recorder tensors, [(step record, committed ids before that step)]) of one generate call."""
    recorder = TraceRecorder(decoder.config.tree_search.child_draw)
    records, committed = [], list(PROMPT)

    def observe(rec):
        if not records:  # the first root comes from the prefill
            committed.append(int(rec.tree.tokens[0]))
        assert int(rec.tree.tokens[0]) == committed[-1]
        recorder(rec)
        records.append((rec, list(committed)))
        committed.extend(rec.tree.tokens[rec.path[1:]].tolist() + [rec.next_token])

    decoder.generate(torch.tensor([PROMPT]), max_new, on_step=observe, **gen)
    return recorder.tensors(), records


@torch.no_grad()
def fresh(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [V], final hidden state [H]) after ``ids``, from a plain sequential forward."""
    out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.logits[0, -1], out.hidden_states[-1][0, -1]


def per_step(tensors, records):
    """(record, prefix, node rows, pair rows, first pair row) of each step with drafted nodes."""
    node, pair = 0, 0
    for rec, prefix in records:
        tree = rec.tree
        if tree.num_drafted == 0:
            continue
        n, p = tree.num_drafted, len(tree.expansions)
        yield rec, prefix, slice(node, node + n), slice(pair, pair + p), pair
        node, pair = node + n, pair + p
    assert node == tensors["label"].numel() and pair == tensors["target_next"].numel()


def check_structure(tensors, records):
    """accepted = the verified path; parent_pair -> the pair of the node's parent (its h_target,
    h_draft, target argmax); one pair per expanded node of the verified tree."""
    steps = 0
    for rec, _, nodes, pairs, base in per_step(tensors, records):
        tree, steps = rec.tree, steps + 1
        parents = tree.parents[1:]
        on_path = torch.zeros(len(tree), dtype=torch.uint8)
        on_path[rec.path] = 1
        assert torch.equal(tensors["accepted"][nodes], on_path[1:])
        assert torch.equal(tensors["token"][nodes], tree.tokens[1:])
        assert torch.equal(tensors["features"][nodes], tree.features[1:])
        expanded = sorted(tree.expansions)
        assert set(parents.tolist()) <= set(expanded)  # every parent was expanded (and verified)
        assert pairs.stop - pairs.start == len(expanded)
        amax = rec.target_logits.argmax(-1)
        for j, u in enumerate(parents.tolist()):
            row = int(tensors["parent_pair"][nodes][j])
            assert row == base + expanded.index(u)
            torch.testing.assert_close(tensors["h_target"][row].float(), rec.target_hidden[u].float(),
                                       atol=1e-2, rtol=1e-3)
            torch.testing.assert_close(tensors["h_draft"][row].float(), tree.expansions[u].hidden.float(),
                                       atol=1e-2, rtol=1e-3)
            assert int(tensors["target_next"][row]) == int(amax[u])
            assert int(tensors["draft_next"][row]) == tree.expansions[u].argmax
    return steps


def test_greedy_labels_are_verification_decisions():
    target, draft = tiny_pair()
    tensors, records = traced_run(make_decoder(target, draft), 40)
    assert check_structure(tensors, records) >= 5
    labels = tensors["label"]
    assert 0 < labels.mean() < 1  # both classes are present
    for rec, prefix, nodes, _, _ in per_step(tensors, records):
        tree = rec.tree
        path, nxt = verify_greedy(tree, rec.target_logits)
        assert (path, nxt) == (rec.path, rec.next_token)
        label = labels[nodes]
        assert bool((label[torch.tensor(rec.path[1:], dtype=torch.long) - 1] == 1).all())  # the path: all 1
        for i in range(1, len(tree)):
            u = int(tree.parents[i])
            context = prefix + tree.tokens[tree.path_to(u)[1:]].tolist()
            logits, hidden = fresh(target, context)
            assert int(rec.target_logits[u].argmax()) == int(logits.argmax())
            assert float(label[i - 1]) == float(int(tree.tokens[i]) == int(logits.argmax()))
            torch.testing.assert_close(rec.target_hidden[u], hidden, atol=1e-4, rtol=1e-4)


def test_sampling_labels_are_acceptance_probabilities():
    """iid children: label = min(1, p[x] / q[x]) with p, q from fresh sequential forwards."""
    target, draft = tiny_pair()
    decoder = make_decoder(target, draft, "tree_search.child_draw=iid")
    tensors, records = traced_run(decoder, 30, do_sample=True, temperature=TEMPERATURE, seed=3)
    assert check_structure(tensors, records) >= 5
    labels = tensors["label"]
    assert 0 < labels.min() and labels.max() <= 1 and (labels < 1).any()
    for rec, prefix, nodes, _, _ in per_step(tensors, records):
        tree = rec.tree
        for i in range(1, len(tree)):
            u, x = int(tree.parents[i]), int(tree.tokens[i])
            context = prefix + tree.tokens[tree.path_to(u)[1:]].tolist()
            p = torch.softmax(fresh(target, context)[0] / TEMPERATURE, -1)[x]
            q = torch.softmax(fresh(draft, context)[0] / TEMPERATURE, -1)[x]
            assert float(labels[nodes][i - 1]) == pytest.approx(min(1.0, float(p / q)), rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------- shards
PROMPTS = [{"id": f"p{i}", "prompt": " ".join(f"w{5 + 7 * i + k}" for k in range(3 + i))} for i in range(5)]
PROMPTS[3]["prompt"] = " ".join(["w9"] * 20)  # longer than MAX_PROMPT: skipped
SHARD_PROMPTS, MAX_NEW, MAX_PROMPT = 2, 12, 10


def run_collect(decoder, out_dir):
    return collect(decoder, PROMPTS, out_dir, {"test": True}, SHARD_PROMPTS, MAX_NEW, MAX_PROMPT, progress=False)


@pytest.fixture()
def shards(tmp_path):
    target, draft = tiny_pair()
    decoder = make_decoder(target, draft)
    out = tmp_path / "traces"
    return decoder, out, run_collect(decoder, out)


def test_collect_and_load_round_trip(shards):
    _, out, paths = shards
    assert [p.name for p in paths] == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert [p.name for p in sorted(out.iterdir())] == [p.name for p in paths]  # no temporary files left
    parts = [load_traces([p]) for p in paths]
    assert [part["meta"]["prompt_ids"] for part in parts] == [["p0", "p1"], ["p2"], ["p4"]]
    assert parts[1]["meta"]["skipped_long_prompts"] == 1
    full = load_traces(out)
    assert full["meta"]["prompt_ids"] == ["p0", "p1", "p2", "p4"] and full["meta"]["shards"] == 3
    assert full["meta"]["label"] == "greedy" and full["meta"]["settings"] == {"test": True}
    pair_base = prompt_base = node = 0
    for part in parts:
        n = part["label"].numel()
        rows = slice(node, node + n)
        for key in ("features", "label", "accepted", "token"):
            assert torch.equal(full[key][rows], part[key])
        assert bool((part["parent_pair"] >= 0).all())
        assert torch.equal(full["parent_pair"][rows], part["parent_pair"] + pair_base)  # rebased
        assert torch.equal(full["h_target"][full["parent_pair"][rows]], part["h_target"][part["parent_pair"]])
        assert torch.equal(full["prompt"][rows], part["prompt"] + prompt_base)  # globally unique
        node, pair_base = node + n, pair_base + part["target_next"].numel()
        prompt_base += len(part["meta"]["prompt_ids"])
    assert node == full["label"].numel() and pair_base == full["target_next"].numel()
    assert torch.unique(full["prompt"]).tolist() == [0, 1, 2, 3]  # every traced prompt has nodes
    assert full["h_target"].shape[0] == full["h_draft"].shape[0] == pair_base


def test_rerun_reuses_finished_shards_and_remakes_a_missing_one(shards, monkeypatch):
    decoder, out, paths = shards
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}

    def refuse(*args, **kwargs):
        raise AssertionError("a finished shard was recomputed")

    with monkeypatch.context() as m:
        m.setattr(decoder, "generate", refuse)
        assert run_collect(decoder, out) == paths
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths} == before

    old_last = load_traces([paths[-1]])
    paths[-1].unlink()
    calls, real = [], decoder.generate
    monkeypatch.setattr(decoder, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert run_collect(decoder, out) == paths
    assert len(calls) == 1  # only the last shard's one prompt
    kept = {p.name: p.stat().st_mtime_ns for p in paths[:-1]}
    assert kept == {name: before[name][0] for name in kept}
    new_last = load_traces([paths[-1]])
    for key in ("features", "label", "accepted", "token", "parent_pair", "prompt", "h_draft", "h_target",
                "target_next", "draft_next"):
        assert torch.equal(new_last[key], old_last[key]), key


def test_truncated_shard_is_named(shards):
    _, out, paths = shards
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=re.escape(str(paths[1]))):
        load_traces(out)
    paths[1].write_bytes(data[:6])  # not even a header
    with pytest.raises(ModelLoadError, match=re.escape(paths[1].name)):
        load_traces([paths[1]])


def test_missing_traces_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_traces(tmp_path / "nothing")
    with pytest.raises(ModelLoadError, match="no trace shards"):
        load_traces(tmp_path)


def _jsonl(path, n):
    path.write_text("".join(json.dumps({"id": f"{path.stem}-{i}", "prompt": f"w{i + 2}"}) + "\n" for i in range(n)))


def test_eval_sets_need_allow_eval(tmp_path):
    for name, n in (("spec_bench.jsonl", 3), ("alpaca_x.jsonl", 4), ("mt_bench_q.jsonl", 2)):
        _jsonl(tmp_path / name, n)
    rows = read_prompt_rows(tmp_path, ["alpaca_x.jsonl"], 0, allow_eval=False)
    assert sorted(r["id"] for r in rows) == [f"alpaca_x-{i}" for i in range(4)]
    for files in (["alpaca_x.jsonl", "spec_bench.jsonl"], ["mt_bench_q.jsonl"]):
        with pytest.raises(ConfigError, match=re.escape(files[-1])):
            read_prompt_rows(tmp_path, files, 0, allow_eval=False)
    rows = read_prompt_rows(tmp_path, ["alpaca_x.jsonl", "spec_bench.jsonl"], 0, allow_eval=True)
    assert len(rows) == 7 and rows == read_prompt_rows(tmp_path, ["alpaca_x.jsonl", "spec_bench.jsonl"], 0, True)
    with pytest.raises(ConfigError, match="empty"):
        read_prompt_rows(tmp_path, [], 0, allow_eval=False)


@pytest.mark.parametrize("num_prompts, fractions", [(30, (0.8, 0.1, 0.1)), (3, (0.5, 0.25, 0.25)), (7, (0.9, 0.1))])
def test_split_by_prompt_never_shares_a_prompt(num_prompts, fractions):
    g = torch.Generator().manual_seed(num_prompts)
    prompt = torch.randint(0, num_prompts, (40 * num_prompts,), generator=g)
    prompt = torch.cat([prompt, torch.arange(num_prompts)])  # every prompt has rows
    masks = split_by_prompt(prompt, fractions, seed=1)
    assert len(masks) == len(fractions)
    assert torch.equal(torch.stack(masks).sum(0), torch.ones(len(prompt), dtype=torch.long))  # a partition
    for i, a in enumerate(masks):
        for b in masks[i + 1:]:
            assert not set(prompt[a].tolist()) & set(prompt[b].tolist())
    assert all(m.any() for m in masks[:-1])
    again = split_by_prompt(prompt, fractions, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(masks, again))


def test_split_of_real_traces(shards):
    _, out, _ = shards
    full = load_traces(out)
    train, val = split_by_prompt(full["prompt"], (0.5, 0.5), seed=0)
    assert not set(full["prompt"][train].tolist()) & set(full["prompt"][val].tolist())
    assert bool((train ^ val).all())


def test_a_shard_without_drafted_nodes_keeps_its_dtypes():
    """A shard whose trees had no drafted node (e.g. everything pruned) still loads with integer
    indices, and the alignment pipeline's prompt lookup works on it (it used to crash on float)."""
    from training.learned.core import pair_prompts

    empty = TraceRecorder().tensors()
    assert empty["parent_pair"].dtype == empty["prompt"].dtype == empty["token"].dtype == torch.long
    assert empty["features"].dim() == 2 and empty["label"].is_floating_point()
    assert pair_prompts(empty).numel() == 0


def test_collecting_with_prompt_lookup_is_refused(tmp_path):
    target, draft = tiny_pair()
    decoder = make_decoder(target, draft, "tree_search.lookup_tokens=4")
    with pytest.raises(ConfigError, match="lookup_tokens=0"):
        collect(decoder, [{"id": "p0", "prompt": "hi"}], tmp_path / "traces", {}, 1, 4, 64, progress=False)
    assert not (tmp_path / "traces").exists()
