"""scripts/profile_forward.py's measurement: the forward with and without its linear layers."""

import torch
from conftest import tiny_model

from training.experiments.forward_profile import forward_breakdown, linears_skipped


def test_linears_are_skipped_then_restored():
    model = tiny_model("llama")
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        before = model(ids).logits
        with linears_skipped(model):
            assert model.lm_head(torch.ones(2, 32)).shape == (2, 96)  # the output shape, no product
        after = model(ids).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_breakdown_rows():
    rows = forward_breakdown(tiny_model("llama"), [1, 4], context=8, repeats=2, warmup=1)
    assert set(rows) == {1, 4}
    for r in rows.values():
        assert r["forward_ms"] > 0 and r["without_linear_ms"] > 0
        assert abs(r["linear_ms"] - (r["forward_ms"] - r["without_linear_ms"])) < 1e-2
