"""Tiny random configs of every causal-LM family the support matrix covers (hidden <= 64, 2-4 layers).

``build(name)`` returns a fresh eval-mode model with fixed-seed random weights, loaded with its default
attention implementation (transformers picks sdpa where the family supports it), so every sinkscope path
has to switch it itself. Sliding windows and chunks are small (6) so that they matter on 24-40 token prompts.
``build(name, layers=[...])`` overrides the layer types (for one-layer cache references).
Nothing is downloaded; each build takes milliseconds.
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 128  # covers conftest.char_vocab (104 ids)
WINDOW = 6
_COMMON: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
_MOE = dict(num_experts_per_tok=1, moe_intermediate_size=32)

# name -> (model_type, overrides). Layer types alternate so that each kind of layer is present.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    "mixtral": ("mixtral", {"num_local_experts": 2, "num_experts_per_tok": 1, "sliding_window": WINDOW}),
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen3": ("qwen3", {"head_dim": 8}),
    "qwen3_moe": ("qwen3_moe", {"head_dim": 8, "num_experts": 2, **_MOE}),
    "qwen3_next": ("qwen3_next", {"head_dim": 8, "num_experts": 2, **_MOE,
                                  "layer_types": ["linear_attention", "full_attention"],
                                  "linear_num_value_heads": 2, "linear_num_key_heads": 2,
                                  "linear_key_head_dim": 8, "linear_value_head_dim": 8}),
    "phi": ("phi", {"partial_rotary_factor": 0.5}),
    "phi3": ("phi3", {"sliding_window": WINDOW}),
    "gpt_neox": ("gpt_neox", {"rotary_pct": 0.5}),
    "gptj": ("gptj", {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, "n_positions": 256}),
    "falcon": ("falcon", {"new_decoder_architecture": False, "multi_query": True}),
    "falcon_alibi": ("falcon", {"alibi": True}),
    "mpt": ("mpt", {"d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 256, "expansion_ratio": 2}),
    "bloom": ("bloom", {"n_embed": 32, "n_layer": 2, "n_head": 4}),
    "gpt2": ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    "opt": ("opt", {"ffn_dim": 64, "word_embed_proj_dim": 32}),
    "gemma": ("gemma", {"head_dim": 8}),
    "gemma2": ("gemma2", {"head_dim": 8, "sliding_window": WINDOW, "query_pre_attn_scalar": 8,
                          "attn_logit_softcapping": 5.0}),
    "gemma3": ("gemma3_text", {"head_dim": 8, "sliding_window": WINDOW, "query_pre_attn_scalar": 8,
                               "layer_types": ["sliding_attention", "full_attention"]}),
    "gemma3n": ("gemma3n_text", {"head_dim": 8, "sliding_window": WINDOW, "num_hidden_layers": 4,
                                 "layer_types": ["sliding_attention", "full_attention"] * 2,
                                 "num_kv_shared_layers": 2, "hidden_size_per_layer_input": 8, "laurel_rank": 4,
                                 "altup_num_inputs": 2, "activation_sparsity_pattern": [0.0] * 4,
                                 "vocab_size_per_layer_input": VOCAB}),
    "gemma4": ("gemma4_text", {"head_dim": 8, "global_head_dim": 16, "sliding_window": WINDOW,
                               "layer_types": ["sliding_attention", "full_attention"],
                               "hidden_size_per_layer_input": 0}),
    "cohere": ("cohere", {}),
    "stablelm": ("stablelm", {"partial_rotary_factor": 0.25}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {}),
    "gpt_oss": ("gpt_oss", {"num_local_experts": 2, "num_experts_per_tok": 1, "head_dim": 8,
                            "sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]}),
    "deepseek_v3": ("deepseek_v3", {"num_key_value_heads": 4, "n_routed_experts": 2, **_MOE, "kv_lora_rank": 16,
                                    "q_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8,
                                    "v_head_dim": 6, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}),
    "smollm3": ("smollm3", {"no_rope_layer_interval": 2}),
    "llama4": ("llama4_text", {"head_dim": 8, "num_local_experts": 2, "num_experts_per_tok": 1,
                               "attention_chunk_size": WINDOW, "intermediate_size_mlp": 64,
                               "interleave_moe_layer_step": 1, "no_rope_layers": [1, 0]}),
}


def config(name: str, **overrides: Any) -> Any:
    """The tiny config of family ``name``."""
    from transformers import AutoConfig

    model_type, extra = FAMILIES[name]
    return AutoConfig.for_model(model_type, **{**_COMMON, **extra, **overrides})


def build(name: str, seed: int = 0, attn: str | None = None, **overrides: Any) -> Any:
    """A tiny random model of family ``name`` (eval mode; ``attn``: the attention implementation, default
    transformers' choice for the family)."""
    import warnings

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    cfg = config(name, **overrides)
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # tiny configs trip harmless config warnings (RoPE factors, MoE sizes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kwargs = {"attn_implementation": attn} if attn else {}
            return AutoModelForCausalLM.from_config(cfg, **kwargs).eval()
    finally:
        hf_logging.set_verbosity(verbosity)


def token_ids(n: int, seed: int = 0) -> torch.Tensor:
    """``[1, n]`` random ids above the special tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (1, n), generator=g)
