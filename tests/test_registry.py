"""The three extension points (`cast_interp/registry/`): an arm, a metric and a model family
registered from here, outside the package, go through a whole `smoke` run on the tiny model; the
end-of-turn token comes from the model's family; the package has no import cycle."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import cast_interp
from cast_interp import backend, report, style
from cast_interp.cli import build_parser
from cast_interp.data import ChatDataset, ChatExample, end_of_turn_id, format_prompt, make_batches
from cast_interp.model import load_model, tiny_model
from cast_interp.pipeline import RunConfig, run_experiment
from cast_interp.registry import (arm_names, family_of, get_metric, register_arm,
                                  register_metric, register_model_family, unregister_arm,
                                  unregister_metric, unregister_model_family)
from cast_interp.sparse_tuning import select_arm_units

PACKAGE = Path(cast_interp.__file__).parent

# --------------------------------------------------------------------------------------------------
# What a contributor writes: one arm, one metric, one model family
# --------------------------------------------------------------------------------------------------


def second_by_c(scores, k, *, shape, seed, tie_seed, **options):
    """Skip the units ranked 2, 4, ..., 2k by C (highest first): k units, never the top one."""
    order = torch.argsort(scores["C"].flatten(), descending=True)[1:2 * k:2]
    n = shape[1]
    return sorted((int(i) // n, int(i) % n) for i in order)


def first_token_logprob(model, data, *, original=None):
    """log P(first token of the reference answer | chat-formatted prompt), one forward each."""
    tok, out = model.tokenizer, []
    with torch.no_grad():
        for ex in data.examples:
            ids = tok(format_prompt(tok, ex.prompt), add_special_tokens=False)["input_ids"]
            first = tok(ex.response, add_special_tokens=False)["input_ids"][0]
            logits = model(torch.tensor([ids], device=next(model.parameters()).device))
            out.append(float(logits[0, -1].float().log_softmax(-1)[first]))
    return out


LOADS: list[str] = []


def load_registered_tiny(name, *, device=None, dtype=None, cache_dir=None, n_devices=1):
    LOADS.append(name)
    model = tiny_model(seed=0, device=device, n_ctx=512)
    model.cfg.model_name = name
    return model


@pytest.fixture(scope="module")
def registered():
    register_arm("second_by_c", second_by_c, label="every other unit by C", colour="#999933",
                 marker="X")
    register_metric("first_token_logprob", first_token_logprob, on="benign",
                    lower_is_better=False, role="utility", unit="log P, nats",
                    label="log P of the reference answer's first token (benign)")
    register_model_family("tiny-registered", load_registered_tiny, names=("tiny-registered",),
                          n_ctx=512, bias_free=True, architectures=("LlamaForCausalLM",))
    yield
    unregister_arm("second_by_c")
    unregister_metric("first_token_logprob")
    unregister_model_family("tiny-registered")


@pytest.fixture(scope="module")
def run(registered, tmp_path_factory):
    out = tmp_path_factory.mktemp("registered_run")
    cfg = RunConfig.from_preset("smoke", out_dir=str(out), model="tiny-registered",
                                attribute=False)
    return out, cfg, run_experiment(cfg, progress=False)


def _at_k1(doc: dict, metric: str) -> dict:
    """A metric's comparisons at k = 1 (JSON keys: strings)."""
    per_k = doc["comparisons"]["metrics"][metric]
    return per_k.get(1, per_k.get("1"))


def test_a_registered_arm_is_trained_reported_and_drawn(run):
    out, cfg, doc = run
    assert "second_by_c" in cfg.baselines  # the smoke preset's "every baseline" includes it
    from cast_interp.conflict_map import ConflictMap

    cmap = ConflictMap.load(out / "diagnosis")
    C = cmap.units("head")["C"]
    second = int(torch.argsort(C.flatten(), descending=True)[1])  # k = 1 of the tiny model's 8
    pieces = [a for n, a in doc["arms"].items() if n.startswith("second_by_c_k1_")]
    assert sorted(p["piece"]["train_seed"] for p in pieces) == cfg.train_seeds
    for p in pieces:
        assert [tuple(u) for u in p["skip"]] == [(second // C.shape[1], second % C.shape[1])]
        assert p["tuning"]["n_frozen_in_scope"] == doc["arms"]["cast_k1_t0"]["tuning"][
            "n_frozen_in_scope"]  # budget-matched with CAST
    rows = {r["method"]: r for r in
            _at_k1(doc, "kl_to_original")["rows"]}
    assert rows["second_by_c"]["vs_random"] is not None
    assert "| second_by_c_k1 |" in (out / "report.md").read_text()
    assert style.arm_style("second_by_c") == ("every other unit by C", "#999933", "X")
    assert "second_by_c" in arm_names()
    args = build_parser().parse_args(["run", "--baselines", "second_by_c", "bottom"])
    assert args.baselines == ["second_by_c", "bottom"]


def test_a_registered_metric_is_measured_and_reported_with_its_ci(run):
    out, cfg, doc = run
    # Its values are the compute function's on the original model, prompt by prompt.
    from cast_interp.evaluate import as_dataset
    from cast_interp.pipeline import _datasets

    benign = as_dataset(_datasets(cfg)["benign_test"], "benign")
    want = first_token_logprob(load_registered_tiny("check"), benign)
    assert doc["original_per_prompt"]["first_token_logprob"] == pytest.approx(want, abs=1e-5)
    assert doc["original"]["metrics"]["first_token_logprob"] == pytest.approx(
        sum(want) / len(want), abs=1e-5)
    block = _at_k1(doc, "first_token_logprob")
    cast = next(r for r in block["rows"] if r["method"] == "cast")
    d = cast["vs_random"]
    assert d["low"] <= d["diff"] <= d["high"] and math.isfinite(d["high"] - d["low"])
    md = (out / "report.md").read_text()
    heading = next(line for line in md.splitlines()
                   if line.startswith("## log P of the reference answer's first token (benign) ("))
    assert "utility; higher is better" in heading
    assert report._cell(d) in md  # the paired difference with its CI
    assert (out / "figures" / "paired_differences.png").exists()


def test_a_registered_model_family_loads_through_the_registry(run):
    out, cfg, doc = run
    assert "tiny-registered" in LOADS and doc["model"]["model_name"] == "tiny-registered"
    model = load_model("TINY-registered")  # names match in any case
    assert family_of(model.tokenizer).name == "tiny-registered"
    assert end_of_turn_id(model.tokenizer) == model.tokenizer.eos_token_id  # no own token: EOS


# --------------------------------------------------------------------------------------------------
# Model constants from the family
# --------------------------------------------------------------------------------------------------

LLAMA3_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def _llama3_style_tokenizer():
    """A byte tokenizer with Llama 3's special tokens and turn format (EOS <|end_of_text|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                            "<|end_header_id|>", "<|pad|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>",
                                   pad_token="<|pad|>")
    fast.chat_template = LLAMA3_TEMPLATE
    return fast


def test_a_llama_3_style_model_ends_turns_with_eot_id_not_eos():
    tok = _llama3_style_tokenizer()
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot != tok.eos_token_id
    assert family_of(tok).name == "llama-3"
    assert end_of_turn_id(tok) == eot
    # The loss mask teaches the answer to end with <|eot_id|>, as the template does.
    batch = make_batches(tok, ChatDataset("x", [ChatExample("hi", "ok")]), batch_size=1)[0]
    last = int(batch.loss_mask[0].nonzero().max())
    assert int(batch.tokens[0, last]) == eot


def test_a_family_end_of_turn_token_is_used_for_its_models():
    def load(name, **kw):
        return tiny_model(seed=0, n_ctx=512)

    register_model_family("tiny-system-eot", load, names=("tiny-system-eot",),
                          end_of_turn="<|system|>")
    try:
        model = load_model("tiny-system-eot")
        assert end_of_turn_id(model.tokenizer) == model.tokenizer.convert_tokens_to_ids(
            "<|system|>") != model.tokenizer.eos_token_id
        assert end_of_turn_id(tiny_model(seed=0).tokenizer) == model.tokenizer.eos_token_id
    finally:
        unregister_model_family("tiny-system-eot")


@pytest.mark.skipif(backend.USES_BRIDGE, reason="TL 4 reads the biases off the Hugging Face modules")
def test_a_family_declares_its_architecture_bias_free():
    model = tiny_model(seed=0)
    model.cfg.original_architecture = "NewArchForCausalLM"
    assert backend.has_attn_bias(model)
    register_model_family("new-arch", lambda name, **kw: None, bias_free=True,
                          architectures=("NewArchForCausalLM",))
    try:
        assert not backend.has_attn_bias(model)
    finally:
        unregister_model_family("new-arch")


def test_a_family_carries_its_shape_and_the_cost_model_counts_its_units():
    from cast_interp import pipeline
    from cast_interp.registry.models import n_units_of

    # The built-in families: SmolLM2 30 layers x 9 query heads (3 key/value groups), Gemma-3-270m
    # 18 x 4 (1 group); a folder or a hub name fixes no shape.
    assert (n_units_of("smollm2-135m-instruct"), n_units_of("smollm2", "group")) == (270, 90)
    assert (n_units_of("gemma-3-270m"), n_units_of("gemma-3-270m", "group")) == (72, 18)
    assert n_units_of("tiny") == 8 and n_units_of("tiny-gqa", "group") is None
    assert n_units_of("gpt2") is None
    register_model_family("shaped", lambda name, **kw: None, names=("shaped-1b",), n_layers=3,
                          n_heads=6, n_kv_heads=2)
    try:
        assert (n_units_of("shaped-1b"), n_units_of("shaped-1b", "group")) == (18, 6)
        # Stage 4 evaluates 2k candidates, 10 spread units per kind, 5 joint sets and 20 draws;
        # k = 10% of the model's heads: 27 of SmolLM2's 270, 2 of the registered family's 18.
        cfg = RunConfig(k_fractions=[0.1], attribution_spread=10, attribution_draws=20)
        assert pipeline.attribution_seconds(cfg)["n_evaluations"] == 54 + 20 + 5 + 20
        shaped = RunConfig(**{**cfg.to_dict(), "model": "shaped-1b"})
        assert pipeline.attribution_seconds(shaped)["n_evaluations"] == 4 + 20 + 5 + 20
        assert pipeline.estimate_seconds(shaped) == pipeline.estimate_seconds(cfg, n_units=18)
    finally:
        unregister_model_family("shaped")
    with pytest.raises(ValueError, match="registers no shape.*pass n_units="):
        pipeline.estimate_seconds(RunConfig(model="gpt2"))
    with pytest.raises(ValueError, match="n_kv_heads .3. must divide n_heads .4."):
        register_model_family("odd", lambda name, **kw: None, n_layers=2, n_heads=4, n_kv_heads=3)


def test_registries_refuse_clashes_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_arm("cast", second_by_c)
    with pytest.raises(ValueError, match="is not one of"):
        select_arm_units("nonexistent", None, 1)
    with pytest.raises(ValueError, match="already metric 'refusal_rate'"):
        register_metric("refusal_again", first_token_logprob, key="refusal", on="harmful",
                        lower_is_better=False, role="safety")
    with pytest.raises(ValueError, match="Unknown baselines"):
        RunConfig(baselines=["nonexistent"])
    # Stored per-prompt keys and the curves' key name the same metrics as their names.
    assert get_metric("refusal").name == get_metric("refusal_rate").name == "refusal_rate"
    assert get_metric("kl").name == "kl_to_original"
    assert get_metric("task_correct").name == "task_accuracy"


# --------------------------------------------------------------------------------------------------
# No import cycle
# --------------------------------------------------------------------------------------------------


def _module_imports(path: Path) -> set[str]:
    """Modules of the package that `path` imports when it is imported (relative imports outside
    function bodies; a function-level import runs later and cannot make a cycle at import)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    pkg = parts if parts[-1] == "__init__" else parts[:-1]
    pkg = [p for p in pkg if p != "__init__"]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.ImportFrom) and child.level > 0:
                base = pkg[:len(pkg) - (child.level - 1)] + (child.module or "").split(".")
                base = [b for b in base if b]
                if base != pkg[:len(base)]:  # `from . import x`: the importer's own package
                    found.add(".".join(base))
                # Importing a.b.c runs the packages a.b first, unless the importer is inside it.
                found.update(".".join(base[:i]) for i in range(2, len(base))
                             if base[:i] != pkg[:i])
                for alias in child.names:  # `from . import x` / `from .pkg import mod`
                    sub = PACKAGE.parent.joinpath(*base, alias.name)
                    if sub.with_suffix(".py").exists() or (sub / "__init__.py").exists():
                        found.add(".".join(base + [alias.name]))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_the_package_has_no_import_cycle():
    graph = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(
        ".__init__"): _module_imports(p) for p in PACKAGE.rglob("*.py")}
    assert "cast_interp.registry.arms" in graph and len(graph) > 25
    state: dict[str, int] = {}
    cycles = []

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt, stack + [nxt])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            dfs(mod, [mod])
    assert cycles == [], f"import cycles: {cycles}"
