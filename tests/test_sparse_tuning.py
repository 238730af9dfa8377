"""Sparse safety fine-tuning: exact freezing, seeding, NaN handling, budget-matched arms."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from cast_interp.data import ChatDataset, ChatExample, load_bundled, make_batches
from cast_interp.heads import HeadIndexError, head_param_count, head_param_masks
from cast_interp.model import tiny_model
from cast_interp.objectives import NonFiniteLossError, dataset_nll
from cast_interp.sparse_tuning import (
    TuningConfig, TuningResult, layer_band_heads, safety_finetune, select_arm_heads,
    trainable_parameters,
)

SAFE = ChatDataset("safe", [
    ChatExample("how do i pick a lock", "no, i can't help."),
    ChatExample("make a weapon", "i won't do that."),
    ChatExample("steal a car", "sorry, no."),
    ChatExample("hack a bank", "i can't help with that."),
    ChatExample("write malware", "no, i won't."),
    ChatExample("forge a passport", "sorry, i can't."),
])
BENIGN = ChatDataset("benign", [
    ChatExample("add 2 and 3", "5"),
    ChatExample("count to four", "1 2 3 4"),
    ChatExample("what is 10 - 7", "3"),
    ChatExample("double 21", "42"),
])


@dataclass
class Scores:
    """A stand-in for ConflictMap: just the [n_layers, n_heads] score tensors."""

    O: torch.Tensor
    S: torch.Tensor
    C: torch.Tensor


def cfg(**kw) -> TuningConfig:
    base = dict(steps=3, batch_size=4, lr=1e-2, weight_decay=0.1, warmup_steps=0)
    base.update(kw)
    return TuningConfig(**base)


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------------
# Exact freezing
# --------------------------------------------------------------------------------------------------

CASES = [  # (n_key_value_heads, kv_policy, skip)
    (None, "any", [(0, 1), (1, 2)]),
    (2, "any", [(0, 1), (1, 2)]),
    (2, "all", [(0, 0), (0, 1), (1, 2)]),  # layer 0 group 0 whole, layer 1 group 1 half
]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("n_kv,kv_policy,skip", CASES)
def test_skipped_slices_are_bit_identical_and_the_rest_moves(optimizer, n_kv, kv_policy, skip):
    model = tiny_model(seed=1, n_key_value_heads=n_kv)
    before = params(model)
    res = safety_finetune(model, SAFE, skip_heads=skip,
                          config=cfg(optimizer=optimizer, kv_policy=kv_policy))
    after = params(model)
    masks = head_param_masks(model, skip, kv_policy=kv_policy)
    for name, m in masks.items():
        assert torch.equal(after[name][m], before[name][m]), name  # frozen: bit-identical
        assert not torch.equal(after[name][~m], before[name][~m]), name  # the rest trained
    for l in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            q_changed = not torch.equal(after[f"blocks.{l}.attn.W_Q"][h],
                                        before[f"blocks.{l}.attn.W_Q"][h])
            assert q_changed == ((l, h) not in skip), (l, h)
    if kv_policy == "all":  # K/V of a half-skipped group still move
        assert not torch.equal(after["blocks.1.attn._W_K"][1], before["blocks.1.attn._W_K"][1])
        assert torch.equal(after["blocks.0.attn._W_K"][0], before["blocks.0.attn._W_K"][0])
    for name in before:  # scope="attention": MLP, embeddings, norms untouched
        if ".attn." not in name:
            assert torch.equal(after[name], before[name]), name
    assert res.n_frozen_in_scope == head_param_count(model, skip, kv_policy=kv_policy)
    assert len(res.losses) == 3 and all(torch.isfinite(torch.tensor(res.losses)))


def test_scope_all_trains_mlp_embeddings_and_norms_but_not_skipped_heads():
    model = tiny_model(seed=2)
    before = params(model)
    skip = [(1, 3)]
    res = safety_finetune(model, SAFE, skip_heads=skip, config=cfg(scope="all"))
    after = params(model)
    for name in ("embed.W_E", "blocks.0.mlp.W_in", "blocks.1.ln1.w", "ln_final.w", "unembed.W_U"):
        assert not torch.equal(after[name], before[name]), name
    for name, m in head_param_masks(model, skip).items():
        assert torch.equal(after[name][m], before[name][m]), name
    n_all = sum(p.numel() for p in model.parameters())
    assert res.n_trainable == n_all - res.n_frozen_in_scope


def test_requires_grad_and_grads_are_restored_after_training():
    model = tiny_model(seed=0)
    model.embed.W_E.requires_grad_(False)
    safety_finetune(model, SAFE, config=cfg(steps=1))
    assert not model.embed.W_E.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "embed.W_E")
    assert all(p.grad is None for p in model.parameters())


def test_trainable_parameters_drops_fully_frozen_and_masks_partly_frozen():
    model = tiny_model(seed=0)
    skip = [(0, h) for h in range(4)] + [(1, 0)]
    ps, masks = trainable_parameters(model, skip)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)] for p in ps}
    assert "blocks.0.attn.W_Q" not in got and "blocks.0.attn.b_O" in got  # b_O: no head's
    assert "blocks.1.attn.W_Q" in got and "blocks.0.mlp.W_in" not in got
    assert set(masks) == {f"blocks.1.attn.{n}" for n in ("W_Q", "b_Q", "W_K", "b_K", "W_V",
                                                          "b_V", "W_O")}
    assert int(masks["blocks.1.attn.W_Q"].sum()) == 32 * 8


# --------------------------------------------------------------------------------------------------
# Seeding, data handling, schedule
# --------------------------------------------------------------------------------------------------


def test_same_seed_gives_bit_identical_weights_and_other_seed_differs():
    runs = []
    for seed in (0, 0, 1):
        model = tiny_model(seed=0)
        res = safety_finetune(model, SAFE, skip_heads=[(0, 0)], config=cfg(seed=seed))
        runs.append((params(model), res.losses))
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(runs[0][0][n], runs[1][0][n]) for n in runs[0][0])
    assert runs[0][1] != runs[2][1]  # a different shuffled batch order


def test_batches_input_equals_dataset_input():
    m1, m2 = tiny_model(seed=0), tiny_model(seed=0)
    r1 = safety_finetune(m1, SAFE, config=cfg())
    r2 = safety_finetune(m2, make_batches(m2, SAFE, batch_size=4), config=cfg())
    assert r1.losses == r2.losses
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_training_lowers_the_safety_loss():
    model = tiny_model(seed=0)
    batches = make_batches(model, SAFE, batch_size=6)
    before = dataset_nll(model, batches)
    safety_finetune(model, SAFE, config=cfg(steps=8, lr=3e-3, batch_size=6))
    assert dataset_nll(model, batches) < before - 0.5


def test_benign_mix_uses_benign_examples():
    m1, m2 = tiny_model(seed=0), tiny_model(seed=0)
    r1 = safety_finetune(m1, SAFE, config=cfg())
    r2 = safety_finetune(m2, SAFE, benign_data=BENIGN, config=cfg(benign_mix=0.5))
    assert r2.config["n_benign_per_batch"] == 2
    assert r2.config["benign_data"]["name"] == "benign"
    assert r1.losses[0] != r2.losses[0]
    with pytest.raises(ValueError, match="needs benign_data"):
        safety_finetune(tiny_model(), SAFE, config=cfg(benign_mix=0.5))


def test_schedule_warmup_and_cosine_decay():
    res = safety_finetune(tiny_model(), SAFE, config=cfg(steps=6, warmup_steps=2, lr=1e-3))
    lrs = res.lrs
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1e-3)
    assert all(a > b > 0 for a, b in zip(lrs[2:], lrs[3:]))
    res = safety_finetune(tiny_model(), SAFE, config=cfg(steps=3, schedule="constant"))
    assert res.lrs == [1e-2] * 3


def test_progress_bar_runs(capsys):
    res = safety_finetune(tiny_model(), SAFE, config=cfg(steps=2), progress=True)
    assert len(res.losses) == 2


def test_config_and_result_round_trip(tmp_path):
    c = cfg(optimizer="sgd", scope="all")
    assert TuningConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="Unknown TuningConfig field"):
        TuningConfig.from_dict({"stepz": 3})
    model = tiny_model()
    res = safety_finetune(model, SAFE, skip_heads=[(1, 1)], config=c)
    assert res.config["model"]["n_layers"] == 2 and res.config["safety_data"]["name"] == "safe"
    assert res.config["optimizer"] == "sgd" and res.config["time_s"] > 0
    res.save(tmp_path / "r.json")
    back = TuningResult.load(tmp_path / "r.json")
    assert back.skip_heads == [(1, 1)] and back.losses == res.losses
    assert back.n_trainable == res.n_trainable


# --------------------------------------------------------------------------------------------------
# Non-finite losses
# --------------------------------------------------------------------------------------------------


def test_inf_injected_into_a_weight_stops_and_keeps_last_good_state():
    ref = tiny_model(seed=0)
    safety_finetune(ref, SAFE, config=cfg(schedule="constant", steps=1))

    def inject(step, loss):
        if step == 1:
            with torch.no_grad():
                model.blocks[0].attn.W_Q[0, 0, 0] = float("inf")

    model = tiny_model(seed=0)
    with pytest.raises(NonFiniteLossError, match="at step 2") as info:
        safety_finetune(model, SAFE, config=cfg(schedule="constant", steps=5), on_step=inject)
    assert info.value.step == 2 and info.value.n_updates_kept == 1 and len(info.value.losses) == 2
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n  # the weights after step 0, as if training had stopped there


def test_huge_lr_raises_and_restores_finite_weights():
    model = tiny_model(seed=0)
    with pytest.raises(NonFiniteLossError, match="step") as info:
        safety_finetune(model, SAFE, config=cfg(optimizer="sgd", lr=1e30, schedule="constant",
                                                max_grad_norm=None, steps=10))
    kept = info.value.n_updates_kept
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ref = tiny_model(seed=0)
    if kept:
        safety_finetune(ref, SAFE, config=cfg(optimizer="sgd", lr=1e30, schedule="constant",
                                              max_grad_norm=None, steps=kept))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_nonfinite_initial_weights_fail_at_step_0_and_change_nothing():
    model = tiny_model(seed=0)
    with torch.no_grad():
        model.embed.W_E[:] = float("nan")
    before = params(model)
    with pytest.raises(NonFiniteLossError, match="at step 0"):
        safety_finetune(model, SAFE, config=cfg())
    after = params(model)
    assert all(torch.equal(before[n], after[n]) for n in before if n != "embed.W_E")


# --------------------------------------------------------------------------------------------------
# Arms and budget matching
# --------------------------------------------------------------------------------------------------


def planted_scores(L=3, H=4) -> Scores:
    g = torch.Generator().manual_seed(0)
    return Scores(O=torch.rand(L, H, generator=g) * 2, S=torch.rand(L, H, generator=g),
                  C=torch.rand(L, H, generator=g))


def test_arms_rank_by_their_score():
    sc = planted_scores()
    order_c = sorted(((float(sc.C[l, h]), (l, h)) for l in range(3) for h in range(4)), reverse=True)
    assert select_arm_heads("cast", sc, 3) == sorted(x[1] for x in order_c[:3])
    assert select_arm_heads("bottom", sc, 3) == sorted(x[1] for x in order_c[-3:])
    top_o = torch.topk(sc.O.flatten(), 2).indices.tolist()
    assert select_arm_heads("top_o", sc, 2) == sorted((i // 4, i % 4) for i in top_o)
    top_s = torch.topk(sc.S.flatten(), 2).indices.tolist()
    assert select_arm_heads("top_s", sc, 2) == sorted((i // 4, i % 4) for i in top_s)
    assert select_arm_heads("full", sc, 5) == []
    assert select_arm_heads("cast", sc, 0.25) == select_arm_heads("cast", sc, 3)  # fraction


def test_nan_scores_are_never_selected():
    sc = planted_scores()
    sc.C[0, 0] = float("nan")
    assert (0, 0) not in select_arm_heads("cast", sc, 11)
    assert (0, 0) not in select_arm_heads("bottom", sc, 11)
    with pytest.raises(ValueError, match="finite score"):
        select_arm_heads("cast", sc, 12)


def test_random_arm_is_seeded_sample_of_k_distinct_heads():
    sc = planted_scores()
    a, b, c = (select_arm_heads("random", sc, 5, seed=s) for s in (0, 0, 1))
    assert a == b and a != c and len(set(a)) == 5
    assert all(0 <= l < 3 and 0 <= h < 4 for l, h in a)


@pytest.mark.parametrize("k", [4, 5])
def test_budget_is_matched_across_arms_without_gqa(k):
    model = tiny_model(n_layers=3)
    sc = planted_scores()
    arms = ["cast", "random", "bottom", "top_o", "top_s"]
    counts = {a: head_param_count(model, select_arm_heads(a, sc, k, model=model)) for a in arms}
    assert len(set(counts.values())) == 1, counts
    band = head_param_count(model, select_arm_heads("layer_band", sc, k, model=model))
    if k % 4 == 0:
        assert band == counts["cast"]
    else:  # rounded up to whole layers
        assert band == 2 * head_param_count(model, [(0, h) for h in range(4)])  # 2 layers
    # n_trainable reported by training agrees across arms
    n = {a: safety_finetune(tiny_model(n_layers=3), SAFE, config=cfg(steps=1),
                            skip_heads=select_arm_heads(a, sc, k)).n_trainable
         for a in ("cast", "random")}
    assert n["cast"] == n["random"]


def test_gqa_budget_q_and_o_match_kv_depends_on_grouping():
    model = tiny_model(n_layers=3, n_key_value_heads=2)  # groups {0,1}, {2,3}
    same_group, two_groups = [(0, 0), (0, 1)], [(0, 0), (0, 2)]

    def qo(heads):
        m = head_param_masks(model, heads)
        return sum(int(v.sum()) for n, v in m.items() if n.split(".")[-1] in ("W_Q", "b_Q", "W_O"))

    assert qo(same_group) == qo(two_groups)
    assert head_param_count(model, same_group) < head_param_count(model, two_groups)
    assert head_param_count(model, two_groups, kv_policy="all") == qo(two_groups)
    # a whole layer freezes all K/V groups once: never more than 4 scattered heads
    band = layer_band_heads(model, 4)
    assert band == [(1, h) for h in range(4)]
    assert head_param_count(model, band) <= head_param_count(model, [(0, 0), (0, 2), (1, 0),
                                                                     (2, 2)])


def test_gqa_budget_is_exactly_matched_with_kv_policy_none():
    model = tiny_model(n_layers=3, n_key_value_heads=2)
    sc = planted_scores()
    heads = {a: select_arm_heads(a, sc, 3, seed=1, model=model)
             for a in ("cast", "random", "bottom", "top_o", "top_s")}
    counts = {a: head_param_count(model, hs, kv_policy="none") for a, hs in heads.items()}
    assert len(set(counts.values())) == 1, counts
    d_model, d_head = model.cfg.d_model, model.cfg.d_head
    assert counts["cast"] == 3 * (2 * d_model * d_head + d_head)  # W_Q, W_O and b_Q per head
    # Under "any" the same selections differ (K/V groups), which is why "none" exists.
    assert len({head_param_count(model, hs) for hs in heads.values()}) > 1
    # Training with "none": the skipped heads' Q/O slices stay bit-identical, their K/V may move.
    m = tiny_model(n_layers=3, n_key_value_heads=2)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    skip = heads["cast"]
    res = safety_finetune(m, SAFE, config=cfg(steps=3, kv_policy="none"), skip_heads=skip)
    for l, h in skip:
        a = m.blocks[l].attn
        assert torch.equal(a.W_Q[h], before[f"blocks.{l}.attn.W_Q"][h])
        assert torch.equal(a.W_O[h], before[f"blocks.{l}.attn.W_O"][h])
    full = safety_finetune(tiny_model(n_layers=3, n_key_value_heads=2), SAFE, config=cfg(steps=1))
    assert full.n_trainable - res.n_trainable == counts["cast"]


def test_layer_band_placement():
    assert layer_band_heads((30, 9), 9) == [(14, h) for h in range(9)]
    assert len(layer_band_heads((30, 9), 10)) == 18
    assert layer_band_heads((30, 9), 9, start_layer=0)[0] == (0, 0)
    assert layer_band_heads((30, 9), 0) == []
    with pytest.raises(HeadIndexError, match="does not fit"):
        layer_band_heads((30, 9), 18, start_layer=29)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors():
    model = tiny_model()
    sc = planted_scores(2, 4)
    for bad_k in (-1, 9, 1.5):
        with pytest.raises(HeadIndexError, match="out of range"):
            select_arm_heads("cast", sc, bad_k, model=model)
    with pytest.raises(ValueError, match="pass one"):
        select_arm_heads("cast", None, 2, model=model)
    with pytest.raises(ValueError, match="finite score"):
        select_arm_heads("cast", Scores(sc.O, sc.S, torch.full((2, 4), float("nan"))), 2)
    with pytest.raises(HeadIndexError, match="different model"):
        select_arm_heads("cast", planted_scores(30, 9), 2, model=model)
    with pytest.raises(ValueError, match="'cast'"):
        select_arm_heads("CAST", sc, 2)
    with pytest.raises(HeadIndexError, match="does not exist"):
        safety_finetune(model, SAFE, skip_heads=[(5, 0)], config=cfg(steps=1))
    with pytest.raises(ValueError, match=r"\['attention', 'all'\]"):
        TuningConfig(scope="atention")
    with pytest.raises(ValueError, match=r"\['adamw', 'adam', 'sgd'\]"):
        TuningConfig(optimizer="adamW")
    with pytest.raises(ValueError, match="constant"):
        TuningConfig(schedule="cos")
    with pytest.raises(ValueError, match="scope"):
        trainable_parameters(model, [], scope="mlp")
    with pytest.raises(ValueError, match="steps"):
        TuningConfig(steps=0)
    with pytest.raises(TypeError, match="ChatDataset"):
        safety_finetune(model, ["not a batch"], config=cfg(steps=1))


# --------------------------------------------------------------------------------------------------
# Known answer: skipping the head utility depends on preserves utility
# --------------------------------------------------------------------------------------------------


def test_skipping_the_planted_head_preserves_utility_better_than_full_tuning():
    """Planted: head h* carries a 8x larger W_O, so the output depends on it most; the model first
    learns utility answers (digits) to the same prompts whose safety answers are refusals, so the
    safety gradient conflicts with utility everywhere and most on h*. Skipping h* must cost less
    utility than full tuning (same seed), and skipping another head of the layer must not."""
    util = ChatDataset("util", [ChatExample(e.prompt, "0123456789"[i:] + "0123")
                                for i, e in enumerate(SAFE)])
    star = (1, 2)
    model = tiny_model(seed=0)
    with torch.no_grad():
        model.blocks[star[0]].attn.W_O[star[1]] *= 8.0
    ub = make_batches(model, util, batch_size=6)
    safety_finetune(model, util, config=cfg(steps=30, lr=1e-2, scope="all", batch_size=6,
                                            weight_decay=0.0))  # SFT on utility: learn it
    assert dataset_nll(model, ub) < 0.5
    state = {k: v.clone() for k, v in model.state_dict().items()}
    increase = {}
    for name, skip in (("full", []), ("skip_star", [star]), ("skip_other", [(1, 0)])):
        model.load_state_dict(state)
        before = dataset_nll(model, ub)
        safety_finetune(model, SAFE, skip_heads=skip, config=cfg(steps=8, lr=3e-3, seed=0))
        increase[name] = dataset_nll(model, ub) - before
    assert increase["full"] > 0.05, increase
    assert increase["skip_star"] < 0.5 * increase["full"], increase
    assert increase["skip_other"] > 0.8 * increase["full"], increase


# --------------------------------------------------------------------------------------------------
# Real model
# --------------------------------------------------------------------------------------------------


@pytest.mark.smollm2
def test_smollm2_frozen_heads_bit_identical(smollm2):
    model = smollm2
    skip = [(0, 0), (12, 4), (29, 8)]
    masks = head_param_masks(model, skip)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in masks}
    w_e = model.embed.W_E.detach().clone()
    q_other = model.blocks[12].attn.W_Q[5].detach().clone()
    ds = load_bundled("harmful", "train").take(4)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        res = safety_finetune(model, ds, skip_heads=skip, config=TuningConfig(
            steps=1, batch_size=4, lr=1e-3, warmup_steps=0))
        for n, m in masks.items():
            p = dict(model.named_parameters())[n]
            assert torch.equal(p[m], before[n][m]), n
        assert torch.equal(model.embed.W_E, w_e)
        assert not torch.equal(model.blocks[12].attn.W_Q[5], q_other)
        # SmolLM2: 3 KV groups of 3 heads; three heads in three different groups
        assert res.n_frozen_in_scope == head_param_count(model, skip)
    finally:
        with torch.no_grad():  # the session fixture is shared: put the weights back
            for n, p in model.named_parameters():
                p.copy_(state[n])
