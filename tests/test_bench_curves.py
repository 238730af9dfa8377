"""benchmarks/bench_curves.py on the tiny model: its rows, its token split and its piece table."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_curves")


def test_curve_benchmark_runs_on_the_tiny_model(bench, one_thread, capsys):
    from cast_interp.model import tiny_model
    from cast_interp.safety import REFUSAL_OPENINGS, encode_text

    out = bench.main(["--model", "tiny", "--n-val", "3", "--steps", "3", "--repeats", "1",
                      "--batch-size", "2"])
    cf = out["curve_flops"]
    assert cf["total"] == pytest.approx(cf["prompt"] + cf["trie"]) and cf["trie"] > 0
    # One trie token per proper prefix of an opening, for each of the 3 + 3 prompts.
    m = tiny_model(seed=0, n_ctx=512)
    opens = [encode_text(m, o) for o in REFUSAL_OPENINGS]
    assert cf["trie_tokens"] == 6 * len({tuple(o[:k]) for o in opens for k in range(1, len(o))})
    assert out["gap"] < 0.1  # bf16 curve values stay near float32's on the tiny model
    ratios = [r["ratio"] for r in out["pieces"]]
    assert ratios == sorted(ratios, reverse=True)  # longer pieces: curves weigh less
    for r in out["pieces"]:
        assert r["curves_s"] == pytest.approx(8 * out["curve_s"]["bf16"])
    assert "| 256 steps |" in capsys.readouterr().out
