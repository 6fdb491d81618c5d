"""Shared fixtures: tiny random-config models, a character-level tokenizer, and reference computations.

Nothing here downloads anything. The tiny models are built from configs with fixed seeds, loaded with
their default attention implementation (``sdpa``), so that :func:`sinkscope.capture` has to switch them to
eager attention and back.

``ref`` (see :class:`Reference`) recomputes every design.md number from attention maps that transformers
itself returns (eager attention, ``output_attentions=True``) with plain numpy, independently of
``sinkscope.metrics``.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import string
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

if Path("/usr/bin/chromium").exists():  # Debian's Chromium, for dash_duo (Selenium looks for Google Chrome)
    os.environ.setdefault("DASH_TEST_CHROMEPATH", "/usr/bin/chromium")

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)

# Texts with a known number of characters: the tokenizer maps one character to one token.
TEXT_24 = "The cat sat on the mat.\n"  # 24 characters
TEXT_60 = "Sinks: a model parks attention on its first token, then read"  # 60 characters


# ------------------------------------------------------------------------------------------- utilities


def require_distribution(dist: str, install: str) -> None:
    """Skip when ``dist`` is not installed; fail instead under CI, where a skip would hide a broken setup."""
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        msg = f"package {dist} is not installed; install it with: {install}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def char_vocab() -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for c in string.printable:
        vocab.setdefault(c, len(vocab))
    return vocab


def make_char_tokenizer(*, add_bos: bool):
    """A character-level ``PreTrainedTokenizerFast``: one token per printable character, no download.

    With ``add_bos`` a TemplateProcessing post-processor prepends ``<bos>`` (as Llama / Gemma tokenizers do);
    without it, nothing is added (as GPT-2 / SmolLM2 tokenizers do), although ``<bos>`` stays defined.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab=char_vocab(), unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>")


def _token_ids() -> dict[str, int]:
    return {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def build_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{"vocab_size": len(char_vocab()), "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "max_position_embeddings": 256, **_token_ids(), **overrides})
    return LlamaForCausalLM(cfg).eval()


def build_gemma3(seed: int = 1, **overrides):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    kwargs = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "sliding_window": 4,
              **_token_ids(), **overrides}
    cfg = Gemma3TextConfig(vocab_size=len(char_vocab()), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=len(kwargs["layer_types"]), num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                           max_position_embeddings=256, **kwargs)
    return Gemma3ForCausalLM(cfg).eval()


def build_gpt2(seed: int = 2, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(char_vocab()), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     **{**_token_ids(), **overrides})
    return GPT2LMHeadModel(cfg).eval()


def loaded(model, tokenizer, name: str):
    from sinkscope.models import LoadedModel, spec_from_model

    return LoadedModel(model, tokenizer, spec_from_model(model, tokenizer, name, f"test:{name}"))


def build_sink_llama(tokenizer):
    """A tiny Llama in which every head of every layer parks ~all attention on the BOS token.

    Residual dimension 0 is zero for every token but BOS (embedding column 0), and no layer writes to it
    (rows 0 of o_proj / down_proj are zero), so after RMSNorm only BOS has a large component there. Every key
    projection reads that component into head dimension 3 (RoPE's slowest pair: rotation < 0.1 rad over 64
    positions), and a query bias puts a constant there, so q . k_BOS is large for every query.
    """
    model = build_llama(seed=3, attention_bias=True)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[BOS_ID] = 0.0
        emb[BOS_ID, 0] = 1.0
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
            for h in range(model.config.num_key_value_heads):
                attn.k_proj.weight[h * head_dim + 3] = 0.0
                attn.k_proj.weight[h * head_dim + 3, 0] = 2.0
                attn.k_proj.bias[h * head_dim + 3] = 0.0
            for h in range(model.config.num_attention_heads):
                attn.q_proj.weight[h * head_dim + 3] = 0.0
                attn.q_proj.bias[h * head_dim + 3] = 2.0
    return model


# -------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tok_bos():
    """Character tokenizer that prepends ``<bos>``."""
    return make_char_tokenizer(add_bos=True)


@pytest.fixture(scope="session")
def tok_nobos():
    """Character tokenizer that adds nothing."""
    return make_char_tokenizer(add_bos=False)


@pytest.fixture(scope="session")
def tiny_llama(tok_bos):
    """LoadedModel: 3 layers, 4 heads, 2 KV heads, hidden 32, RoPE, BOS-adding tokenizer."""
    return loaded(build_llama(), tok_bos, "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gemma3(tok_bos):
    """LoadedModel: Gemma-3 text, layers sliding(4) / full / sliding, BOS-adding tokenizer."""
    return loaded(build_gemma3(), tok_bos, "tiny-gemma3")


@pytest.fixture(scope="session")
def tiny_gpt2(tok_nobos):
    """LoadedModel: GPT-2, 2 layers, 4 heads, learned positions (64), tokenizer without BOS."""
    return loaded(build_gpt2(), tok_nobos, "tiny-gpt2")


@pytest.fixture(scope="session")
def sink_llama(tok_bos):
    """LoadedModel whose every head is a strong first-token (BOS) sink."""
    return loaded(build_sink_llama(tok_bos), tok_bos, "sink-llama")


def saved_model_dir(tmp_path_factory, name: str, model, *, add_bos: bool) -> Path:
    """``model`` and a character tokenizer saved as a Hugging Face directory (what a user passes as a path)."""
    d = tmp_path_factory.mktemp(name)
    model.save_pretrained(d)
    make_char_tokenizer(add_bos=add_bos).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """The tiny Llama saved as a Hugging Face directory with its tokenizer (max_position_embeddings 256)."""
    return saved_model_dir(tmp_path_factory, "tiny-llama", build_llama(), add_bos=True)


def real_model(name: str):
    """An embedded model, converted once into ``$SINKSCOPE_CACHE`` or the repo's ``.cache/sinkscope-test``."""
    import sinkscope
    from sinkscope import models

    require_distribution(models.REGISTRY[name].distribution, models.REGISTRY[name].install)
    cache = os.environ.get("SINKSCOPE_CACHE") or str(REPO_ROOT / ".cache" / "sinkscope-test")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SINKSCOPE_CACHE", cache)
        return sinkscope.load_model(name, progress=False)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (tests marked ``real``)."""
    return real_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma-3-270M (tests marked ``real``)."""
    return real_model("gemma3-270m")


@pytest.fixture(params=["tiny_llama", "tiny_gemma3", "tiny_gpt2"])
def tiny(request):
    """Each tiny architecture in turn."""
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------------------------------------- reference


class Reference:
    """Independent computations: transformers' own eager maps, and design.md metrics in plain numpy."""

    LOCAL = 8  # design: received mass counts queries q >= max(K, j + 8)

    @staticmethod
    def encode(lm, text: str, max_tokens: int | None = None) -> torch.Tensor:
        ids = lm.tokenizer(text, return_tensors="pt").input_ids
        return ids[:, :max_tokens] if max_tokens else ids

    @staticmethod
    def eager_attentions(model, ids: torch.Tensor) -> list[np.ndarray]:
        """Per-layer ``[heads, T, T]`` float64 maps from ``output_attentions=True`` under eager attention."""
        original = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                out = model(input_ids=ids, output_attentions=True, use_cache=False)
        finally:
            model.set_attn_implementation(original)
        assert out.attentions is not None and len(out.attentions) == model.config.num_hidden_layers
        return [a[0].double().cpu().numpy() for a in out.attentions]

    @staticmethod
    def first_token_mass(a: np.ndarray, k: int) -> np.ndarray:
        return a[:, k:, 0].mean(axis=1)

    @staticmethod
    def sink_mass(a: np.ndarray, k_max: int) -> np.ndarray:
        return np.stack([a[:, k_max:, :k].sum(axis=-1).mean(axis=1) for k in range(1, k_max + 1)], axis=-1)

    @staticmethod
    def entropy(a: np.ndarray, k: int) -> np.ndarray:
        p = a[:, k:, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, -p * np.log(p), 0.0)
        return terms.sum(axis=-1).mean(axis=1)

    @classmethod
    def received(cls, a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sum over heads and queries q >= max(K, j + 8) of A[q, j], number of such queries per head)."""
        t = a.shape[-1]
        total, count = np.zeros(t), np.zeros(t, dtype=int)
        for j in range(t):
            qs = np.arange(max(k, j + cls.LOCAL), t)
            total[j] = a[:, qs, j].sum()
            count[j] = len(qs)
        return total, count

    @classmethod
    def uniform(cls, t: int, k: int) -> np.ndarray:
        out = np.zeros(t)
        for j in range(t):
            qs = np.arange(max(k, j + cls.LOCAL), t)
            if len(qs):
                out[j] = np.mean(1.0 / (qs + 1))
        return out

    @staticmethod
    def pool(a: np.ndarray, bins: list[tuple[int, int]]) -> np.ndarray:
        """Mean over the query bin of the sum over the key bin, with explicit loops."""
        n = len(bins)
        out = np.zeros((*a.shape[:-2], n, n))
        for r, (q0, q1) in enumerate(bins):
            for c, (k0, k1) in enumerate(bins):
                out[..., r, c] = a[..., q0:q1, k0:k1].sum(axis=-1).mean(axis=-1)
        return out


@pytest.fixture(scope="session")
def ref():
    return Reference


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-model tests: they gain nothing from threads, and on a busy machine
    OpenMP barriers make every op ~ms slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def colon_sink_llama(tok_bos):
    """The sink Llama with the ':' token made a copy of BOS: a second sink at its position, in every layer."""
    model = build_sink_llama(tok_bos)
    colon = tok_bos.convert_tokens_to_ids(":")
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[colon] = emb[tok_bos.bos_token_id]
    return loaded(model, tok_bos, "colon-sink-llama")


# ------------------------------------------------------------------ a stream with pinned positions, by hand


def rotate_llama(k: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Hand-written RoPE by ``delta`` positions, Llama's layout (the halves of the head dim paired)."""
    ang = delta * inv_freq.double()
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    half = k.shape[-1] // 2
    rot = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return (k.double() * cos + rot.double() * sin).to(k.dtype)


def pinned_stream_reference(model, x: list[int], sinks: int, window: int, pins: set[int]) -> np.ndarray:
    """Token by token through transformers' DynamicCache, managed here: each step the token leaving the window
    is dropped unless kept (the first ``sinks`` or a pin), and the keys after it move down one slot
    (re-rotated by -1 with the hand-written rotation); each token is fed at its slot, the kept tokens' count."""
    from transformers import DynamicCache

    kept, inv_freq = set(range(sinks)) | pins, model.model.rotary_emb.inv_freq
    cache, order, out = DynamicCache(config=model.config), [], np.full(len(x), np.nan)
    with torch.no_grad():
        for t, tok in enumerate(x):
            gone = t - window
            if gone >= 0 and gone not in kept:
                i = order.index(gone)
                for layer in cache.layers:
                    moved = rotate_llama(layer.keys[..., i + 1:, :], -1, inv_freq)
                    layer.keys = torch.cat([layer.keys[..., :i, :], moved], -2)
                    layer.values = torch.cat([layer.values[..., :i, :], layer.values[..., i + 1:, :]], -2)
                order.pop(i)
            logits = model(input_ids=torch.tensor([[tok]]), position_ids=torch.tensor([[len(order)]]),
                           past_key_values=cache, use_cache=True).logits[0, -1]
            order.append(t)
            if t + 1 < len(x):
                out[t + 1] = float(torch.nn.functional.cross_entropy(logits.float()[None], torch.tensor([x[t + 1]])))
    return out
