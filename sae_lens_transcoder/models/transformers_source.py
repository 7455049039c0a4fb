"""Training activations from transformers' own forward pass, under TransformerLens's hook names.

TransformerLens re-implements each model, and on CPU its forward pass to an MLP is measurably
slower than transformers' own (which runs SDPA attention and no per-call weight rearranging).
With ``model_class_name: AutoModelForCausalLM`` the runner makes its training activations with
SAELens's ``HookedProxyLM`` around the transformers model, its hook points named after the
TransformerLens hooks the transcoders record (``blocks.L.mlp.hook_in``, ``blocks.L.hook_mlp_out``).
Everything else (hook checks, evals, what is saved, splicing, circuits) stays on the
HookedTransformer, and a probe batch checks that both models give the same activations first.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import torch
from sae_lens.load_model import HookedProxyLM
from transformer_lens import HookedTransformer
from transformer_lens.loading_from_pretrained import get_official_model_name
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from sae_lens_transcoder.hooks import ensure_input_hooks, hook_layer, probe_hooks, probe_tokens

from .smollm2 import SMOLLM2_MODEL_NAME, load_smollm2_hf

TRANSFORMERS_MODEL_CLASS = "AutoModelForCausalLM"

# The module of a decoder layer whose output each TransformerLens MLP hook carries, in order of
# preference: Gemma's pre/post-feedforward norms come first, since Gemma's
# ``post_attention_layernorm`` normalises the attention output, not the MLP input.
_MODULES_FOR_HOOK = {
    "mlp.hook_in": ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2"),
    "hook_mlp_out": ("post_feedforward_layernorm", "mlp"),
}
# Activations of the two models may differ by float rounding (different kernels), no more.
_RELATIVE_TOLERANCE = 1e-3
# HookedTransformer.from_pretrained's own parameters; it hands every other keyword (revision,
# cache_dir, trust_remote_code, ...) to transformers' from_pretrained, and so does this module.
_TRANSFORMER_LENS_ONLY_KWARGS = frozenset(inspect.signature(HookedTransformer.from_pretrained).parameters) | {"torch_dtype"}


class TransformersMLPHooks(HookedProxyLM):
    """SAELens's proxy for a transformers model, hooked only at the modules whose outputs are
    the given TransformerLens hooks, under those hooks' names."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, module_for_hook: dict[str, str]
    ):
        # Read by setup(), which HookedProxyLM.__init__ calls; a plain dict is no nn.Module state.
        object.__setattr__(self, "module_for_hook", dict(module_for_hook))
        super().__init__(model, tokenizer, hook_names=list(module_for_hook.values()))

    def setup(self) -> None:
        # HookedProxyLM names each hook point after its module; the store, the batch layout and
        # the saved transcoders use TransformerLens's names, so the points are renamed to those.
        super().setup()
        for hook, module in self.module_for_hook.items():
            self.hook_dict[module].name = hook
        self.hook_dict = {hook: self.hook_dict[module] for hook, module in self.module_for_hook.items()}
        self.mod_dict = dict(self.hook_dict)
        self.named_modules_dict = {
            hook: self.named_modules_dict[module] for hook, module in self.module_for_hook.items()
        }


def mlp_hook_modules(hf_model: PreTrainedModel, hook_names: list[str]) -> dict[str, str]:
    """``hook -> module`` for TransformerLens MLP hooks: the module whose output each one carries."""
    modules = dict(hf_model.named_modules())
    result = {}
    for hook in hook_names:
        layer = hook_layer(hook)
        kind = hook.removeprefix(f"blocks.{layer}.")
        if kind not in _MODULES_FOR_HOOK:
            raise ValueError(
                f"model_class_name={TRANSFORMERS_MODEL_CLASS!r} reads only the MLP's own input and output "
                f"({', '.join(f'blocks.{layer}.{k}' for k in _MODULES_FOR_HOOK)}), not {hook!r}. Use "
                "sae.mlp_input_hook: exact, or train with model_class_name: HookedTransformer."
            )
        block = _decoder_layer(modules, layer)
        found = next((f"{block}.{name}" for name in _MODULES_FOR_HOOK[kind] if f"{block}.{name}" in modules), None)
        if found is None:
            raise ValueError(
                f"model_class_name={TRANSFORMERS_MODEL_CLASS!r}: decoder layer {block!r} has none of "
                f"{list(_MODULES_FOR_HOOK[kind])}, so {hook!r} cannot be read from it. Train with "
                "model_class_name: HookedTransformer."
            )
        result[hook] = found
    return result


def _decoder_layer(modules: dict[str, torch.nn.Module], layer: int) -> str:
    """The name of decoder layer ``layer``: the numbered entry of a layer list that has an MLP."""
    pattern = re.compile(rf"(?:.+\.)?(?:layers|h)\.{layer}")
    blocks = [name for name in modules if pattern.fullmatch(name) and f"{name}.mlp" in modules]
    if len(blocks) != 1:
        raise ValueError(
            f"model_class_name={TRANSFORMERS_MODEL_CLASS!r}: expected one decoder layer {layer} with an "
            f"'mlp' module, found {blocks or 'none'}. Train with model_class_name: HookedTransformer."
        )
    return blocks[0]


def load_transformers_source(
    model_name: str, model: HookedTransformer, hook_names: list[str], from_pretrained_kwargs: dict[str, Any] | None = None
) -> TransformersMLPHooks:
    """The transformers form of ``model_name`` (embedded SmolLM2, a local directory or a Hub
    name) on ``model``'s device and dtype, read through ``model``'s tokenizer so that both
    tokenise the data identically, and checked to give ``model``'s activations at ``hook_names``.

    A Hub model gets the keywords of ``from_pretrained_kwargs`` (``model_from_pretrained_kwargs``)
    that TransformerLens hands on to transformers, so both read the same revision and cache."""
    local = Path(model_name).expanduser()
    if model_name == SMOLLM2_MODEL_NAME:
        hf_model, _ = load_smollm2_hf()
    elif local.is_dir():
        hf_model = AutoModelForCausalLM.from_pretrained(local)
    else:
        hub_kwargs = {k: v for k, v in (from_pretrained_kwargs or {}).items() if k not in _TRANSFORMER_LENS_ONLY_KWARGS}
        # A Hub name may be a TransformerLens alias ("gpt2-small"): transformers wants the repo id.
        hf_model = AutoModelForCausalLM.from_pretrained(get_official_model_name(model_name), **hub_kwargs)
    hf_model.config.use_cache = False  # activations are read once: no key/value cache to build
    hf_model = hf_model.to(device=model.cfg.device, dtype=model.cfg.dtype).eval()
    source = TransformersMLPHooks(hf_model, model.tokenizer, mlp_hook_modules(hf_model, hook_names))
    check_same_activations(source, model, hook_names)
    return source


def check_same_activations(source: TransformersMLPHooks, model: HookedTransformer, hook_names: list[str]) -> None:
    """Refuse a transformers model whose activations differ from the HookedTransformer's:
    the transcoders would train on one model and be evaluated and saved for another."""
    ensure_input_hooks(model, hook_names)
    tokens = probe_tokens(model)
    expected = probe_hooks(model, hook_names, tokens)
    got = probe_hooks(source, hook_names, tokens)
    for hook in hook_names:
        module = source.module_for_hook[hook]
        if hook not in got or got[hook].shape != expected[hook].shape:
            raise ValueError(
                f"model_class_name={TRANSFORMERS_MODEL_CLASS!r}: transformers' {module!r} does not give "
                f"{hook!r}'s activations (shape {tuple(expected[hook].shape)}) on a probe batch. Train "
                "with model_class_name: HookedTransformer."
            )
        error = (got[hook] - expected[hook]).abs().max().item()
        scale = max(1.0, expected[hook].abs().max().item())
        if error > _RELATIVE_TOLERANCE * scale:
            raise ValueError(
                f"model_class_name={TRANSFORMERS_MODEL_CLASS!r}: transformers' {module!r} output differs "
                f"from the HookedTransformer's {hook!r} by up to {error:.3g} (activations up to "
                f"{scale:.3g}) on a probe batch, so the two models disagree. Train with "
                "model_class_name: HookedTransformer."
            )
