"""Peer methods (issue 25) on the tiny model, on whichever TransformerLens line is installed:
weight interpolation, utility anchor, layer freezes, LoRA, gradient projection, activation-based
head choice. Known answers wherever one exists."""

from __future__ import annotations

import random

import pytest
import torch

from cast_interp import units
from cast_interp.data import ChatDataset, ChatExample, make_batches
from cast_interp.model import tiny_model
from cast_interp.objectives import response_nll
from cast_interp.peers import (LoraAdapters, LoraConfig, UnitBlocks, activation_arm_units,
                               anchor_config, anchor_finetune, anchor_set, head_activation_shift,
                               interpolate_weights, lora_finetune, merge_lora, merged,
                               parameter_state, project_gradient, projected_finetune)
from cast_interp.registry.arms import baseline_names, get_arm
from cast_interp.sparse_tuning import (TuningConfig, parameter_budget, safety_finetune,
                                       select_arm_units, trainable_parameters)
from cast_interp.units import UnitError

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
TOKENS = torch.tensor([[1, 5, 7, 9, 11, 40, 41, 60, 61, 62]])


def cfg(**kw) -> TuningConfig:
    base = dict(steps=3, batch_size=4, lr=1e-2, weight_decay=0.1, warmup_steps=0)
    base.update(kw)
    return TuningConfig(**base)


def per_head(model) -> int:
    """Scalar parameters one query head owns without GQA, by hand: W_Q, W_K, W_V, W_O slices
    (d_model x d_head each) and the Q/K/V bias slices where the architecture has them."""
    c = model.cfg
    return 4 * c.d_model * c.d_head + (3 * c.d_head if units.has_attn_bias(model) else 0)


# --------------------------------------------------------------------------------------------------
# 1. Weight interpolation
# --------------------------------------------------------------------------------------------------


def test_interpolation_ends_are_exact_and_the_midpoint_is_the_mean(tiny, one_thread):
    logits_orig = tiny(TOKENS).detach()
    orig = parameter_state(tiny)
    safety_finetune(tiny, SAFE, config=cfg())
    logits_tuned = tiny(TOKENS).detach()
    tuned = parameter_state(tiny)
    changed = [n for n in orig if not torch.equal(orig[n], tuned[n])]
    assert changed  # training moved something, so the ends differ

    info = interpolate_weights(tiny, orig, tuned, 0.0)
    assert all(torch.equal(p, orig[n]) for n, p in tiny.named_parameters())
    assert torch.equal(tiny(TOKENS).detach(), logits_orig)
    assert info["n_interpolated"] == sum(t.numel() for t in tuned.values())
    assert info["n_changed"] == sum(int((orig[n] != tuned[n]).sum()) for n in changed) > 0

    interpolate_weights(tiny, orig, tuned, 1.0)
    assert all(torch.equal(p, tuned[n]) for n, p in tiny.named_parameters())
    assert torch.equal(tiny(TOKENS).detach(), logits_tuned)

    interpolate_weights(tiny, orig, tuned, 0.5)
    for n, p in tiny.named_parameters():
        torch.testing.assert_close(p.detach(), (orig[n] + tuned[n]) / 2, rtol=0, atol=1e-7)


def test_interpolation_of_some_parameters_sets_the_rest_to_the_original(tiny, one_thread):
    orig = parameter_state(tiny)
    name = units.component_params(tiny, 0, "q")[0].name
    tuned = {name: orig[name] + 1.0}
    with torch.no_grad():
        for p in tiny.parameters():
            p.add_(0.5)  # whatever the model holds, it ends at theta(a)
    interpolate_weights(tiny, orig, tuned, 0.25)
    for n, p in tiny.named_parameters():
        expected = orig[n] + 0.25 if n == name else orig[n]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("a", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_interpolation_rejects_a_outside_0_1(tiny, a):
    s = parameter_state(tiny)
    with pytest.raises(ValueError, match="a must be a number in"):
        interpolate_weights(tiny, s, s, a)


def test_interpolation_rejects_foreign_states(tiny):
    s = parameter_state(tiny)
    with pytest.raises(KeyError, match="not parameters of this model"):
        interpolate_weights(tiny, s, {"nope.W": torch.zeros(1)}, 0.5)
    name = next(iter(s))
    with pytest.raises(ValueError, match="shapes differ"):
        interpolate_weights(tiny, s, {name: torch.zeros(3, 3, 3)}, 0.5)
    with pytest.raises(KeyError, match="needs both ends"):
        interpolate_weights(tiny, {}, {name: s[name]}, 0.5)


# --------------------------------------------------------------------------------------------------
# 2. Utility anchor
# --------------------------------------------------------------------------------------------------


def test_anchor_set_holds_self_answers_and_leaves_out_excluded_prompts(tiny, one_thread):
    test_split = ChatDataset("test", [BENIGN[1]])
    anchor = anchor_set(tiny, BENIGN, max_new_tokens=6, exclude=[test_split])
    assert anchor.prompts == [BENIGN[0].prompt, BENIGN[2].prompt, BENIGN[3].prompt]
    # The dataset's own answers are replaced by the model's (a random tiny model never says "5").
    assert all(e.response is not None for e in anchor)
    assert [e.response for e in anchor] != [BENIGN[i].response for i in (0, 2, 3)]
    with pytest.raises(ValueError, match="No prompt of 'benign' is left"):
        anchor_set(tiny, BENIGN, exclude=[BENIGN])


@pytest.mark.parametrize("share,batch,n_anchor", [(0.25, 4, 1), (0.5, 4, 2), (0.4, 5, 2)])
def test_every_batch_holds_the_anchor_share(tiny, one_thread, share, batch, n_anchor):
    seen: list[torch.Tensor] = []
    handle = tiny.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        res = anchor_finetune(tiny, SAFE, BENIGN, share=share, config=cfg(steps=4,
                                                                          batch_size=batch))
    finally:
        handle.remove()
    assert len(seen) == 4  # one forward per step (float32, one batch)
    tok = tiny.tokenizer
    for tokens in seen:
        texts = [tok.decode(row.tolist()) for row in tokens]
        n_benign = sum(any(e.prompt in t for e in BENIGN) for t in texts)
        n_safe = sum(any(e.prompt in t for e in SAFE) for t in texts)
        assert (n_benign, n_safe) == (n_anchor, batch - n_anchor)
    assert res.config["peer"]["n_anchor_per_batch"] == n_anchor
    assert res.config["peer"]["budget"]["n_trainable"] == res.n_trainable


@pytest.mark.parametrize("share,batch", [(0.05, 8), (0.9, 4), (0.0, 8), (1.0, 8), (True, 8)])
def test_anchor_share_that_leaves_no_anchor_or_no_safety_example_is_refused(share, batch):
    with pytest.raises(ValueError, match="share"):
        anchor_config(TuningConfig(batch_size=batch), share)


# --------------------------------------------------------------------------------------------------
# 3. Layer freezes at CAST's parameter count
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,n_layers_frozen", [(1, 1), (3, 1), (4, 1), (5, 2)])
def test_layer_freeze_arms_freeze_whole_layers_from_either_end(tiny, k, n_layers_frozen):
    H = tiny.cfg.n_heads  # tiny: 2 layers x 4 heads
    bottom = select_arm_units("bottom_layers", None, k, model=tiny)
    top = select_arm_units("top_layers", None, k, model=tiny)
    assert bottom == [(l, h) for l in range(n_layers_frozen) for h in range(H)]
    assert top == [(l, h) for l in range(2 - n_layers_frozen, 2) for h in range(H)]
    for arm in ("bottom_layers", "top_layers"):
        assert get_arm(arm).max_units(k, H) == n_layers_frozen * H
        assert arm not in baseline_names()
    # At k = one layer's heads, the freeze matches CAST's parameter count exactly.
    if k == H:
        cast_like = [(0, 0), (0, 3), (1, 1), (1, 2)]
        frozen = [parameter_budget(tiny, s)["n_frozen"] for s in (bottom, top, cast_like)]
        assert frozen == [H * per_head(tiny)] * 3


# --------------------------------------------------------------------------------------------------
# 4. LoRA
# --------------------------------------------------------------------------------------------------


def _randomise_b(adapters: LoraAdapters, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in adapters.B.values():
            b.copy_(torch.randn(b.shape, generator=g) * scale)


def test_lora_with_zero_b_is_the_original_model_exactly(tiny, one_thread):
    ref = tiny(TOKENS).detach()
    adapters = LoraAdapters(tiny, LoraConfig(rank=4, components=["q", "k", "v", "o"]))
    assert all(bool((b == 0).all()) for b in adapters.B.values())
    with adapters.attached(tiny):
        assert torch.equal(tiny(TOKENS).detach(), ref)
    _randomise_b(adapters)  # the hooks do act: a non-zero B moves the logits
    with adapters.attached(tiny):
        assert not torch.allclose(tiny(TOKENS).detach(), ref, atol=1e-3)
    assert torch.equal(tiny(TOKENS).detach(), ref)  # detached: the model itself never changed


@pytest.mark.parametrize("n_kv", [None, 2])
@pytest.mark.parametrize("components", [["q", "v"], ["q", "k", "v", "o"]])
def test_merged_lora_computes_what_the_hooked_model_computes(one_thread, n_kv, components):
    model = tiny_model(seed=0, n_ctx=512, n_key_value_heads=n_kv)
    adapters = LoraAdapters(model, LoraConfig(rank=3, components=components), seed=2)
    _randomise_b(adapters)
    with adapters.attached(model):
        hooked = model(TOKENS).detach()
    before = parameter_state(model)
    info = merge_lora(model, adapters)
    assert info["merged"] == [f"L{l}{c}" for l in range(2) for c in components]
    merged_logits = model(TOKENS).detach()
    assert (merged_logits - before_logits(model, before)).abs().max() > 1e-2  # the merge moved it
    torch.testing.assert_close(merged_logits, hooked, rtol=0, atol=1e-5)


def before_logits(model, state):
    """Logits of `model` with `state` loaded (then the current weights are put back)."""
    now = parameter_state(model)
    interpolate_weights(model, state, state, 0.0)
    out = model(TOKENS).detach()
    interpolate_weights(model, now, now, 0.0)
    return out


def test_merged_context_restores_the_weights_bit_for_bit(tiny):
    before = parameter_state(tiny)
    adapters = LoraAdapters(tiny, LoraConfig(rank=2))
    _randomise_b(adapters)
    with merged(tiny, adapters):
        assert any(not torch.equal(p, before[n]) for n, p in tiny.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in tiny.named_parameters())


def test_lora_training_keeps_the_base_weights_and_records_its_budget(tiny, one_thread):
    before = parameter_state(tiny)
    c = tiny.cfg
    moved_in_on_step = []

    def on_step(step, loss):  # sees the adapters merged into the weights
        moved_in_on_step.append(any(not torch.equal(p, before[n])
                                    for n, p in tiny.named_parameters()))

    res, adapters = lora_finetune(tiny, SAFE, lora=LoraConfig(rank=8), config=cfg(steps=4),
                                  merge=False, on_step=on_step)
    assert all(torch.equal(p, before[n]) for n, p in tiny.named_parameters())
    assert moved_in_on_step == [True] * 4
    # rank 8 on Q and V of 2 layers, by hand: r * (d_in + d_out) per adapter.
    n = 2 * (8 * (c.d_model + c.n_heads * c.d_head) + 8 * (c.d_model + c.n_heads * c.d_head))
    assert res.n_trainable == adapters.n_parameters == n == 2048
    assert res.config["peer"]["budget"]["n_trainable"] == n
    assert res.config["peer"]["lora"] == {"rank": 8, "alpha": 16.0, "components": ["q", "v"],
                                          "layers": None}
    assert res.losses[-1] < res.losses[0]
    # Paired with full tuning: the same batches for the same training seed.
    full = safety_finetune(tiny_model(seed=0, n_ctx=512), SAFE, config=cfg(steps=4))
    assert res.batch_fingerprints == full.batch_fingerprints


def test_lora_merge_at_the_end_changes_only_the_adapted_weights(tiny, one_thread):
    before = parameter_state(tiny)
    res, adapters = lora_finetune(tiny, SAFE, config=cfg(steps=2))
    adapted = {units.component_params(tiny, l, comp)[0].name for l in range(2) for comp in "qv"}
    for n, p in tiny.named_parameters():
        assert torch.equal(p, before[n]) == (n not in adapted), n
    assert res.config["peer"]["merged"] is True


def test_lora_trains_in_bf16_with_float32_adapters(tiny, one_thread):
    before = parameter_state(tiny)
    res, adapters = lora_finetune(tiny, SAFE, config=cfg(steps=2, precision="bf16"), merge=False)
    assert all(p.dtype == torch.float32 for p in adapters.parameters())
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert any(bool((b != 0).any()) for b in adapters.B.values())
    assert all(torch.equal(p, before[n]) for n, p in tiny.named_parameters())


@pytest.mark.parametrize("kw,msg", [({"rank": 0}, "rank must be"), ({"alpha": 0}, "alpha must"),
                                    ({"components": ["x"]}, "components must"),
                                    ({"components": []}, "components must"),
                                    ({"layers": [-1]}, "layers must")])
def test_lora_config_rejects_bad_settings(kw, msg):
    with pytest.raises(ValueError, match=msg):
        LoraConfig(**kw)


def test_lora_rejects_layers_the_model_lacks_and_configs_it_cannot_run(tiny):
    with pytest.raises(ValueError, match="do not exist"):
        LoraAdapters(tiny, LoraConfig(layers=[5]))
    with pytest.raises(ValueError, match="benign_mix=0"):
        lora_finetune(tiny, SAFE, config=cfg(benign_mix=0.25))
    other = LoraAdapters(tiny_model(seed=0, n_ctx=512, n_key_value_heads=2))
    with pytest.raises(ValueError, match="built for"):
        merge_lora(tiny, other)


# --------------------------------------------------------------------------------------------------
# 5. Gradient projection
# --------------------------------------------------------------------------------------------------


def test_projection_known_answer():
    g, info = project_gradient([torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])])
    # g_s . g_u = -1, |g_u|^2 = 2: g = (1, 0) - (-1/2)(-1, 1) = (0.5, 0.5).
    assert torch.equal(g[0], torch.tensor([0.5, 0.5]))
    assert info["conflict"] and info["dot"] == -1.0
    g, info = project_gradient([torch.tensor([1.0, 0.0])], [torch.tensor([1.0, 1.0])])
    assert torch.equal(g[0], torch.tensor([1.0, 0.0])) and not info["conflict"]


def _real_grads(model, skip=()):
    params, masks = trainable_parameters(model, skip)
    out = []
    for data in (SAFE, BENIGN):
        batch = make_batches(model, data, batch_size=len(data))[0]
        grads = torch.autograd.grad(response_nll(model, batch), params)
        name_of = {id(p): n for n, p in model.named_parameters()}
        out.append([g.masked_fill(masks[name_of[id(p)]], 0.0) if name_of[id(p)] in masks else g
                    for p, g in zip(params, grads)])
    return params, out[0], out[1]


def _dot(a, b):
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))


@pytest.mark.parametrize("n_kv", [None, 2])
def test_projected_real_gradient_never_opposes_utility(one_thread, n_kv):
    model = tiny_model(seed=0, n_ctx=512, n_key_value_heads=n_kv)
    params, g_s, g_u = _real_grads(model)
    # -g_u is the real gradient of -L_util: of g_u and -g_u exactly one conflicts with g_s.
    outcomes = []
    for u in (g_u, [-x for x in g_u]):
        g, info = project_gradient(g_s, u)
        scale = _dot(g_s, g_s) ** 0.5 * _dot(u, u) ** 0.5
        assert _dot(g, u) >= -1e-6 * scale
        if info["conflict"]:
            assert abs(_dot(g, u)) <= 1e-6 * scale  # exactly orthogonal where it was projected
        else:
            assert all(torch.equal(a, b) for a, b in zip(g, g_s))
        outcomes.append(info["conflict"])
    assert sorted(outcomes) == [False, True]

    blocks = UnitBlocks(model, params)
    n_units = 8 + (4 if n_kv else 0)  # heads, plus key/value groups under GQA
    assert len(blocks) == n_units + (1 if "rest" in blocks.labels else 0)
    flags = []
    for u in (g_u, [-x for x in g_u]):
        g, info = blocks.project(g_s, u)
        flags.append(info["conflict"])
        for views, conflict in zip(blocks.units, info["conflict"]):
            a = [p.unit(i, g[j]) for j, p, i in views]
            s = [p.unit(i, g_s[j]) for j, p, i in views]
            b = [p.unit(i, u[j]) for j, p, i in views]
            scale = (_dot(s, s) * _dot(b, b)) ** 0.5
            assert _dot(a, b) >= -1e-6 * scale
            if not conflict:
                assert all(torch.equal(x, y) for x, y in zip(a, s))
    # A block's dot product flips sign with g_u: it conflicts under exactly one of the two.
    assert all(a != b for a, b in zip(*flags)) and any(flags[0] + flags[1])


def test_projection_with_utility_equal_to_safety_is_safety_finetune(one_thread):
    """Utility batches = safety batches (same data, seed and size): g_u = g_s never conflicts, so
    the loop must reproduce safety_finetune bit for bit (batches, optimizer, clipping, freezing)."""
    c = cfg(steps=4, seed=3, batch_size=3)
    skip = [(0, 1), (1, 2)]
    a, b = tiny_model(seed=0, n_ctx=512), tiny_model(seed=0, n_ctx=512)
    ra = projected_finetune(a, SAFE, SAFE, config=c, skip_heads=skip, utility_seed=3)
    rb = safety_finetune(b, SAFE, config=c, skip_heads=skip)
    assert ra.config["peer"]["conflict"] == [False] * 4
    assert ra.batch_fingerprints == rb.batch_fingerprints
    assert ra.losses == rb.losses
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert (ra.n_trainable, ra.n_frozen_in_scope) == (rb.n_trainable, rb.n_frozen_in_scope)


@pytest.mark.parametrize("mode", ["global", "unit"])
def test_projected_finetune_records_and_freezes(tiny, one_thread, mode):
    before = parameter_state(tiny)
    skip = [(0, 2)]
    res = projected_finetune(tiny, SAFE, BENIGN, mode=mode, skip_heads=skip, config=cfg(steps=3))
    peer = res.config["peer"]
    assert peer["mode"] == mode and len(peer["conflict"]) == len(peer["utility_losses"]) == 3
    assert peer["budget"] == parameter_budget(tiny, skip)
    assert res.n_frozen_in_scope == per_head(tiny)
    for comp in "qkvo":  # the skipped head's own slices never change
        for p in units.component_params(tiny, 0, comp):
            assert torch.equal(p.unit(2), p.unit(2, before[p.name]))
    assert any(not torch.equal(p, before[n]) for n, p in tiny.named_parameters())


def test_projection_trains_in_bf16_with_float32_master_weights(tiny, one_thread):
    before = parameter_state(tiny)
    res = projected_finetune(tiny, SAFE, BENIGN, skip_heads=[(1, 0)],
                             config=cfg(steps=2, precision="bf16"))
    assert res.config["compute"]["master_weights"] == "float32"
    assert all(p.dtype == torch.float32 for p in tiny.parameters())
    assert all(torch.isfinite(torch.tensor(res.losses + res.config["peer"]["utility_losses"])))
    for p in units.component_params(tiny, 1, "q"):
        assert torch.equal(p.unit(0), p.unit(0, before[p.name]))
    assert any(not torch.equal(p, before[n]) for n, p in tiny.named_parameters())


def test_projection_rejects_bad_settings(tiny):
    with pytest.raises(ValueError, match="mode="):
        projected_finetune(tiny, SAFE, BENIGN, mode="layer")
    with pytest.raises(ValueError, match="benign_mix=0"):
        projected_finetune(tiny, SAFE, BENIGN, config=cfg(benign_mix=0.5))
    with pytest.raises(ValueError, match="group_by_length=False"):
        projected_finetune(tiny, SAFE, BENIGN, config=cfg(group_by_length=True))
    with pytest.raises(ValueError, match="g_s has 1 tensors but g_u has 2"):
        project_gradient([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)])


# --------------------------------------------------------------------------------------------------
# 6. Activation-based head choice
# --------------------------------------------------------------------------------------------------


def _marker_sets():
    """Harmful-like prompts with the byte "Z" at every other position; harmless ones without."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxy"

    def text(marker: bool) -> str:
        return "".join("Z" if marker and i % 2 else rng.choice(letters) for i in range(40))

    return (ChatDataset("marked", [ChatExample(text(True)) for _ in range(6)]),
            ChatDataset("plain", [ChatExample(text(False)) for _ in range(6)]))


def _plant(model, layer: int, head: int) -> None:
    """Head (layer, head) attends uniformly (zero Q/K) and writes, through V, the direction of the
    "Z" embedding: its output tracks how many "Z"s a prompt holds, and little else."""
    zid = model.tokenizer("Z", add_special_tokens=False)["input_ids"]
    _, cache = model.run_with_cache(torch.tensor([zid]))
    u = cache[f"blocks.{layer}.hook_resid_pre"][0, -1]
    u = u / u.norm()
    with torch.no_grad():
        for comp in "qk":
            for p in units.component_params(model, layer, comp):
                p.unit(head).zero_()
        w = units.component_params(model, layer, "v")[0].unit(head)
        w.copy_((u[:, None] if w.shape[0] == model.cfg.d_model else u[None, :]).expand_as(w) * 10)


@pytest.mark.parametrize("normalize", ["pooled_sd", "none"])
def test_a_planted_head_is_ranked_first(one_thread, normalize):
    model = tiny_model(seed=0, n_ctx=512)
    marked, plain = _marker_sets()
    planted = (0, 3)
    before = head_activation_shift(model, marked, plain, normalize=normalize)
    assert before.flatten().argmax() != planted[0] * 4 + planted[1]
    _plant(model, *planted)
    score = head_activation_shift(model, marked, plain, normalize=normalize)
    assert score.shape == (2, 4)
    top2 = score.flatten().topk(2).values
    assert score.flatten().argmax() == planted[0] * 4 + planted[1]
    assert top2[0] > 2 * top2[1]
    assert activation_arm_units("act_skip", score, 1, model=model) == [planted]


def test_activation_arms_freeze_the_stated_counts(tiny, one_thread):
    marked, plain = _marker_sets()
    score = head_activation_shift(tiny, marked, plain)
    top3 = sorted((int(i) // 4, int(i) % 4) for i in score.flatten().topk(3).indices)
    skip = activation_arm_units("act_skip", score, 3, model=tiny)
    tune = activation_arm_units("act_tune", score, 3, model=tiny)
    assert skip == top3
    assert len(tune) == 8 - 3 and set(tune) == set(units.all_units(tiny)) - set(top3)
    assert parameter_budget(tiny, skip)["n_frozen"] == 3 * per_head(tiny)
    assert parameter_budget(tiny, tune)["n_frozen"] == 5 * per_head(tiny)
    # The same through the registry (options pass through select_arm_units).
    assert select_arm_units("act_skip", None, 3, model=tiny, act_scores=score) == skip
    assert "act_skip" not in baseline_names() and "act_tune" not in baseline_names()


def test_activation_arms_reject_missing_or_foreign_scores(tiny):
    with pytest.raises(ValueError, match="pass act_scores="):
        select_arm_units("act_skip", None, 2, model=tiny)
    with pytest.raises(UnitError, match="act_scores has shape"):
        select_arm_units("act_tune", None, 2, model=tiny, act_scores=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="act_tune with k=0"):
        activation_arm_units("act_tune", torch.zeros(2, 4), 0, model=tiny)
    marked, plain = _marker_sets()
    with pytest.raises(ValueError, match="normalize="):
        head_activation_shift(tiny, marked, plain, normalize="z")
    with pytest.raises(ValueError, match="at least 2 per set"):
        head_activation_shift(tiny, marked[:1], plain)
