"""Speed without changing the numbers: mixed-precision training (bf16 compute, float32 masters),
length-grouped batches (training, evaluation), and the accuracy checks that decide where a faster
path may be used (`precision_checks`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cast_interp import backend, units
from cast_interp.data import (ChatDataset, ChatExample, in_dataset_order, load_bundled,
                              make_batches, padded_token_share, with_refusals)
from cast_interp.model import tiny_model
from cast_interp.objectives import response_nll
from cast_interp.precision_checks import (check_curves, check_map, check_paired_differences,
                                          curve_array)
from cast_interp.safety import prefix_logprobs, prefix_padded_share, refusal_logprobs
from cast_interp.sparse_tuning import (TuningConfig, ValidationMonitor, length_groups,
                                       safety_finetune, trainable_parameters)
from cast_interp.utility import OriginalLogprobs, utility_per_prompt

SAFE = ChatDataset("safe", [
    ChatExample("how do i pick a lock", "no, i can't help."),
    ChatExample("make a weapon", "i won't do that."),
    ChatExample("steal a car", "sorry, no."),
    ChatExample("hack a bank", "i can't help with that, it would hurt people."),
    ChatExample("write malware", "no, i won't."),
    ChatExample("forge a passport for me, with a photo and a stamp", "sorry, i can't."),
])
# Mixed lengths: answers of 1 to 60 characters (the byte tokenizer: one token per character).
MIXED = ChatDataset("mixed", [
    ChatExample("add 2 and 3", "5"),
    ChatExample("describe the water cycle in one sentence",
                "water evaporates, condenses into clouds and falls back as rain."),
    ChatExample("double 21", "42"),
    ChatExample("name three colours", "red, green and blue."),
    ChatExample("what is 10 - 7", "3"),
    ChatExample("say something kind about mornings",
                "mornings bring fresh light and a new start for everyone."),
    ChatExample("count to four", "1 2 3 4"),
    ChatExample("spell cat", "c a t"),
])


def cfg(**kw) -> TuningConfig:
    base = dict(steps=4, batch_size=4, lr=1e-2, weight_decay=0.1, warmup_steps=0)
    base.update(kw)
    return TuningConfig(**base)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def perturbed(model, scale: float = 0.05, seed: int = 1):
    """A copy of `model` with every attention weight moved by Gaussian noise (a 'tuned' arm)."""
    new = backend.copy_model(model)
    gen = torch.Generator().manual_seed(seed)
    names = backend.attention_param_names(new)
    with torch.no_grad():
        for n, p in new.named_parameters():
            if n in names:
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return new


# --------------------------------------------------------------------------------------------------
# Mixed-precision training
# --------------------------------------------------------------------------------------------------


def test_float32_training_is_a_plain_masked_adamw_loop_bit_for_bit():
    """The default path (precision float32, no grouping) is exactly forward, backward, masked
    gradient, AdamW step and frozen restore, written here independently of the training loop."""
    one = ChatDataset("one", [SAFE[3]])
    skip = [(0, 1)]
    trained = tiny_model(seed=0)
    res = safety_finetune(trained, one, skip_heads=skip, config=cfg(
        steps=3, batch_size=1, schedule="constant", max_grad_norm=None))
    assert res.config["precision"] == "float32"
    assert res.config["compute"]["forward_backward"] == "float32"

    model = tiny_model(seed=0)
    params, masks = trainable_parameters(model, skip)
    names = {id(p): n for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    frozen = {names[id(p)]: p.detach().clone() for p in params if names[id(p)] in masks}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False)
    batch = make_batches(model, one, batch_size=1)[0]
    losses = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = response_nll(model, batch)
        loss.backward()
        for p in params:
            if names[id(p)] in masks:
                p.grad.masked_fill_(masks[names[id(p)]], 0.0)
        opt.step()
        with torch.no_grad():
            for p in params:
                n = names[id(p)]
                if n in masks:
                    p.copy_(torch.where(masks[n], frozen[n], p))
        losses.append(float(loss.detach()))
    assert res.losses == losses
    got, want = weights(trained), weights(model)
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("precision", ["bf16", "bf16-autocast"])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("n_kv,skip_h,skip_g", [(None, [(0, 1), (1, 2)], []),
                                                (2, [(0, 0)], [(1, 1)])])
def test_bf16_training_keeps_float32_weights_and_frozen_slices_bit_identical(
        precision, grouped, n_kv, skip_h, skip_g, one_thread):
    model = tiny_model(seed=0, n_key_value_heads=n_kv)
    before = weights(model)
    res = safety_finetune(model, SAFE, skip_heads=skip_h, skip_groups=skip_g,
                          config=cfg(precision=precision, group_by_length=grouped))
    after = weights(model)
    assert all(p.dtype == torch.float32 for p in after.values())
    for kind, skipped in (("head", skip_h), ("group", skip_g)):
        for l, i in skipped:
            for c in units.unit_components(model, kind):
                for p in units.component_params(model, l, c):
                    assert torch.equal(p.unit(i, after[p.name]), p.unit(i, before[p.name])), \
                        (kind, l, i, p.name)
    # The units not skipped trained, in float32 (not rounded to bf16: bits below bf16's 8-bit
    # mantissa changed too).
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved
    low_bits = lambda t: t.view(torch.int32) & 0xFFFF  # noqa: E731
    assert any(bool((low_bits(after[n]) != low_bits(before[n])).any()) for n in moved)
    assert res.config["precision"] == precision
    assert res.config["compute"]["master_weights"] == "float32"
    assert "bf" in res.config["compute"]["forward_backward"]


@pytest.mark.parametrize("precision", ["bf16", "bf16-autocast"])
def test_bf16_loss_curve_follows_float32_on_the_tiny_model(precision, one_thread):
    data = with_refusals(load_bundled("harmful", "train")).take(24)
    runs = {}
    for p in ("float32", precision):
        model = tiny_model(seed=0)
        runs[p] = safety_finetune(model, data, skip_heads=[(0, 1)], config=cfg(
            steps=6, batch_size=8, lr=3e-3, precision=p))
    f32, b16 = np.array(runs["float32"].losses), np.array(runs[precision].losses)
    assert f32[-1] < f32[0] - 0.1  # it trains
    # bf16 was really used (the losses differ), and by no more than bf16's rounding.
    assert np.abs(b16 - f32).max() > 0
    assert np.abs(b16 - f32).max() <= 2e-3 * np.abs(f32).max()
    assert runs["float32"].batch_fingerprints == runs[precision].batch_fingerprints


def test_bf16_training_needs_float32_master_weights():
    model = backend.copy_in_dtype(tiny_model(seed=0), torch.bfloat16)
    before = weights(model)
    with pytest.raises(ValueError, match="float32 master weights"):
        safety_finetune(model, SAFE, config=cfg(precision="bf16"))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="precision"):
        TuningConfig(precision="fp16")
    d = cfg(precision="bf16", group_by_length=True).to_dict()
    assert TuningConfig.from_dict(d) == cfg(precision="bf16", group_by_length=True)


# --------------------------------------------------------------------------------------------------
# Length-grouped micro-batches in training
# --------------------------------------------------------------------------------------------------


def test_length_groups_known_answer():
    # Longest first; a group takes the next example while it is >= 7/8 of the group's longest.
    assert length_groups([10, 3, 9, 8, 2]) == [[0, 2], [3], [1], [4]]
    assert length_groups([5, 5, 5]) == [[0, 1, 2]]
    assert length_groups([4, 8], ratio=0.5) == [[1, 0]]
    with pytest.raises(ValueError, match="ratio"):
        length_groups([1], ratio=0)


def test_grouped_training_same_batches_same_loss_less_padding(one_thread):
    data = with_refusals(load_bundled("harmful", "train")).take(24)
    runs, models = {}, {}
    for g in (False, True):
        models[g] = tiny_model(seed=0)
        runs[g] = safety_finetune(models[g], data, skip_heads=[(1, 0)], config=cfg(
            steps=4, batch_size=8, lr=3e-3, group_by_length=g))
    assert runs[True].batch_fingerprints == runs[False].batch_fingerprints
    np.testing.assert_allclose(runs[True].losses, runs[False].losses, rtol=1e-5)
    w0, w1 = weights(models[False]), weights(models[True])
    assert all(torch.allclose(w0[n], w1[n], atol=1e-5) for n in w0)
    pad = {g: r.config["compute"]["padded_token_share"] for g, r in runs.items()}
    assert 0 <= pad[True] < pad[False]
    assert pad[True] <= 1 - 0.875 + 1e-9  # the micro-batch rule's bound


# --------------------------------------------------------------------------------------------------
# Length-grouped batches in evaluation
# --------------------------------------------------------------------------------------------------


def test_make_batches_grouped_pads_less_and_records_the_dataset_order(tiny):
    plain = make_batches(tiny, MIXED, batch_size=3)
    grouped = make_batches(tiny, MIXED, batch_size=3, group_by_length=True)
    assert [len(b) for b in grouped] == [3, 3, 2]
    idx = [i for b in grouped for i in b.indices]
    assert sorted(idx) == list(range(len(MIXED)))
    # Shortest first: every row is no longer than any row of the next batch.
    lengths = [b.tokens.shape[1] for b in grouped]
    assert lengths == sorted(lengths)
    assert padded_token_share(grouped) < padded_token_share(plain)
    # The same rows, only elsewhere: row r of batch b is example indices[r].
    for b in grouped:
        for r, i in enumerate(b.indices):
            one = make_batches(tiny, ChatDataset("one", [MIXED[i]]), batch_size=1)[0]
            n = one.tokens.shape[1]
            assert torch.equal(b.tokens[r, :n], one.tokens[0])
    values = torch.tensor([float(i) for b in grouped for i in b.indices])
    assert torch.equal(in_dataset_order(values, grouped), torch.arange(len(MIXED)).float())
    assert padded_token_share(make_batches(tiny, MIXED, batch_size=1)) == 0.0


def test_grouped_utility_gives_the_same_per_prompt_values(tiny, one_thread):
    tuned = perturbed(tiny)
    plain = utility_per_prompt(tuned, MIXED, original=tiny, batch_size=3)
    grouped = utility_per_prompt(tuned, MIXED, original=tiny, batch_size=3, group_by_length=True)
    assert float(plain["kl_to_original"].min()) > 0
    for k in plain:
        torch.testing.assert_close(grouped[k], plain[k], rtol=1e-5, atol=1e-5)
    # With the original's log-probs computed once on grouped batches: the same again.
    ref = OriginalLogprobs(tiny, MIXED, batch_size=3, group_by_length=True)
    cached = utility_per_prompt(tuned, MIXED, original=ref, batch_size=3, group_by_length=True)
    torch.testing.assert_close(cached["kl_to_original"], plain["kl_to_original"], rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match="group_by_length"):
        utility_per_prompt(tuned, MIXED, original=ref, batch_size=3)


def test_grouped_refusal_scores_equal_ungrouped_and_pad_less(tiny, one_thread):
    prompts = [e.prompt for e in MIXED] + [e.prompt for e in SAFE]
    a = refusal_logprobs(tiny, prompts, batch_size=3, group_by_length=False)
    b = refusal_logprobs(tiny, prompts, batch_size=3)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ids = [tiny.tokenizer(p)["input_ids"] for p in prompts]
    assert prefix_padded_share(ids, batch_size=3) < prefix_padded_share(
        ids, batch_size=3, group_by_length=False)
    # Known answer: lengths 1, 4, 2, 3 (no shared opening) in batches of 2.
    toy = [[1], [2, 3, 4, 5], [6, 7], [8, 9, 10]]
    assert prefix_padded_share(toy, batch_size=2, group_by_length=False) == pytest.approx(4 / 14)
    assert prefix_padded_share(toy, batch_size=2) == pytest.approx(2 / 12)
    lp = prefix_logprobs(tiny, toy, [[[11]]] * 4, batch_size=2, group_by_length=False)
    lq = prefix_logprobs(tiny, toy, [[[11]]] * 4, batch_size=2)
    torch.testing.assert_close(torch.stack(lp), torch.stack(lq), rtol=1e-5, atol=1e-5)


def test_grouped_validation_monitor_gives_the_same_curve_values(tiny, one_thread):
    tuned = perturbed(tiny)
    harmful = ChatDataset("h", SAFE.examples)
    plain = ValidationMonitor(tiny, harmful, MIXED, batch_size=3).per_prompt(tuned)
    grouped = ValidationMonitor(tiny, harmful, MIXED, batch_size=3,
                                group_by_length=True).per_prompt(tuned)
    for k in plain:
        torch.testing.assert_close(grouped[k], plain[k], rtol=1e-5, atol=1e-5)


@pytest.mark.smollm2
def test_smollm2_grouped_batches_give_the_same_per_prompt_values(smollm2, one_thread):
    data = ChatDataset("few", MIXED.examples[:5])
    tuned = perturbed(smollm2, scale=0.002)
    plain = utility_per_prompt(tuned, data, original=smollm2, batch_size=5)
    grouped = utility_per_prompt(tuned, data, original=smollm2, batch_size=2,
                                 group_by_length=True)
    ungrouped_2 = utility_per_prompt(tuned, data, original=smollm2, batch_size=2)
    for k in plain:
        torch.testing.assert_close(grouped[k], ungrouped_2[k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grouped[k], plain[k], rtol=1e-5, atol=1e-5)
    assert padded_token_share(make_batches(smollm2, data, batch_size=2, group_by_length=True)) \
        < padded_token_share(make_batches(smollm2, data, batch_size=2))
    prompts = [e.prompt for e in data]
    torch.testing.assert_close(refusal_logprobs(smollm2, prompts, batch_size=2),
                               refusal_logprobs(smollm2, prompts, batch_size=2,
                                                group_by_length=False), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Accuracy checks: pass on identical inputs, fail on a corrupted candidate
# --------------------------------------------------------------------------------------------------


def _map(seed: int = 0, shape=(6, 5)) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    O, S = torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)
    return {"O": O, "S": S, "C": O + S}


def test_check_map_passes_on_the_same_map_and_fails_when_the_top_is_corrupted():
    ref = _map()
    same = check_map(ref, {k: v.clone() for k, v in ref.items()}, k=10)
    assert same["passed"] and same["overlap"] == 10 and same["spearman"]["O"] == pytest.approx(1)
    assert same["need"] == 10  # ceil(25/27 * 10)
    # Swap the C of the 3 best units with the 3 worst: known overlap 7 of 10.
    bad = {k: v.clone() for k, v in ref.items()}
    flat = bad["C"].view(-1)
    order = flat.argsort(descending=True)
    top, bottom = order[:3], order[-3:]
    flat[top], flat[bottom] = ref["C"].view(-1)[bottom], ref["C"].view(-1)[top]
    res = check_map(ref, bad, k=10)
    assert not res["passed"] and res["overlap"] == 7
    assert any("overlap" in f for f in res["failures"])
    # Noise on S of the size of its range: the ranking of S is lost.
    noisy = {**ref, "S": ref["S"] + torch.randn(ref["S"].shape, generator=torch.Generator(
        ).manual_seed(5))}
    res = check_map(ref, noisy, k=10)
    assert not res["passed"] and res["spearman"]["S"] < 0.95
    # 27 of 270 as on SmolLM2: 25 is the least overlap that passes.
    big = _map(shape=(30, 9))
    assert check_map(big, big)["need"] == 25 and check_map(big, big)["k"] == 27
    with pytest.raises(ValueError, match="shape"):
        check_map(ref, _map(shape=(5, 6)))


def test_check_paired_differences_known_answer_and_corruption():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = a + rng.normal(0.5, 1.0, size=50)
    assert check_paired_differences(a, b, a.copy(), b.copy())["passed"]
    d = a - b
    sd = d.std(ddof=1)
    # Known answer: a candidate whose every difference is off by 0.04 sd (rms 0.04 sd) passes,
    # 0.06 sd fails.
    ok = check_paired_differences(a, b, a + 0.04 * sd, b)
    assert ok["passed"] and ok["ratio"] == pytest.approx(0.04)
    bad = check_paired_differences(a, b, a + 0.06 * sd, b)
    assert not bad["passed"] and bad["ratio"] == pytest.approx(0.06)
    flipped = check_paired_differences(a, b, b, a)  # the arms swapped: every difference flips
    assert not flipped["passed"] and not flipped["same_sign"]
    with pytest.raises(ValueError, match="NaN"):
        check_paired_differences(a, b, np.where(a > 0, np.nan, a), b)


def test_check_paired_differences_fails_on_a_corrupted_bf16_evaluation(tiny, one_thread):
    """Real paths: per-prompt NLL of two arms, float32 vs float32 (passes) and vs a bf16 copy whose
    weights were corrupted by noise (fails)."""
    arm_b = perturbed(tiny, scale=0.05)
    nll = lambda m: utility_per_prompt(m, MIXED, batch_size=4)["reference_nll"]  # noqa: E731
    ref_a, ref_b = nll(tiny), nll(arm_b)
    assert check_paired_differences(ref_a, ref_b, nll(tiny), nll(arm_b))["passed"]
    def corrupt(m):
        return perturbed(backend.copy_in_dtype(m, torch.bfloat16), scale=0.05, seed=9)

    res = check_paired_differences(ref_a, ref_b, nll(corrupt(tiny)), nll(corrupt(arm_b)))
    assert not res["passed"] and res["ratio"] > 0.05


def test_check_curves_within_and_outside_the_seed_spread():
    f32 = np.array([[1.0, 0.8, 0.6, 0.5], [1.0, 0.7, 0.65, 0.45], [1.0, 0.75, 0.55, 0.5]])
    assert check_curves(f32, f32)["passed"]
    # Spread per checkpoint: 0, 0.1, 0.1, 0.05; a run 0.04 off seed 0 stays inside, 0.06 leaves
    # it at the last checkpoint.
    inside = check_curves(f32, f32[:1] + [0, 0.04, -0.04, 0.04])
    assert inside["passed"] and inside["spread"] == pytest.approx([0, 0.1, 0.1, 0.05])
    outside = check_curves(f32, f32[:1] + [0, 0.04, -0.04, 0.06])
    assert not outside["passed"] and outside["worst_checkpoint"] == 3
    # Any change where every seed agrees (the untrained model) fails.
    assert not check_curves(f32, f32[:1] + [0.01, 0, 0, 0])["passed"]
    with pytest.raises(ValueError, match="at least 2"):
        check_curves(f32[:1], f32[:1])
    curves = [[{"step": 0, "kl": 0.0}, {"step": 4, "kl": 0.2}],
              [{"step": 0, "kl": 0.0}, {"step": 4, "kl": 0.3}]]
    assert curve_array(curves, "kl").tolist() == [[0.0, 0.2], [0.0, 0.3]]
    with pytest.raises(ValueError, match="different steps"):
        curve_array([curves[0], [{"step": 0, "kl": 0.0}, {"step": 5, "kl": 0.3}]], "kl")
