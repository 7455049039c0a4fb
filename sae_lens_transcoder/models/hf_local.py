"""Turn Hugging Face models that live on local disk into HookedTransformers.

``HookedTransformer.from_pretrained`` only accepts names from TransformerLens's
official list, so local checkpoints go through TransformerLens's lower-level
config and weight converters instead. The architecture comes from the HF config.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.loading_from_pretrained import (
    convert_hf_model_config,
    get_pretrained_model_config,
    get_pretrained_state_dict,
)
from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights
from transformer_lens.utilities.quantization import quantization_method
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# TransformerLens guesses the architecture from these words in a model's path
# and then skips reading its config, so no path we hand it may contain them.
_NAME_SNIFFED_WORDS = ("llama", "gemma")

# Keyword arguments that belong to HookedTransformer rather than its config.
_MODEL_KWARGS = ("default_padding_side", "refactor_factored_attn_matrices")


def as_torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept SAELens-style dtype strings ("float32", "torch.bfloat16") too."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}")
    return resolved


def clean_hf_config(hf_model: PreTrainedModel) -> PretrainedConfig:
    """Copy of the model's config that TransformerLens can read.

    GGUF-loaded configs name no architecture and still declare a GGUF
    quantization although transformers has already dequantized the weights.
    """
    config = copy.deepcopy(hf_model.config)
    config.architectures = [type(hf_model).__name__]
    if quantization_method(config) == "gguf":
        del config.quantization_config
    return config


@contextmanager
def _config_dir(hf_config: PretrainedConfig) -> Iterator[str]:
    """TransformerLens reads HF configs only by path: write one to a neutral dir."""
    with tempfile.TemporaryDirectory(prefix="tl-config-") as tmp:
        if any(word in tmp.lower() for word in _NAME_SNIFFED_WORDS):
            raise RuntimeError(
                f"Temporary directory {tmp!r} contains one of {_NAME_SNIFFED_WORDS}, "
                "which makes TransformerLens ignore the model config; set TMPDIR elsewhere."
            )
        hf_config.save_pretrained(tmp)
        yield tmp


# TransformerLens builds Gemma 2/3 configs only from official names: a local checkpoint takes
# the official layout of its family with its own sizes (``_gemma_config``).
_GEMMA_TEMPLATES = {"Gemma2ForCausalLM": "google/gemma-2-2b", "Gemma3ForCausalLM": "google/gemma-3-1b-pt"}


def _architecture(hf_config: PretrainedConfig) -> str:
    return (hf_config.architectures or [""])[0]


def _gemma_config(hf_config: PretrainedConfig, **kwargs: Any) -> HookedTransformerConfig:
    """A local Gemma 2/3 checkpoint's TransformerLens config: its family's official layout
    (post-norms, soft-caps, local/global attention) with the checkpoint's own sizes."""
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if getattr(c, "query_pre_attn_scalar", head_dim) != head_dim:
        raise ValueError(
            f"query_pre_attn_scalar={c.query_pre_attn_scalar} differs from head_dim={head_dim}: TransformerLens's "
            "Gemma layout scales attention by head_dim; load this model by its official name instead."
        )
    cfg = convert_hf_model_config(_GEMMA_TEMPLATES[_architecture(c)])
    layer_types = getattr(c, "layer_types", None) or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(c.num_hidden_layers)
    ]
    cfg.update(
        d_model=c.hidden_size, d_head=head_dim, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, d_vocab=c.vocab_size, eps=c.rms_norm_eps,
        n_key_value_heads=c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None,
        n_ctx=min(c.max_position_embeddings, cfg["n_ctx"]), window_size=c.sliding_window,
        attn_types=["local" if t == "sliding_attention" else "global" for t in layer_types],
        output_logits_soft_cap=getattr(c, "final_logit_softcapping", None) or -1.0,
        attn_scores_soft_cap=getattr(c, "attn_logit_softcapping", None) or -1.0,
    )
    rope = getattr(c, "rope_parameters", None) or {}
    if "full_attention" in rope:  # Gemma 3: global and local layers rotate at their own bases
        cfg.update(rotary_base=rope["full_attention"]["rope_theta"], rotary_base_local=rope["sliding_attention"]["rope_theta"])
    elif "rope_theta" in rope:
        cfg.update(rotary_base=rope["rope_theta"])
    for key in ("quantization_method", "tokenizer_name"):
        cfg.pop(key, None)
    return HookedTransformerConfig(**{**cfg, **kwargs})


def hf_to_tl_state_dict(
    hf_model: PreTrainedModel, hf_config: PretrainedConfig
) -> dict[str, torch.Tensor]:
    """Rename and reshape HF weights into unprocessed HookedTransformer weights."""
    dtype = next(hf_model.parameters()).dtype
    if _architecture(hf_config) in _GEMMA_TEMPLATES:
        return convert_gemma_weights(hf_model, _gemma_config(hf_config, dtype=dtype))
    with _config_dir(hf_config) as config_dir:
        cfg = get_pretrained_model_config(config_dir, dtype=dtype, device="cpu")
        return get_pretrained_state_dict(config_dir, cfg, hf_model=hf_model, dtype=dtype)


def build_hooked_transformer(
    hf_config: PretrainedConfig,
    state_dict: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
    **kwargs: Any,
) -> HookedTransformer:
    """Assemble a HookedTransformer from unprocessed weights, as from_pretrained would.

    Don't reuse ``state_dict`` afterwards: processing may edit its tensors.
    Other ``kwargs`` (``default_prepend_bos``, ``n_ctx``, ``first_n_layers``,
    ...) go to TransformerLens's config builder.
    """
    dtype = as_torch_dtype(dtype)
    model_kwargs = {key: kwargs.pop(key) for key in _MODEL_KWARGS if key in kwargs}
    if _architecture(hf_config) in _GEMMA_TEMPLATES:
        cfg = _gemma_config(hf_config, device=device, dtype=dtype, **kwargs)
    else:
        with _config_dir(hf_config) as config_dir:
            cfg = get_pretrained_model_config(
                config_dir, fold_ln=fold_ln, device=device, dtype=dtype, **kwargs
            )
    _rename(cfg, model_name)
    kept = _drop_extra_layers(state_dict, cfg.n_layers)
    model = HookedTransformer(
        cfg,
        tokenizer,
        move_to_device=False,
        default_padding_side=model_kwargs.get("default_padding_side"),
    )
    model.load_and_process_state_dict(
        {key: value.to(dtype) for key, value in kept.items()},
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
        refactor_factored_attn_matrices=model_kwargs.get("refactor_factored_attn_matrices", False),
    )
    model.move_model_modules_to_device()
    return model.eval()


def _rename(cfg: HookedTransformerConfig, model_name: str) -> None:
    """Replace the temporary config path TransformerLens recorded as the model's name."""
    cfg.model_name = model_name
    cfg.tokenizer_name = None


def _drop_extra_layers(
    state_dict: dict[str, torch.Tensor], n_layers: int
) -> dict[str, torch.Tensor]:
    """Keep only the blocks a ``first_n_layers`` config asks for."""
    return {
        key: value
        for key, value in state_dict.items()
        if not (key.startswith("blocks.") and int(key.split(".")[1]) >= n_layers)
    }


def load_local_hf_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
    **kwargs: Any,
) -> HookedTransformer:
    """Load a local HF checkpoint dir (config.json, weights, tokenizer) without the Hub.

    Defaults to no weight processing, like SAELens's own model loading.
    """
    path = Path(path).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    dtype = as_torch_dtype(dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    hf_config = clean_hf_config(hf_model)
    state_dict = hf_to_tl_state_dict(hf_model, hf_config)
    del hf_model
    return build_hooked_transformer(
        hf_config,
        state_dict,
        tokenizer,
        model_name=path.name,
        device=device,
        dtype=dtype,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
        **kwargs,
    )
