"""Which TransformerLens hooks carry exactly what an MLP reads and writes.

A transcoder is only a faithful MLP replacement when its input is the MLP's input.
That hook differs between models (``ln2.hook_normalized`` equals it only when the
norm is folded), so we check it on a probe forward pass instead of guessing by name.
"""

import logging
import re
from collections.abc import Iterable
from typing import Any

import torch
from sae_lens.analysis.hooked_sae_transformer import add_hook_in_to_mlp
from sae_lens.util import extract_layer_from_tlens_hook_name
from transformer_lens import HookedTransformer
from transformer_lens.components import LayerNormPre, RMSNormPre
from transformer_lens.hook_points import HookedRootModule

logger = logging.getLogger(__name__)

N_PROBE_TOKENS = 8


def mlp_in_hook(layer: int) -> str:
    """The hook SAELens's ``HookedSAETransformer`` adds in front of each MLP."""
    return f"blocks.{layer}.mlp.hook_in"


def mlp_out_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def hook_layer(hook_name: str, field: str = "hook_name") -> int:
    layer = extract_layer_from_tlens_hook_name(hook_name)
    if layer is None:
        raise ValueError(
            f"{field}={hook_name!r} is not a per-layer TransformerLens hook "
            "(expected e.g. 'blocks.3.mlp.hook_in')."
        )
    return layer


def ensure_mlp_hook_in(model: HookedTransformer) -> None:
    """Give every MLP of a plain ``HookedTransformer`` the ``mlp.hook_in`` hook point.

    SAELens adds it only in ``HookedSAETransformer``; we reuse its helper so both
    model classes expose the same exact-input hook.
    """
    added = False
    for block in model.blocks:
        if not hasattr(block.mlp, "hook_in"):
            add_hook_in_to_mlp(block.mlp)
            added = True
    if added:
        model.setup()


def residual_mlp_in_hook(layer: int) -> str:
    """The residual stream before the MLP's norm (SAELens's hook for Gemma Scope 2 transcoders)."""
    return f"blocks.{layer}.hook_mlp_in"


# Hugging Face module outputs that releases name as their input, and the TransformerLens
# hook carrying the same tensor. SAELens maps Gemma Scope 2's transcoders, whose config reads
# ``pre_feedforward_layernorm.output`` (the MLP's normed input), to ``hook_mlp_in``, the
# residual *before* that norm; ``mlp.hook_in`` is what they were trained on.
_HF_INPUT_HOOKS = {re.compile(r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.output"): "blocks.{}.mlp.hook_in"}


def released_input_hook(metadata: Any) -> str | None:
    """The TransformerLens hook a loaded transcoder really reads: ``metadata.hook_name``, unless
    its release names (``hf_hook_name``) a Hugging Face tensor that another hook carries."""
    hook_name, hf_hook_name = metadata.hook_name, getattr(metadata, "hf_hook_name", None)
    for pattern, template in _HF_INPUT_HOOKS.items():
        match = pattern.fullmatch(hf_hook_name or "")
        if match and hook_name != template.format(match.group(1)):
            corrected = template.format(match.group(1))
            logger.warning(
                "%s: the release reads %s (the MLP's normed input), which is %s, not SAELens's "
                "hook_name=%s (the residual before the norm); using %s.",
                getattr(metadata, "sae_lens_id", None) or hook_name, hf_hook_name, corrected, hook_name, corrected,
            )
            return corrected
    return hook_name


def ensure_input_hooks(model: HookedTransformer, hook_names: Iterable[str]) -> None:
    """Make every hook in ``hook_names`` fire: ``mlp.hook_in`` (see ``ensure_mlp_hook_in``)
    and ``hook_mlp_in``, which TransformerLens only runs with ``use_hook_mlp_in`` on."""
    ensure_mlp_hook_in(model)
    if any(name.endswith(".hook_mlp_in") for name in hook_names) and not model.cfg.use_hook_mlp_in:
        model.set_use_hook_mlp_in(True)


def chosen_input_hook(model: HookedTransformer, layer: int, mlp_input_hook: str = "exact") -> str:
    """The input hook a config's ``sae.mlp_input_hook`` picks for MLP ``layer``."""
    return residual_mlp_in_hook(layer) if mlp_input_hook == "hook_mlp_in" else default_input_hook(model, layer)


def default_input_hook(model: HookedTransformer, layer: int) -> str:
    """``ln2.hook_normalized`` when the norm has no affine part left (the paper's
    choice, with ``fold_ln``), else the MLP's own input hook."""
    ln2 = getattr(model.blocks[layer], "ln2", None)
    if isinstance(ln2, (LayerNormPre, RMSNormPre)):
        return f"blocks.{layer}.ln2.hook_normalized"
    return mlp_in_hook(layer)


def probe_tokens(model: HookedTransformer) -> torch.Tensor:
    """A few fixed random tokens of ``model``'s vocabulary, on its device."""
    n = min(N_PROBE_TOKENS, model.cfg.n_ctx, model.cfg.d_vocab)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, n), generator=generator)
    return tokens.to(model.cfg.device)


@torch.no_grad()
def probe_hooks(
    model: HookedRootModule, hook_names: list[str], tokens: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Activations of ``hook_names`` on ``tokens``, by default a few random tokens of a
    HookedTransformer (missing = never fired)."""
    stops = [extract_layer_from_tlens_hook_name(h) for h in hook_names]
    stop = None if any(s is None for s in stops) else max(s for s in stops if s is not None) + 1
    if tokens is None:
        assert isinstance(model, HookedTransformer)
        tokens = probe_tokens(model)
    _, cache = model.run_with_cache(
        tokens, names_filter=list(hook_names), stop_at_layer=stop
    )
    present = dict(cache.items())  # an ActivationCache from TransformerLens, a dict from SAELens's proxy
    return {name: present[name] for name in hook_names if name in present}


def validate_transcoder_hooks(
    model: HookedTransformer,
    hook_name: str,
    hook_name_out: str,
    d_in: int,
    d_out: int,
    allow_inexact_mlp_input: bool = False,
) -> None:
    """Fail before training when the hooks are not the MLP's input/output or the widths differ."""
    layer = hook_layer(hook_name)
    ensure_input_hooks(model, [hook_name])
    exact = mlp_in_hook(layer)
    acts = probe_hooks(model, [hook_name, hook_name_out, exact])
    right_hook = default_input_hook(model, layer)
    if hook_name not in acts:
        raise ValueError(
            f"hook_name={hook_name!r} never fires on this model. The MLP of layer "
            f"{layer} reads {right_hook!r}: use that as hook_name."
        )
    if hook_name_out not in acts:
        raise ValueError(
            f"sae.hook_name_out={hook_name_out!r} never fires on this model; the MLP of "
            f"layer {layer} writes {mlp_out_hook(layer)!r}."
        )
    x, y = acts[hook_name], acts[hook_name_out]
    if x.shape[-1] != d_in or x.ndim != 3:
        raise ValueError(
            f"sae.d_in={d_in} but hook_name={hook_name!r} has width "
            f"{tuple(x.shape[2:])}: set sae.d_in: {x.shape[-1]}."
        )
    if y.shape[-1] != d_out or y.ndim != 3:
        raise ValueError(
            f"sae.d_out={d_out} but sae.hook_name_out={hook_name_out!r} has width "
            f"{tuple(y.shape[2:])}: set sae.d_out: {y.shape[-1]}."
        )
    for name, value in ((hook_name, x), (hook_name_out, y)):
        if not torch.isfinite(value).all():
            raise ValueError(
                f"the model's activations at {name!r} are not finite (NaN/inf) on a probe "
                "batch; a transcoder cannot be trained on them. Check the model's weights and dtype."
            )
    mlp_input = acts[exact]
    is_exact = mlp_input.shape == x.shape and torch.allclose(x, mlp_input, rtol=1e-5, atol=1e-6)
    if is_exact:
        return
    if hook_name == residual_mlp_in_hook(layer):
        logger.info(
            "Training on %s, the residual stream before MLP %d's norm (the hook SAELens gives Gemma Scope 2): "
            "the transcoder does the norm's job as well as the MLP's.",
            hook_name,
            layer,
        )
        return
    if not allow_inexact_mlp_input:
        raise ValueError(
            f"hook_name={hook_name!r} is not what the MLP of layer {layer} reads "
            f"(e.g. ln2.hook_normalized before an unfolded norm's weight and bias, or "
            f"hook_mlp_in before the norm). Use hook_name={right_hook!r}, or set "
            "sae.allow_inexact_mlp_input: true to train on this input anyway."
        )
    logger.warning(
        "Training a transcoder on %s, which is NOT the exact input of MLP %d (%s). "
        "Spliced evaluations still replace the MLP output.",
        hook_name,
        layer,
        right_hook,
    )
