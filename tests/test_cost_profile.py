"""Cost profile for the tree policy: interpolation, the size choice, JSON, the per-machine/pair cache,
and real measurements on a tiny pair (HF draft and EAGLE head) that leave the decoder lossless."""

import dataclasses
import importlib.util
import json
import math

import pytest
import torch
from conftest import (
    hf_greedy,
    make_config,
    make_head,
    noisy_copy,
    prompts,
    tiny_model,
    tiny_tokenizer,
)

import models.policy.cost_profile as pc
from models.paths import CONFIG_DIR
from models.policy.cost_model import CostModel, interpolate
from speculative_decoder import SpeculativeDecoder

TINY = dict(node_counts=(1, 4), widths=(1, 2), context=8, repeats=1)


# ---------------------------------------------------------------------- CostModel (pure)
def test_interpolation_and_extrapolation():
    m = CostModel.synthetic(verify={1: 10.0, 4: 16.0, 8: 32.0}, draft={1: 1.0, 2: 5.0})
    assert m.verify(1) == 10 and m.verify(4) == 16 and m.verify(8) == 32  # measured points exactly
    assert m.verify(2) == pytest.approx(12.0) and m.verify(6) == pytest.approx(24.0)  # between: linear
    assert m.verify(10) == pytest.approx(40.0)  # beyond the last two points: their line (slope 4)
    assert m.verify(0) == pytest.approx(8.0)  # below the first two: their line (slope 2)
    assert m.draft(3) == pytest.approx(9.0)
    assert m.draft(0) == 0.0  # 1 - 4 clamped at 0
    assert CostModel.synthetic(verify={4: 7.0}).verify(100) == 7.0  # one point: constant
    assert CostModel.synthetic(verify={1: 1.0}).draft(3) == 0.0  # no draft profiled
    assert interpolate({1: 5.0, 2: 1.0}, 10) == 1.0  # a falling curve: never below the largest measured size
    assert interpolate({2: 1.0, 4: 5.0}, 0) == 0.0  # below the smallest: the line, clamped at 0
    # keys given as strings (JSON) or unsorted are normalised
    assert list(CostModel.synthetic(verify={"8": 3, "1": 1}).verify_ms) == [1, 8]
    with pytest.raises(ValueError):
        CostModel.synthetic(verify={})
    with pytest.raises(ValueError):
        CostModel.synthetic(verify={0: 1.0})


def test_step_ms_counts_root_and_levels():
    m = CostModel.synthetic(verify={1: 10.0, 9: 18.0}, draft={1: 1.0, 4: 4.0})
    # root level (width 1) + a level of 3 + a level of 4; 8 drafted nodes -> the verify covers 9 tokens
    assert m.step_ms([1, 3, 4], 8) == pytest.approx(1 + 3 + 4 + 18)
    assert m.step_ms([], 0) == pytest.approx(10.0)  # target only


def test_best_size_picks_the_known_optimum():
    probs = [0.9, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05]
    cum = [0.0]
    for p in probs:
        cum.append(cum[-1] + p)
    # Flat verify up to N = 8 (root + 7 drafted), then steep: fill the flat part, stop there.
    flat_then_steep = CostModel.synthetic(verify={1: 10.0, 8: 10.0, 16: 50.0})
    assert flat_then_steep.best_size(cum, draft_ms=2.0) == 7
    # Flat everywhere: every node with positive probability is worth verifying.
    assert CostModel.synthetic(verify={1: 10.0, 64: 10.0}).best_size(cum, 2.0) == len(probs)
    # Verify cost proportional to N (10 ms per token): even the best node (0.9) does not pay for itself.
    linear = CostModel.synthetic(verify={1: 10.0, 2: 20.0})
    assert linear.best_size(cum, 0.0) == 0
    # Brute force agrees with the stated objective on a convex curve.
    convex = CostModel.synthetic(verify={1: 10.0, 4: 11.0, 8: 14.0, 12: 22.0, 16: 40.0})
    rates = [(cum[k] + 1) / (3.0 + convex.verify(k + 1)) for k in range(len(cum))]
    assert convex.best_size(cum, 3.0) == max(range(len(cum)), key=lambda k: (rates[k], -k))
    # Ties go to the smaller tree: zero-probability nodes are never added on a flat curve.
    assert CostModel.synthetic(verify={1: 5.0, 32: 5.0}).best_size([0.0, 0.5, 0.5, 0.5], 1.0) == 1
    assert flat_then_steep.best_size([0.0], 1.0) == 0
    with pytest.raises(ValueError):
        flat_then_steep.best_size([], 1.0)


def test_json_round_trip(tmp_path):
    m = CostModel(verify_ms={1: 10.5, 4: 12.25, 16: 30.0}, draft_ms={1: 0.5, 8: 1.75},
                  key={"device": {"type": "cpu", "name": "x"}, "threads": 2, "node_counts": [1, 4, 16]},
                  meta={"repeats": 7, "samples_ms": {"verify": {"1": [10.5, 11.0]}}})
    back = CostModel.from_json(m.to_json())
    assert back == m and isinstance(next(iter(back.verify_ms)), int)
    assert back.verify(2) == m.verify(2) and back.draft(4) == m.draft(4)
    path = m.save(tmp_path / "sub" / "costs.json")
    assert CostModel.load(path) == m and not list(path.parent.glob(".*.tmp"))  # no temp file left behind
    assert "x N=1" in m.table() and "x F=1" in m.table()
    assert "2.86" in m.table()  # 30 / 10.5
    assert "-" in CostModel.synthetic(verify={1: 1.0}).table()  # no draft curve: shown empty


# ---------------------------------------------------------------------- the cache
@pytest.fixture(scope="module")
def tiny_target():
    target = tiny_model("llama", seed=0)
    target.generation_config.eos_token_id = None
    return target


def make_decoder(target, draft, default_config):
    """A decoder whose own pruner needs no profile: the tests below drive the profile cache by hand."""
    config = make_config(default_config, "dynamic")
    config = dataclasses.replace(config, pruning=dataclasses.replace(config.pruning, strategy="none"))
    return SpeculativeDecoder.from_models(target, draft, None, config)


def test_cache_is_reused_only_for_the_same_key(tmp_path, monkeypatch, tiny_target, default_config):
    calls = []

    def fake_profile(decoder, **kw):
        calls.append(kw)
        return CostModel.synthetic(verify={1: float(len(calls)), 8: 2.0 * len(calls)}, draft={1: 0.1})

    monkeypatch.setattr(pc, "profile_costs", fake_profile)
    decoder = make_decoder(tiny_target, noisy_copy(tiny_target, 0.3, seed=1), default_config)
    first = pc.load_or_profile(decoder, tmp_path, repeats=1, context=8)
    assert len(calls) == 1 and calls[0] == dict(repeats=1, context=8)
    path = pc.cost_file(decoder, tmp_path, context=8)
    assert path.is_file() and CostModel.load(path).key == pc.cost_key(decoder, context=8)
    again = pc.load_or_profile(decoder, tmp_path, repeats=5, context=8)  # repeats is not part of the key
    assert len(calls) == 1 and again == first

    threads = torch.get_num_threads()
    try:  # another thread count: another machine setting, measured again
        torch.set_num_threads(threads + 1)
        pc.load_or_profile(decoder, tmp_path, context=8)
        assert len(calls) == 2
    finally:
        torch.set_num_threads(threads)
    other_draft = make_decoder(tiny_target, noisy_copy(tiny_target, 0.3, seed=2), default_config)
    assert pc.cost_key(other_draft, context=8)["draft"] != pc.cost_key(decoder, context=8)["draft"]
    pc.load_or_profile(other_draft, tmp_path, context=8)
    assert len(calls) == 3
    pc.load_or_profile(decoder, tmp_path, context=16)  # another context
    assert len(calls) == 4
    assert pc.load_or_profile(decoder, tmp_path, context=8) == first and len(calls) == 4  # still cached
    pc.load_or_profile(decoder, tmp_path, force=True, context=8)
    assert len(calls) == 5
    assert len(list(tmp_path.glob("costs-*.json"))) == 4

    # A file at the right name whose stored key differs (or that is corrupt) is not trusted.
    stale = CostModel.load(path)
    stale.key = {**stale.key, "threads": 999}
    stale.save(path)
    pc.load_or_profile(decoder, tmp_path, context=8)
    assert len(calls) == 6 and CostModel.load(path).key == pc.cost_key(decoder, context=8)
    path.write_text("{not json")
    pc.load_or_profile(decoder, tmp_path, context=8)
    assert len(calls) == 7


# ---------------------------------------------------------------------- real measurements
def check_profile(model: CostModel, decoder):
    assert list(model.verify_ms) == [1, 4] and list(model.draft_ms) == [1, 2]
    assert all(v > 0 and math.isfinite(v) for v in [*model.verify_ms.values(), *model.draft_ms.values()])
    assert model.key == pc.cost_key(decoder, context=8, node_counts=(1, 4), widths=(1, 2))
    assert model.key["threads"] == torch.get_num_threads() and model.key["dtype"] == "float32"
    assert model.meta["repeats"] == 1 and len(model.meta["samples_ms"]["verify"]["4"]) == 1
    assert CostModel.from_json(model.to_json()) == model


def check_still_lossless(decoder, target):
    for prompt in prompts(2, seed=11):
        got, _ = decoder.generate(torch.tensor([prompt]), max_new_tokens=12)
        assert got[0].tolist() == hf_greedy(target, prompt, 12)


def test_profile_costs_on_a_tiny_pair(tiny_target, default_config, tmp_path):
    decoder = make_decoder(tiny_target, noisy_copy(tiny_target, 0.3), default_config)
    model = pc.profile_costs(decoder, **TINY)
    check_profile(model, decoder)
    check_still_lossless(decoder, tiny_target)
    png = pc.plot_costs(model, tmp_path / "costs.png")
    assert png.stat().st_size > 1000


def test_profile_costs_with_an_eagle_head(tiny_target, default_config):
    from models.drafters.eagle import EagleDrafter

    decoder = make_decoder(tiny_target, EagleDrafter(make_head(tiny_target, list(range(0, 96, 2)))), default_config)
    model = pc.profile_costs(decoder, **TINY)
    check_profile(model, decoder)
    assert model.key["draft"]["class"] == "EagleHead"
    check_still_lossless(decoder, tiny_target)


def test_profile_costs_target_only_and_limits(tiny_target, default_config):
    config = dataclasses.replace(default_config, decoding=dataclasses.replace(default_config.decoding,
                                                                              method="target_only"))
    decoder = SpeculativeDecoder.from_models(tiny_target, None, None, config)
    model = pc.profile_costs(decoder, node_counts=(1, 2), widths=(1, 2), context=4, repeats=1, warmup=0)
    assert model.draft_ms == {} and model.key["draft"] is None and model.draft(4) == 0.0
    # The tiny target holds 256 tokens: a 64-node tree fits after at most 192 cached ones.
    assert pc.cost_key(decoder, context=250, node_counts=(1, 64))["context"] == 192
    with pytest.raises(ValueError, match="context"):
        pc.profile_costs(decoder, node_counts=(1, 300), repeats=1)


def test_profile_costs_script(tiny_target, tmp_path, capsys):
    """scripts/profile_costs.py run() on a tiny pair saved to disk: table, JSON, PNG; reused the second time."""
    from models.config import compose

    for name, model in (("target", tiny_target), ("draft", noisy_copy(tiny_target, 0.3))):
        model.save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    cfg = compose([f"model.target_model_name={tmp_path / 'target'}", f"model.draft_model_name={tmp_path / 'draft'}",
                   "profile_costs.node_counts=[1,4]", "profile_costs.widths=[1,2]", "profile_costs.context=8",
                   "profile_costs.repeats=1", "profile_costs.warmup=1", f"profile_costs.cache_dir={tmp_path / 'costs'}",
                   f"output_dir={tmp_path}"])
    script_path = CONFIG_DIR.parent / "scripts" / "profile_costs.py"
    spec = importlib.util.spec_from_file_location("profile_costs_script", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model, path = script.run(cfg)
    out = capsys.readouterr().out
    assert "x N=1" in out and f"wrote {path}" in out and path.parent == tmp_path / "costs"
    assert path.with_suffix(".png").is_file() and json.loads(path.read_text())["key"] == model.key
    assert script.verify_ratio(model) > 0
    again, _ = script.run(cfg)
    assert "reused" in capsys.readouterr().out and again == model


def test_a_noisy_verify_curve_is_made_monotone_for_the_policy():
    """A slow spell while one size was timed must not make 4 nodes look dearer than 12 (the
    quickstart profile of 2026-11-24: 30.7, 36.3, 53.0, 47.0 ms for 1, 2, 4, 12 nodes)."""
    from models.policy.cost_model import monotone

    noisy = CostModel.synthetic(verify={1: 30.7, 2: 36.3, 4: 53.0, 12: 47.0, 16: 68.8})
    assert noisy.verify_ms[4] == 53.0  # the measurement is kept as measured
    fit = [noisy.verify(n) for n in (1, 2, 4, 8, 12, 16)]
    assert fit == sorted(fit) and noisy.verify(4) == pytest.approx(50.0) == noisy.verify(12)
    assert monotone({1: 1.0, 2: 2.0, 3: 3.0}) == {1: 1.0, 2: 2.0, 3: 3.0}  # already monotone: unchanged
    assert monotone({1: 3.0, 2: 2.0, 3: 1.0}) == {1: 2.0, 2: 2.0, 3: 2.0}
    assert "used" in noisy.table() and "53.000" in noisy.table()
