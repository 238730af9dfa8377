"""Sparse safety fine-tuning: exact freezing by units, paired seeds, monitoring, NaN handling,
budget-matched arms."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from cast_interp.data import ChatBatch, ChatDataset, ChatExample, load_bundled, make_batches
from cast_interp import backend, units
from cast_interp.conflict_map import ConflictMap
from cast_interp.heads import HeadIndexError
from cast_interp.model import tiny_model
from cast_interp.objectives import NonFiniteLossError, dataset_nll
from cast_interp.sparse_tuning import (
    TuningConfig, TuningResult, ValidationMonitor, batch_fingerprint, k_from_fraction,
    layer_band_heads, parameter_budget, safety_finetune, select_arm_heads,
    select_arm_units, trainable_parameters,
)

import tl_compat  # tests/tl_compat.py: backend-neutral weight handles

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
# Exact freezing by units
# --------------------------------------------------------------------------------------------------

CASES = [  # (n_key_value_heads, skip_heads, skip_groups)
    (None, [(0, 1), (1, 2)], []),
    (2, [(0, 1), (1, 2)], []),
    (2, [], [(0, 1), (1, 0)]),
    (2, [(0, 0)], [(1, 1)]),
]


def owned_changed(before, after, model, l, i, kind):
    """Whether any slice unit (l, i) of `kind` owns changed."""
    return any(not torch.equal(p.unit(i, after[p.name]), p.unit(i, before[p.name]))
               for c in units.unit_components(model, kind)
               for p in units.component_params(model, l, c))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("n_kv,skip_h,skip_g", CASES)
def test_skipped_units_are_bit_identical_and_the_rest_moves(optimizer, n_kv, skip_h, skip_g):
    model = tiny_model(seed=1, n_key_value_heads=n_kv)
    before = params(model)
    res = safety_finetune(model, SAFE, skip_heads=skip_h, skip_groups=skip_g,
                          config=cfg(optimizer=optimizer))
    after = params(model)
    masks = units.unit_masks(model, heads=skip_h, groups=skip_g)
    for name, m in masks.items():
        if name in units.absent_param_names(model):
            continue
        assert torch.equal(after[name][m], before[name][m]), name  # frozen: bit-identical
        assert not torch.equal(after[name][~m], before[name][~m]), name  # the rest trained
    for kind, skipped in [("head", skip_h)] + ([("group", skip_g)] if n_kv else []):
        for l, i in units.all_units(model, kind):
            assert owned_changed(before, after, model, l, i, kind) == ((l, i) not in skipped), \
                (kind, l, i)
    for name in units.absent_param_names(model):  # biases the architecture lacks: never trained
        assert torch.equal(after[name], before[name]) and not after[name].any(), name
    for name in before:  # scope="attention": MLP, embeddings, norms untouched
        if name not in tl_compat.attention_names(model):
            assert torch.equal(after[name], before[name]), name
    assert res.n_frozen_in_scope == units.unit_param_count(model, heads=skip_h, groups=skip_g)
    assert res.skip_heads == sorted(skip_h) and res.skip_groups == sorted(skip_g)
    assert len(res.losses) == 3 and all(torch.isfinite(torch.tensor(res.losses)))


def test_under_gqa_a_skipped_heads_shared_kv_still_trains():
    model = tiny_model(seed=1, n_key_value_heads=2)  # groups {0, 1}, {2, 3}
    before = params(model)
    safety_finetune(model, SAFE, skip_heads=[(0, 0), (0, 1)], config=cfg())  # all of group 0
    after = params(model)
    q, k = tl_compat.weight_name(model, 0, "q"), tl_compat.weight_name(model, 0, "k")
    for h in (0, 1):
        assert torch.equal(tl_compat.unit_of(model, 0, "q", h, after[q]),
                           tl_compat.unit_of(model, 0, "q", h, before[q]))
    assert not torch.equal(tl_compat.unit_of(model, 0, "k", 0, after[k]),
                           tl_compat.unit_of(model, 0, "k", 0, before[k]))


def test_absent_biases_never_train_even_in_full_tuning():
    model = tiny_model(seed=3)
    before = params(model)
    res = safety_finetune(model, SAFE, config=cfg(scope="attention"))
    after = params(model)
    absent = units.absent_param_names(model)
    if backend.USES_BRIDGE:  # the Hugging Face module has no such biases: nothing is absent
        assert absent == set() and res.n_absent == 0
    else:
        assert absent == {f"blocks.{l}.attn.{b}" for l in range(2) for b in ("b_Q", "b_K", "b_V")}
        assert res.n_absent == 2 * 3 * 4 * 8  # layers x biases x heads x d_head
    for name in absent:
        assert torch.equal(after[name], before[name]), name
    n_attn = sum(p.numel() for n, p in model.named_parameters()
                 if n in tl_compat.attention_names(model))
    assert res.n_trainable == n_attn - res.n_absent and res.n_frozen_in_scope == 0


def test_deprecated_kv_policy_still_freezes_the_group_and_warns():
    model = tiny_model(seed=1, n_key_value_heads=2)
    before = params(model)
    with pytest.warns(DeprecationWarning, match="kv_policy"):
        c = cfg(kv_policy="any")
    safety_finetune(model, SAFE, skip_heads=[(0, 1)], config=c)
    after = params(model)
    k = tl_compat.weight_name(model, 0, "k")
    assert torch.equal(tl_compat.unit_of(model, 0, "k", 0, after[k]),
                       tl_compat.unit_of(model, 0, "k", 0, before[k]))
    assert not torch.equal(tl_compat.unit_of(model, 0, "k", 1, after[k]),
                           tl_compat.unit_of(model, 0, "k", 1, before[k]))


def test_scope_all_trains_mlp_embeddings_and_norms_but_not_skipped_heads():
    model = tiny_model(seed=2)
    before = params(model)
    skip = [(1, 3)]
    res = safety_finetune(model, SAFE, skip_heads=skip, config=cfg(scope="all"))
    after = params(model)
    for name in before:  # MLPs, embeddings, norms, unembedding: everything outside attention
        if name not in tl_compat.attention_names(model) | units.absent_param_names(model):
            assert not torch.equal(after[name], before[name]), name
    for name, m in units.unit_masks(model, heads=skip).items():
        assert torch.equal(after[name][m], before[name][m]), name
    n_all = sum(p.numel() for p in model.parameters())
    assert res.n_trainable == n_all - res.n_frozen_in_scope - res.n_absent


def test_requires_grad_and_grads_are_restored_after_training():
    model = tiny_model(seed=0)
    model.embed.W_E.requires_grad_(False)
    safety_finetune(model, SAFE, config=cfg(steps=1))
    assert not model.embed.W_E.requires_grad
    e = tl_compat.embed_name(model)
    assert all(p.requires_grad for n, p in model.named_parameters() if n != e)
    assert all(p.grad is None for p in model.parameters())


def test_trainable_parameters_drops_fully_frozen_absent_and_masks_partly_frozen():
    model = tiny_model(seed=0)
    skip = [(0, h) for h in range(4)] + [(1, 0)]
    ps, masks = trainable_parameters(model, skip)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)] for p in ps}
    w = {(l, c): tl_compat.weight_name(model, l, c) for l in range(2) for c in "qkvo"}
    assert w[0, "q"] not in got and w[1, "q"] in got
    assert got <= tl_compat.attention_names(model)  # nothing outside attention (MLP, ...)
    if not backend.USES_BRIDGE:  # TL 3 keeps b_O (no head's: trained) and absent zero biases
        assert "blocks.0.attn.b_O" in got and "blocks.1.attn.b_Q" not in got
    assert set(masks) == {w[1, c] for c in "qkvo"}
    assert int(masks[w[1, "q"]].sum()) == 32 * 8


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


def test_two_arms_on_one_training_seed_see_the_same_batches_in_the_same_order():
    """The paired design: the skipped units never change the data order; the training seed does."""
    model = tiny_model(seed=0)
    sc = planted_scores(2, 4)
    arms = {"full": [], "cast": select_arm_heads("cast", sc, 2),
            "random": select_arm_heads("random", sc, 2, seed=7)}
    runs = {a: safety_finetune(tiny_model(seed=0), SAFE, skip_heads=skip, benign_data=BENIGN,
                               config=cfg(steps=5, benign_mix=0.25, seed=3))
            for a, skip in arms.items()}
    prints = {a: r.batch_fingerprints for a, r in runs.items()}
    assert len(prints["full"]) == 5 and len(set(map(tuple, prints.values()))) == 1
    assert runs["cast"].losses != runs["random"].losses  # the units differ, the data do not
    other = safety_finetune(tiny_model(seed=0), SAFE, skip_heads=arms["cast"], benign_data=BENIGN,
                            config=cfg(steps=5, benign_mix=0.25, seed=4))
    assert other.batch_fingerprints != prints["cast"]
    # Known answer: step 0 of seed 3 is the first 3 safety examples of a randperm seeded 3, then
    # the first benign example of the same generator's next permutation.
    gen = torch.Generator().manual_seed(3)
    safe_order = torch.randperm(len(SAFE), generator=gen).tolist()
    benign_order = torch.randperm(len(BENIGN), generator=gen).tolist()
    chosen = [SAFE[i] for i in safe_order[:3]] + [BENIGN[benign_order[0]]]
    rows = []
    for ex in chosen:
        b = make_batches(model, ChatDataset("one", [ex]), batch_size=1)[0]
        rows.append(b)
    width = max(b.tokens.shape[1] for b in rows)
    pad = model.tokenizer.pad_token_id
    tokens = torch.full((4, width), pad, dtype=torch.long)
    mask = torch.zeros((4, width), dtype=torch.bool)
    for i, b in enumerate(rows):
        tokens[i, :b.tokens.shape[1]] = b.tokens[0]
        mask[i, :b.tokens.shape[1]] = b.loss_mask[0]
    assert prints["cast"][0] == batch_fingerprint(ChatBatch(tokens, mask, [0] * 4))


def test_monitor_logs_curves_without_changing_training():
    original = tiny_model(seed=0)
    harmful = ChatDataset("h", SAFE.examples[:3])
    benign = ChatDataset("b", BENIGN.examples[:3])
    mon = ValidationMonitor(original, harmful, benign, batch_size=2)
    plain = safety_finetune(tiny_model(seed=0), SAFE, config=cfg(steps=5))
    model = tiny_model(seed=0)
    res = safety_finetune(model, SAFE, config=cfg(steps=5), monitor=mon, eval_every=2)
    assert res.losses == plain.losses  # monitoring draws no random numbers and moves no weight
    assert [c["step"] for c in res.curve] == [0, 2, 4, 5]
    assert res.curve[0]["kl"] == 0.0  # the untouched model is the original
    from cast_interp.evaluate import refusal_logprobs

    assert res.curve[0]["refusal_score"] == pytest.approx(
        float(refusal_logprobs(original, harmful).mean()), abs=1e-5)
    assert res.curve[-1] == pytest.approx({"step": 5, **mon(model)}, abs=1e-6)
    assert res.curve[-1]["kl"] > 1e-4 and res.config["monitor_time_s"] > 0
    # eval_every=0: before and after only; a known start is recorded, not recomputed
    start = {"refusal_score": 1.5, "kl": 0.0}
    res0 = safety_finetune(tiny_model(seed=0), SAFE, config=cfg(steps=3), monitor=mon,
                           curve_start=start)
    assert res0.curve[0] == {"step": 0, **start} and [c["step"] for c in res0.curve] == [0, 3]
    with pytest.raises(ValueError, match="eval_every"):
        safety_finetune(tiny_model(seed=0), SAFE, config=cfg(steps=1), monitor=mon, eval_every=-1)


def test_monitor_values_are_the_evaluations_generation_free_measures():
    from cast_interp.utility import utility_per_prompt

    original, tuned = tiny_model(seed=0), tiny_model(seed=1)
    harmful = ChatDataset("h", SAFE.examples[:3])
    mon = ValidationMonitor(original, harmful, BENIGN, batch_size=3)
    got = mon.per_prompt(tuned)
    assert got["kl"].shape == (4,) and got["refusal_score"].shape == (3,)
    assert torch.equal(mon.per_prompt(original)["kl"], torch.zeros(4))
    b = make_batches(original, ChatDataset("one", [BENIGN[3]]), batch_size=1)[0]
    with torch.no_grad():  # by hand: KL at the positions predicting the answer's content tokens
        p = original(b.tokens)[0, :-1].log_softmax(-1)
        q = tuned(b.tokens)[0, :-1].log_softmax(-1)
    pos = b.content_mask[0, 1:]
    kl = (p.exp() * (p - q)).sum(-1)[pos]
    assert len(kl) == len(BENIGN[3].response)  # byte tokenizer: one token per character
    assert float(got["kl"][3]) == pytest.approx(float(kl.mean()), rel=1e-5)
    assert torch.allclose(got["kl"], utility_per_prompt(tuned, BENIGN, original=original)[
        "kl_to_original"])


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
    e = tl_compat.embed_name(model)
    assert all(torch.equal(before[n], after[n]) for n in before if n != e)


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


@pytest.mark.parametrize("n_kv", [None, 2])
@pytest.mark.parametrize("k", [4, 5])
def test_every_head_arm_at_one_k_freezes_the_same_number_of_parameters(k, n_kv):
    model = tiny_model(n_layers=3, n_key_value_heads=n_kv)
    sc = planted_scores()
    d_model, d_head = model.cfg.d_model, model.cfg.d_head
    # Bias-free (Llama-style): a head owns W_Q[h] and W_O[h], plus W_K[h], W_V[h] without GQA.
    per_head = (2 if n_kv else 4) * d_model * d_head
    arms = ["cast", "random", "bottom", "top_o", "top_s"]
    counts = {a: parameter_budget(model, select_arm_heads(a, sc, k, seed=1, model=model))
              for a in arms}
    assert {c["n_frozen"] for c in counts.values()} == {k * per_head}, counts
    assert len({c["n_trainable"] for c in counts.values()}) == 1
    band = parameter_budget(model, select_arm_heads("layer_band", sc, k, model=model))["n_frozen"]
    assert band == (k if k % 4 == 0 else 8) * per_head  # rounded up to whole layers
    # what training reports agrees
    n = {a: safety_finetune(tiny_model(n_layers=3, n_key_value_heads=n_kv), SAFE,
                            config=cfg(steps=1),
                            skip_heads=select_arm_heads(a, sc, k, seed=1)).n_frozen_in_scope
         for a in ("cast", "random")}
    assert n == {"cast": k * per_head, "random": k * per_head}


def group_map(L=3, n_kv=2, seed=0, C=None):
    g = torch.Generator().manual_seed(seed)
    head = {"O": torch.rand(L, 4, generator=g), "S": torch.rand(L, 4, generator=g),
            "C": torch.rand(L, 4, generator=g)}
    group = {"O": torch.rand(L, n_kv, generator=g), "S": torch.rand(L, n_kv, generator=g),
             "C": torch.rand(L, n_kv, generator=g) if C is None else C}
    return ConflictMap(head=head, group=group, config={"combine": {"tie_break_seed": seed}})


def test_group_arms_skip_whole_groups_by_the_maps_group_scores():
    model = tiny_model(n_layers=3, n_key_value_heads=2)
    cmap = group_map()
    flat = cmap.group["C"].flatten()
    top = sorted((int(i) // 2, int(i) % 2) for i in torch.topk(flat, 2).indices)
    assert select_arm_units("cast", cmap, 2, unit="group", model=model) == top
    per_group = 2 * model.cfg.d_model * model.cfg.d_head  # W_K[g], W_V[g]
    for arm in ("cast", "random", "bottom", "top_o", "top_s"):
        g = select_arm_units(arm, cmap, 2, unit="group", seed=3, model=model)
        assert len(g) == 2
        assert parameter_budget(model, skip_groups=g)["n_frozen"] == 2 * per_group
    assert select_arm_units("layer_band", cmap, 2, unit="group", model=model) == [(1, 0), (1, 1)]
    with pytest.raises(units.UnitError, match="grouped-query"):
        select_arm_units("random", None, 1, unit="group", model=tiny_model())


def test_ties_are_broken_by_the_maps_seed_not_by_layer_order():
    flat = torch.ones(3, 2)
    picks = {s: select_arm_units("cast", group_map(seed=s, C=flat), 2, unit="group")
             for s in range(6)}
    assert len({tuple(p) for p in picks.values()}) > 1  # different seeds, different tie-breaks
    assert picks[0] == select_arm_units("cast", group_map(seed=0, C=flat), 2, unit="group")


def test_k_from_fraction_rounds_half_up_like_the_map():
    from cast_interp.conflict_map import ConflictMap

    for shape in ((2, 3), (2, 5), (30, 9)):
        v = torch.rand(shape)
        cmap = ConflictMap(head={"O": v, "S": v, "C": v})
        for f in (0.05, 0.1, 0.25, 0.5):  # the budget names as many units as the map selects
            assert k_from_fraction(f, v.numel()) == len(cmap.top_heads(f))
    assert k_from_fraction(0.25, 6) == 2 and k_from_fraction(0.0, 6) == 0
    assert k_from_fraction(3, 6) == 3


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
    with pytest.raises(units.UnitError, match="does not exist"):
        safety_finetune(model, SAFE, skip_heads=[(5, 0)], config=cfg(steps=1))
    with pytest.raises(units.UnitError, match="grouped-query"):
        safety_finetune(model, SAFE, skip_groups=[(0, 0)], config=cfg(steps=1))
    with pytest.raises(ValueError, match="max_grad_norm"):
        TuningConfig(max_grad_norm=-1)
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


@pytest.mark.xfail(backend.USES_BRIDGE, strict=False, reason=(
    "planted on TL 3's tiny random model; on the bridge's tiny Llama (other random weights) the "
    "same planting is weaker: measured increase full 0.340, skip h* 0.228 (ratio 0.67 > 0.5), "
    "skip another head 0.278"))
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
    masks = units.unit_masks(model, heads=skip)
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
        # SmolLM2 (GQA, no attention biases): a head freezes its W_Q and W_O slices only
        assert res.n_frozen_in_scope == 3 * 2 * model.cfg.d_model * model.cfg.d_head
    finally:
        with torch.no_grad():  # the session fixture is shared: put the weights back
            for n, p in model.named_parameters():
                p.copy_(state[n])
