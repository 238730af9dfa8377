"""benchmarks/bench_precision.py: its FLOP counts against torch's own counter, and one run on the
tiny model (the table's rows, grouped paths padding less, the checks' verdicts)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cast_interp import backend
from cast_interp.model import tiny_model


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_precision")


@pytest.mark.parametrize("n_kv", [None, 2])
def test_flop_counts_equal_torchs_flop_counter(bench, n_kv):
    model = tiny_model(seed=0, n_ctx=512, n_key_value_heads=n_kv)
    flops = bench.Flops(model)
    tokens = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(tokens)
    assert fc.get_total_flops() == flops.forward(24, 2 * 12 * 12, 24)
    names = backend.attention_param_names(model)
    for n, p in model.named_parameters():  # as in attention-scope training
        p.requires_grad_(n in names)
    with FlopCounterMode(display=False) as fc:
        model(tokens).float().logsumexp(-1).sum().backward()
    assert fc.get_total_flops() == flops.train([12, 12], flops.attn_weights)


def test_benchmark_runs_on_the_tiny_model(bench, one_thread, capsys):
    out = bench.main(["--model", "tiny", "--n-eval", "6", "--n-diag", "3", "--batch-size", "2",
                      "--steps", "3", "--repeats", "1"])
    rows = {(r["stage"], r["path"]): r for r in out["rows"]}
    assert len(rows) == 11 and out["peak_flops"]["float32"] > 0
    for stage in ("training step", "evaluation"):
        assert rows[(stage, "float32 grouped")]["padded_share"] < rows[(stage, "float32")][
            "padded_share"]
    # Grouping changes no number: its checks pass; bf16 training stays near float32's loss.
    assert rows[("evaluation", "float32 grouped")]["passed"] is True
    assert rows[("diagnosis gradients", "bf16")]["passed"] is True
    losses = {p: rows[("training step", p)]["losses"] for p in ("float32", "bf16")}
    assert max(abs(a - b) for a, b in zip(*losses.values())) < 1e-2
    printed = capsys.readouterr().out
    assert "| training step | bf16 grouped |" in printed and "share of peak" in printed
