"""One prompt's forward pass, kept in the form the frozen (linearised) model needs.

With attention patterns and norm scales fixed at their values on the prompt, the residual
stream at any point is an exact sum of terms (embeddings, per-head per-source attention
outputs, transcoder features, transcoder biases, skips, error terms), and everything that
reads it is affine. ``trace_prompt`` records those terms and checks that they really do
add up, so an unsupported architecture fails loudly instead of giving wrong attributions.
Transcoders are seen only through their replacement set: features are recorded by the
layer they read at, decoders by (feature source, output layer).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from sae_lens.saes.sae import SAE
from transformer_lens import ActivationCache, HookedTransformer
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from sae_lens_transcoder.circuits.norms import FrozenNorm, frozen_norm
from sae_lens_transcoder.hooks import ensure_input_hooks, mlp_out_hook
from sae_lens_transcoder.replacement import PerLayerTranscoders, ReplacementSet, Splice, as_replacement_set
from sae_lens_transcoder.validation import check_replacement_fits_model

SITE_KINDS = ("attn", "mlp", "final")
_CHECK_RTOL = 1e-3


@dataclass(frozen=True, order=True)
class Site:
    """A place where the residual stream is read: layer ``layer``'s attention or MLP input,
    or the unembedding (``kind="final"``, ``layer=n_layers``)."""

    layer: int
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"Site kind {self.kind!r} is not one of {SITE_KINDS}")


def final_norm(model: HookedTransformer) -> FrozenNorm:
    """The unembedding's norm (absent when ``normalization_type`` is None)."""
    if not hasattr(model, "ln_final"):
        return FrozenNorm(scale_hook=None)
    return frozen_norm(model.ln_final, "ln_final.hook_scale", full_output=True)


def attn_output_norm(model: HookedTransformer, layer: int) -> FrozenNorm:
    """Gemma 2/3's post-attention norm (the identity elsewhere): what turns the heads' summed
    output into the ``hook_attn_out`` that is added to the residual stream."""
    block = model.blocks[layer]
    if not model.cfg.use_normalization_before_and_after or not hasattr(block, "ln1_post"):
        return FrozenNorm(scale_hook=None)
    return frozen_norm(block.ln1_post, f"blocks.{layer}.ln1_post.hook_scale", full_output=True)


def check_supported_architecture(model: HookedTransformer) -> None:
    """Refuse block layouts whose residual stream is not "pre-norm attention + MLP", naming why."""
    cfg = model.cfg
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        raise ValueError(
            f"{cfg.original_architecture} normalises attention and MLP outputs with the block's ln1/ln2 after "
            "the residual read (a post-norm block): circuits support pre-norm blocks (GPT-2, NeoX, Llama, "
            "Qwen2/3, Mistral, Gemma 1/2/3) only."
        )
    if cfg.attn_only:
        raise ValueError("circuits need MLPs to replace: this model is attention-only (attn_only=True).")
    if cfg.positional_embedding_type == "shortformer":
        raise ValueError("circuits do not support shortformer positional embeddings (added to queries/keys only).")


def transcoder_input_norm(model: HookedTransformer, name: str, layer: int) -> FrozenNorm:
    """How features reading hook ``name`` of MLP ``layer`` read the residual stream."""
    ln2 = model.blocks[layer].ln2
    scale_hook = f"blocks.{layer}.ln2.hook_scale"
    if name == f"blocks.{layer}.ln2.hook_normalized":
        return frozen_norm(ln2, scale_hook, full_output=False)
    if name == f"blocks.{layer}.mlp.hook_in":
        return frozen_norm(ln2, scale_hook, full_output=True)
    if name == f"blocks.{layer}.hook_mlp_in":
        return FrozenNorm(scale_hook=None)
    raise ValueError(
        f"transcoder hook_name={name!r}: circuits need a transcoder that reads layer {layer}'s MLP input "
        f"(blocks.{layer}.ln2.hook_normalized, blocks.{layer}.mlp.hook_in or blocks.{layer}.hook_mlp_in)."
    )


@dataclass
class Trace:
    """Everything one prompt's attribution needs; tensors drop the batch dimension."""

    model: HookedTransformer
    tokens: torch.Tensor
    cache: ActivationCache
    replacement: ReplacementSet
    logits: torch.Tensor  # [pos, d_vocab]
    attn_in: dict[int, torch.Tensor] = field(default_factory=dict)  # [pos, d_model]
    values: dict[int, torch.Tensor] = field(default_factory=dict)  # [pos, n_heads, d_head]
    # By the layer the features read at (their source):
    feature_acts: dict[int, torch.Tensor] = field(default_factory=dict)  # [pos, d_sae]
    encoders: dict[int, torch.Tensor] = field(default_factory=dict)  # [d_in, d_sae]
    input_norms: dict[int, FrozenNorm] = field(default_factory=dict)
    # By (source layer, output layer): what source's features write into that MLP output.
    decoders: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # [d_sae, d_model]
    # By the replaced MLP output:
    transcoder_bias: dict[int, torch.Tensor] = field(default_factory=dict)  # [d_model]
    skips: dict[int, torch.Tensor] = field(default_factory=dict)  # [pos, d_model]
    errors: dict[int, torch.Tensor] = field(default_factory=dict)  # [pos, d_model]
    value_weights: dict[int, torch.Tensor] = field(default_factory=dict)  # [n_heads, d_model, d_head]

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def splices(self) -> dict[int, Splice]:
        """The per-layer transcoders by layer (only a per-layer set has them)."""
        if not isinstance(self.replacement, PerLayerTranscoders):
            raise TypeError(f"{type(self.replacement).__name__} is not a per-layer set: use trace.replacement.")
        return self.replacement.splices

    @property
    def d_sae_by_layer(self) -> dict[int, int]:
        """How many features read at each replaced layer."""
        return {layer: self.replacement.d_sae(layer) for layer in self.replacement.layers}

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def parallel(self) -> bool:
        return bool(self.model.cfg.parallel_attn_mlp)

    def str_tokens(self) -> list[str]:
        """The prompt's tokens as strings (ids as text for models without a tokenizer)."""
        if self.model.tokenizer is None:
            return [f"<{t}>" for t in self.tokens.tolist()]
        return [str(t) for t in self.model.to_str_tokens(self.tokens)]

    def get(self, name: str) -> torch.Tensor:
        return self.cache[name][0]

    def residual(self, site: Site) -> torch.Tensor:
        """The residual stream that ``site`` reads, ``[pos, d_model]``."""
        if site.kind == "final":
            return self.get(f"blocks.{self.n_layers - 1}.hook_resid_post")
        if site.kind == "mlp" and not self.parallel:
            return self.get(f"blocks.{site.layer}.hook_resid_mid")
        return self.get(f"blocks.{site.layer}.hook_resid_pre")

    def scale(self, norm: FrozenNorm, pos: int) -> torch.Tensor | float:
        return 1.0 if norm.scale_hook is None else self.get(norm.scale_hook)[pos, 0]

    def writes_before(self, site: Site) -> tuple[range, range]:
        """(attention layers, MLP layers) whose outputs are in the residual ``site`` reads."""
        if site.kind == "final":
            return range(self.n_layers), range(self.n_layers)
        attn_end = site.layer + 1 if site.kind == "mlp" and not self.parallel else site.layer
        return range(attn_end), range(site.layer)

    def outputs_read_by(self, source: int, site: Site) -> list[int]:
        """The MLP outputs that layer ``source``'s features write into and ``site`` reads."""
        _, mlp_layers = self.writes_before(site)
        return [out for src, out in self.decoders if src == source and out in mlp_layers]

    def attn_norm(self, layer: int) -> FrozenNorm:
        return frozen_norm(self.model.blocks[layer].ln1, f"blocks.{layer}.ln1.hook_scale", full_output=True)

    def attn_output_norm(self, layer: int) -> FrozenNorm:
        return attn_output_norm(self.model, layer)

    def read_attn_output(self, layer: int, direction: torch.Tensor, pos: int | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(direction on the heads' summed output, constant) that ``direction`` reads of attention
        ``layer``'s write at token(s) ``pos``, through the frozen post-attention norm if any."""
        norm = self.attn_output_norm(layer)
        if norm.scale_hook is None:
            return direction, direction.new_zeros(direction.shape[:-1])
        pulled, constant = norm.pull_back(direction, self.get(norm.scale_hook)[pos])
        return pulled, constant.expand(direction.shape[:-1])

    def final_norm(self) -> FrozenNorm:
        return final_norm(self.model)

    def pattern(self, layer: int) -> torch.Tensor:
        return self.get(f"blocks.{layer}.attn.hook_pattern")  # [n_heads, dest, src]

    def mlp_out(self, layer: int) -> torch.Tensor:
        return self.get(mlp_out_hook(layer))


def _cached_names(model: HookedTransformer, replacement: ReplacementSet) -> set[str]:
    names = {"hook_embed", "hook_pos_embed", "ln_final.hook_scale"}
    for layer in range(model.cfg.n_layers):
        block = f"blocks.{layer}"
        names |= {f"{block}.{h}" for h in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")}
        names |= {f"{block}.{norm}.hook_scale" for norm in ("ln1", "ln2", "ln1_post", "ln2_post")}
        names.add(f"{block}.attn.hook_pattern")
    return names | {replacement.hook_in(layer) for layer in replacement.layers}


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool((actual - expected).norm() <= _CHECK_RTOL * expected.norm() + 1e-5)


def trace_prompt(
    model: HookedTransformer,
    transcoders: ReplacementSet | Sequence["SAE | Splice"],  # type: ignore[type-arg]
    tokens: str | torch.Tensor,
) -> Trace:
    """Run ``tokens`` (a string or 1-D ids) and record the frozen model's terms."""
    replacement = transcoders if isinstance(transcoders, ReplacementSet) else as_replacement_set(transcoders)
    check_supported_architecture(model)
    if isinstance(tokens, str):
        tokens = model.to_tokens(tokens, truncate=False)[0]  # not cut to n_ctx: checked below
    tokens = tokens.to(model.cfg.device)
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be one prompt (1-D), got shape {tuple(tokens.shape)}")
    if tokens.shape[0] > model.cfg.n_ctx:
        raise ValueError(
            f"the prompt is {tokens.shape[0]} tokens, longer than the model's context "
            f"(n_ctx={model.cfg.n_ctx}): shorten it."
        )
    for layer in replacement.layers:
        if replacement.hook_out(layer) != mlp_out_hook(layer):
            raise ValueError(f"transcoder hook_name_out={replacement.hook_out(layer)!r}: circuits need {mlp_out_hook(layer)!r}.")
    ensure_input_hooks(model, [replacement.hook_in(layer) for layer in replacement.layers])
    check_replacement_fits_model(model, replacement)
    names = _cached_names(model, replacement)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names)
    trace = Trace(model=model, tokens=tokens, cache=cache, replacement=replacement, logits=logits[0])
    with torch.no_grad():
        _record_attention(trace)
        _record_transcoders(trace)
    _check_residual_sums(trace)
    return trace


def _record_attention(trace: Trace) -> None:
    for layer in range(trace.n_layers):
        attn = trace.model.blocks[layer].attn
        norm = trace.attn_norm(layer)
        resid = trace.get(f"blocks.{layer}.hook_resid_pre")
        scale = trace.get(norm.scale_hook) if norm.scale_hook else 1.0
        attn_in = norm.apply(resid, scale)
        # Grouped-query attention expands W_V on every access: keep the expanded copy.
        trace.value_weights[layer] = attn.W_V.detach()
        values = torch.einsum("sd,hdk->shk", attn_in, trace.value_weights[layer]) + attn.b_V
        trace.attn_in[layer], trace.values[layer] = attn_in, values
        heads_out = torch.einsum("hts,shk,hkd->td", trace.pattern(layer), values, attn.W_O) + attn.b_O
        post = trace.attn_output_norm(layer)
        if post.scale_hook is not None:
            heads_out = post.apply(heads_out, trace.get(post.scale_hook))
        if not _close(heads_out, trace.get(f"blocks.{layer}.hook_attn_out")):
            raise ValueError(
                f"layer {layer}'s attention output is not the sum of its heads' OV outputs under the cached "
                f"pattern ({trace.model.cfg.original_architecture}): this architecture is not supported by circuits."
            )


def _record_transcoders(trace: Trace) -> None:
    """Features by the layer they read at; decoders, biases, skips and errors by the output."""
    rs = trace.replacement
    inputs = {layer: trace.get(rs.hook_in(layer)) for layer in rs.layers}
    for layer, x in inputs.items():
        trace.feature_acts[layer] = rs.encode(layer, x).to(x.dtype)
        trace.encoders[layer] = rs.encoder(layer).to(x.dtype)
        trace.input_norms[layer] = transcoder_input_norm(trace.model, rs.hook_in(layer), layer)
    for layer, x in inputs.items():
        for source in rs.sources(layer):
            trace.decoders[source, layer] = rs.decoder(source, layer).to(x.dtype)
        trace.transcoder_bias[layer] = rs.b_dec(layer).to(x.dtype)
        skip = rs.skip(layer, x)
        if skip is not None:
            trace.skips[layer] = skip.to(x.dtype)
        trace.errors[layer] = rs.error(layer, trace.mlp_out(layer), trace.feature_acts, x)


def _check_residual_sums(trace: Trace) -> None:
    total = trace.get("hook_embed").clone()
    if "hook_pos_embed" in trace.cache.cache_dict:
        total = total + trace.get("hook_pos_embed")
    for layer in range(trace.n_layers):
        total = total + trace.get(f"blocks.{layer}.hook_attn_out") + trace.mlp_out(layer)
    if not _close(total, trace.residual(Site(trace.n_layers, "final"))):
        raise ValueError(
            "the final residual stream is not embeddings + attention outputs + MLP outputs "
            f"({trace.model.cfg.original_architecture}): this architecture is not supported by circuits."
        )
