"""Small random-weight models of the families with released transcoders, built offline.

Each is a Hugging Face model of the family's real class, scaled down, converted into a
HookedTransformer by TransformerLens's own config and weight converters, so Gemma's
embedding scale, its ``1 + w`` norms and its post-attention/post-MLP norms are in the
weights exactly as for the released models. Gemma 2/3 take TransformerLens's official
config of a real checkpoint (local/global layers, soft-caps, grouped-query attention) with
the sizes shrunk; Qwen3 goes through the HF config, as ``load_local_hf_model`` does. The soft
caps are lowered so that they bend these small logits (30 and 50 would leave them linear).
"""

from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.loading_from_pretrained import convert_hf_model_config
from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights
from transformers import (
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import sae_lens_transcoder
from sae_lens_transcoder.models.hf_local import build_hooked_transformer, clean_hf_config, hf_to_tl_state_dict
from tests.conftest import CONTEXT, D_MODEL

# The bundled tiny model's tokenizer, so that dashboards and graphs have token strings.
TOKENIZER = AutoTokenizer.from_pretrained(Path(sae_lens_transcoder.__file__).parent / "assets" / "tiny-gpt2")
D_VOCAB = len(TOKENIZER)

FAMILIES = ("gemma2", "gemma3", "qwen3")
N_LAYERS = 3
WINDOW = 4  # local attention sees 4 tokens: shorter than the test prompts
_HF_SIZES: dict[str, Any] = dict(
    vocab_size=D_VOCAB, hidden_size=D_MODEL, intermediate_size=128, num_hidden_layers=N_LAYERS,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=CONTEXT,
    initializer_range=0.15,  # HF's 0.02 leaves these small MLPs writing almost nothing
)
_TL_SIZES: dict[str, Any] = dict(
    d_model=D_MODEL, d_head=16, n_heads=4, n_key_value_heads=2, d_mlp=128, n_layers=N_LAYERS,
    n_ctx=CONTEXT, d_vocab=D_VOCAB, window_size=WINDOW,
)


def _hf_model(family: str) -> PreTrainedModel:
    if family == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(
            **_HF_SIZES, sliding_window=WINDOW, query_pre_attn_scalar=16,
            final_logit_softcapping=1.0, attn_logit_softcapping=2.0, attn_implementation="eager",
        ))
    if family == "gemma3":
        return Gemma3ForCausalLM(Gemma3TextConfig(
            **_HF_SIZES, sliding_window=WINDOW, query_pre_attn_scalar=16, rope_theta=1_000_000,
            rope_local_base_freq=10_000, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            attn_implementation="eager",
        ))
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**_HF_SIZES, attn_implementation="eager"))
    raise ValueError(f"family {family!r} is not one of {FAMILIES}")


def _gemma_config(family: str) -> HookedTransformerConfig:
    official = {"gemma2": "google/gemma-2-2b", "gemma3": "google/gemma-3-1b-pt"}[family]
    cfg = convert_hf_model_config(official)
    cfg.update(_TL_SIZES, attn_types=cfg["attn_types"][:N_LAYERS] if family == "gemma2" else ["local", "local", "global"])
    if family == "gemma2":
        cfg.update(output_logits_soft_cap=1.0, attn_scores_soft_cap=2.0)
    for key in ("quantization_method", "tokenizer_name"):
        cfg.pop(key, None)
    return HookedTransformerConfig(**cfg)


def build_family_pair(family: str, seed: int = 0) -> tuple[PreTrainedModel, HookedTransformer]:
    """(the HF model, its HookedTransformer) with random weights and non-trivial norms."""
    torch.manual_seed(seed)
    hf_model = _hf_model(family).eval()
    with torch.no_grad():  # fresh norms are the identity, which would hide a norm left out
        for name, param in hf_model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    if family == "qwen3":
        config = clean_hf_config(hf_model)
        model = build_hooked_transformer(config, hf_to_tl_state_dict(hf_model, config), TOKENIZER, model_name="tiny-qwen3")
    else:
        cfg = _gemma_config(family)
        model = HookedTransformer(cfg, TOKENIZER)
        model.load_and_process_state_dict(
            convert_gemma_weights(hf_model, cfg), fold_ln=False, center_writing_weights=False,
            center_unembed=False, fold_value_biases=False,
        )
    return hf_model, model.eval()


def build_family_model(family: str, seed: int = 0) -> HookedTransformer:
    return build_family_pair(family, seed)[1]
