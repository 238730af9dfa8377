"""The backend layer (TransformerLens 3 `HookedTransformer` or 4 `TransformerBridge`): unit
slices are the heads the hooks see, partial forwards equal full ones, cached generation equals a
plain forward, and S equals a weight edit. The same tests run under either line."""

from __future__ import annotations

import pytest
import torch

from cast_interp import backend, units
from cast_interp.data import ChatDataset, ChatExample, make_batches
from cast_interp.model import tiny_model
from cast_interp.objectives import dataset_nll
from cast_interp.sensitivity import functional_sensitivity

EXAMPLES = [ChatExample("Hi there", "Hello friend"), ChatExample("What is 2+2?", "Four."),
            ChatExample("Capital of France?", "Paris, of course.")]


def _logits_with_z_zeroed(model, tokens, layer, heads):
    def hook(z, hook):
        z = z.clone()
        z[:, :, heads] = 0.0
        return z

    return model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)])


@pytest.mark.parametrize("kind,layer,index", [("head", 0, 1), ("head", 1, 3), ("group", 1, 0)])
def test_a_units_slices_are_the_heads_its_hook_z_index_names(kind, layer, index):
    """Zeroing what a head owns of O (or what a group owns of V) is exactly zeroing its heads'
    `hook_z`: the unit layout agrees with TransformerLens's head index on either backend."""
    model = tiny_model(seed=0, n_key_value_heads=2)
    tokens = torch.randint(0, 200, (2, 9))
    heads = [index] if kind == "head" else units.group_heads(model, index)
    with torch.no_grad():
        want = _logits_with_z_zeroed(model, tokens, layer, heads)
        comp = "o" if kind == "head" else "v"
        for p in units.component_params(model, layer, comp):
            p.unit(index).zero_()
        got = model(tokens)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(got, tiny_model(seed=0, n_key_value_heads=2)(tokens))


def test_unit_parameters_are_trainable_leaves_with_grads():
    model = tiny_model(seed=0, n_key_value_heads=2)
    ps = units.unit_params(model)
    assert ps and all(p.is_leaf and p.requires_grad for p in ps)
    model(torch.randint(0, 200, (1, 6))).sum().backward()
    g = units.unit_grads(model, "head")
    assert g["q"].shape == (2, 4, 32 * 8) and g["o"].shape == (2, 4, 8 * 32)
    assert units.unit_grads(model, "group")["k"].shape == (2, 2, 32 * 8)
    assert all(p.grad is not None for p in ps)


def test_forward_from_a_cached_layer_equals_the_full_forward():
    model = tiny_model(seed=0, n_key_value_heads=2)
    tokens = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        full = model(tokens)
        final = backend.final_residual(model, tokens)
        torch.testing.assert_close(backend.logits_from_residual(model, final), full,
                                   atol=1e-5, rtol=0)
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_pre"])
        inputs = backend.forward_inputs(model, tokens)
        resumed = backend.forward_from_layer(model, cache["blocks.1.hook_resid_pre"], 1, **inputs)
    torch.testing.assert_close(resumed, final, atol=1e-5, rtol=0)


def test_cached_incremental_forward_under_left_padding_equals_a_plain_forward():
    model = tiny_model(seed=0, n_key_value_heads=2)
    short, long_ = [5, 6, 7], [8, 9, 10, 11, 12]
    tokens = torch.tensor([[0, 0] + short, long_])
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    nxt = torch.tensor([[20], [21]])
    with torch.no_grad():
        cache = backend.new_kv_cache(model, 2)
        first = backend.cached_forward(model, tokens, cache, attention_mask=attn)
        step = backend.cached_forward(model, nxt, cache)
        for r, seq in enumerate([short, long_]):
            ref = model(torch.tensor([seq + [20 + r]]))[0]
            torch.testing.assert_close(first[r, -1], ref[-2], atol=1e-5, rtol=0)
            torch.testing.assert_close(step[r, -1], ref[-1], atol=1e-5, rtol=0)
        frozen = backend.cache_rows(cache, torch.tensor([1, 1]))
        a = backend.cached_forward(model, torch.tensor([[30], [31]]), frozen)
        b = backend.cached_forward(model, torch.tensor([[30], [31]]), frozen)  # cache unchanged
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    ref = model(torch.tensor([long_ + [21, 31]]))[0, -1]
    torch.testing.assert_close(a[1, -1], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv", [None, 2])
def test_exact_zero_ablation_S_equals_the_loss_with_the_heads_O_slice_zeroed(n_kv):
    """A hand computation without hooks: S_zero(l, h) = L_util(W_O[h] := 0) - L_util."""
    model = tiny_model(seed=0, n_key_value_heads=n_kv)
    batches = make_batches(model, ChatDataset("toy", EXAMPLES), batch_size=2)
    S = functional_sensitivity(model, batches, ablation="zero").S
    base = dataset_nll(model, batches)
    for l, h in [(0, 0), (1, 2)]:
        (o,) = units.component_params(model, l, "o")
        saved = o.unit(h).detach().clone()
        with torch.no_grad():
            o.unit(h).zero_()
            edited = dataset_nll(model, batches)
            o.unit(h).copy_(saved)
        assert float(S[l, h]) == pytest.approx(edited - base, abs=1e-5)


@pytest.mark.skipif(not backend.USES_BRIDGE, reason="TransformerLens 4 only: the bridge wraps a "
                    "Hugging Face model")
def test_bridge_logits_equal_the_hugging_face_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    from cast_interp.model import byte_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=261, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    hf = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 261, (2, 9))
    with torch.no_grad():
        ref = hf(ids).logits
        bridge = backend.bridge_from_hf(hf, byte_tokenizer(), name="tiny-llama")
        got = bridge(ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)  # eager vs sdpa attention
    names = {n for n, _ in bridge.named_parameters()}
    assert any(n.endswith("q_proj._original_component.weight") or n.endswith("q_proj.weight")
               for n in names)  # the trained parameters are the Hugging Face module's own


def test_inference_layout_gives_the_same_logits_and_restores_the_weights():
    """Inside `inference_layout` (TL 3: MLP and unembedding matrices stored transposed, so its
    forward stops copying them) the logits are bit-identical; nested use is a no-op, and on exit
    every parameter is back to its contiguous layout with the same values."""
    model = tiny_model(seed=0)
    tokens = torch.randint(0, 200, (2, 9))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def moved():
        return {n for n, p in model.named_parameters() if not p.is_contiguous()}

    with torch.no_grad():
        want = model(tokens)
        with backend.inference_layout(model):
            inside = moved()
            with backend.inference_layout(model):  # re-entrant: the inner one changes nothing
                assert moved() == inside
            assert moved() == inside
            got = model(tokens)
    expected = {f"blocks.{layer}.mlp.{w}" for layer in range(model.cfg.n_layers)
                for w in ("W_in", "W_gate", "W_out")} | {"unembed.W_U"}
    assert inside == (set() if backend.is_bridge(model) else expected)
    assert torch.equal(got, want)
    assert all(p.is_contiguous() and torch.equal(p, before[n]) for n, p in model.named_parameters())
