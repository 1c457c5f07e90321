"""Fixtures shared by the tests, the helpers of ``helpers.py`` re-exported (``from conftest import
tiny_model``), and the order in which the two xdist workers get the tests (longest first)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import (  # noqa: E402,F401  (re-exported for the test modules)
    ARCHS,
    HORIZON,
    P_MIN,
    ROOT,
    SEARCHES,
    SLIDING_ARCHS,
    TEACHER,
    VOCAB,
    N,
    Table,
    TableDrafter,
    V,
    exact_distribution,
    example_tree,
    goodness_of_fit,
    hf_greedy,
    make_config,
    make_head,
    make_prompts,
    memoized,
    noisy_copy,
    prompts,
    run_script,
    script_result,
    sequential_logits,
    speculative_sample,
    teacher_shards,
    tiny_model,
    tiny_tokenizer,
    train_cfg,
    tv_bound,
)


@pytest.fixture(scope="session")
def default_config():
    from speculative_decoder import SpeculativeDecodingConfig
    return SpeculativeDecodingConfig()


@pytest.fixture(scope="module")
def tiny_pair_dirs(tmp_path_factory):
    """A saved tiny target (seed 0) and draft (seed 1) with the word-level tokenizer, for the CLI tests."""
    root = tmp_path_factory.mktemp("pair")
    for name, seed in (("target", 0), ("draft", 1)):
        model = tiny_model("llama", seed=seed)
        model.save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    return root


# The longest tests first (node-id prefixes, longest first; measured on the 2-core AVX-512 box,
# 2026-12-08). xdist's loadgroup hands out work units in collection order (after the largest group,
# demo_pair), so a long test that starts last would leave the other worker idle at the end.
LONGEST_FIRST = (
    "tests/test_tree_pruner.py::test_pruned_sampling_is_lossless[dynamic-iid-budget]",
    "tests/test_tree_pruner.py::test_pruned_sampling_is_lossless[dynamic-iid-cost_aware]",
    "tests/test_tree_pruner.py::test_pruned_sampling_is_lossless[static-without_replacement-ratio]",
    "tests/test_config_and_cli.py::test_train_draft_then_eval_draft_then_benchmark_cli",
    "tests/test_benchmark.py::test_benchmark_cli_per_category",
    "tests/test_benchmark.py::test_benchmark_main_returns_the_headline",
    "tests/test_learned_decoding.py::test_sampling_lossless_with_predictor_ranking",
    "tests/test_lossless_sampling.py::test_sampling_is_lossless",
    "tests/test_lossless_sampling.py::test_negative_control_has_power",
    "tests/test_lossless_sampling.py::test_lookup_negative_control_has_power",
    "tests/test_lossless_sampling.py::test_decoder_sampling_end_to_end",
    "tests/test_sweeps.py::test_joblib_sweep_then_summary",
    "tests/test_learned_cli.py::test_traces_alignment_predictor_generate",
    "tests/test_draft_study.py::test_draft_study_cli",
    "tests/test_config_and_cli.py::test_generate_cli_and_sweep",
    "tests/test_tree_pruner.py::test_random_trees_properties",
    "tests/test_tree_pruner.py::test_pruned_sampling_is_lossless",
    "tests/test_tree_pruner.py::test_node_level_pruning_of_random_draws_is_biased",
)


def pytest_collection_modifyitems(config, items):
    """Reorder (never drop) the collected tests: LONGEST_FIRST in its order, then the rest as collected.
    Every worker sorts the same collection the same way, as xdist requires."""
    def rank(item) -> int:
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix)),
                    len(LONGEST_FIRST))

    items[:] = sorted(items, key=rank)  # stable
