"""Put transcoders in place of MLPs inside a ``HookedTransformer``.

Every evaluation, the training evaluator and the circuit tools go through these
context managers, so "spliced" means one thing everywhere. They only add
TransformerLens hooks, which ``model.hooks`` removes on exit, also after an error.
What the transcoders compute comes from the replacement set alone.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from sae_lens.saes.sae import SAE
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from sae_lens_transcoder.hooks import ensure_input_hooks
from sae_lens_transcoder.replacement import PerLayerTranscoders, ReplacementSet, Splice, as_replacement_set, as_splices

__all__ = ["Splice", "ablated", "ablated_features", "as_splices", "keep_only_features", "splice_hooks", "spliced"]

HookFn = Callable[[torch.Tensor, HookPoint], torch.Tensor | None]
Transcoders = ReplacementSet | Sequence[SAE | Splice]  # type: ignore[type-arg]


def _input_readers(
    replacement: ReplacementSet,
    layers: Sequence[int],
    acts: dict[int, torch.Tensor],
    inputs: dict[int, torch.Tensor] | None = None,
) -> list[tuple[str, HookFn]]:
    """Hooks that encode each layer's input as it fires: activations to ``acts``, inputs to ``inputs``."""

    def read(x: torch.Tensor, hook: HookPoint, layer: int) -> None:  # noqa: ARG001
        if inputs is not None:
            inputs[layer] = x
        acts[layer] = replacement.encode(layer, x)

    return [(replacement.hook_in(layer), lambda x, hook, layer=layer: read(x, hook, layer)) for layer in layers]


def splice_hooks(
    replacement: ReplacementSet,
    use_error_term: bool = False,
    record: Callable[[int, torch.Tensor], None] | None = None,
) -> list[tuple[str, HookFn]]:
    """Hooks that read each layer's input and overwrite its output hook with the reconstruction.

    With ``use_error_term`` the output is the reconstruction plus (real − reconstruction),
    so the model's outputs are unchanged while feature activations stay attributable.
    ``record(layer, acts)`` sees each layer's feature activations.
    """
    acts: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}

    def write(y: torch.Tensor, hook: HookPoint, layer: int) -> torch.Tensor:  # noqa: ARG001
        if record is not None:
            record(layer, acts[layer])
        y_hat = replacement.reconstruct(layer, acts, inputs.pop(layer)).to(y.dtype)
        if use_error_term:
            return y_hat + (y - y_hat).detach()
        return y_hat

    writers = [(replacement.hook_out(layer), lambda y, hook, layer=layer: write(y, hook, layer)) for layer in replacement.layers]
    return _input_readers(replacement, replacement.layers, acts, inputs) + writers


@contextmanager
def spliced(
    model: HookedTransformer,
    transcoders: Transcoders,
    use_error_term: bool = False,
) -> Iterator[list[Splice]]:
    """Replace the MLPs the transcoders were trained on, all at once; each Splice's
    ``last_feature_acts`` holds its activations of the latest run."""
    replacement = as_replacement_set(transcoders)
    splices = replacement.splices if isinstance(replacement, PerLayerTranscoders) else {}

    def record(layer: int, acts: torch.Tensor) -> None:
        splices[layer].last_feature_acts = acts

    ensure_input_hooks(model, [replacement.hook_in(layer) for layer in replacement.layers])
    with model.hooks(fwd_hooks=splice_hooks(replacement, use_error_term, record if splices else None)):
        yield list(splices.values())


@contextmanager
def keep_only_features(
    model: HookedTransformer,
    transcoder: "SAE | Splice",  # type: ignore[type-arg]
    features: Sequence[int] | torch.Tensor,
    use_error_term: bool = False,
) -> Iterator[Splice]:
    """Splice one transcoder with all features but ``features`` zeroed."""
    (splice,) = as_splices([transcoder])
    mask = torch.zeros(splice.transcoder.cfg.d_sae, device=splice.transcoder.device)
    mask[torch.as_tensor(features, dtype=torch.long, device=mask.device)] = 1.0
    previous = splice.feature_mask
    splice.feature_mask = mask
    try:
        with spliced(model, [splice], use_error_term=use_error_term):
            yield splice
    finally:
        splice.feature_mask = previous


@contextmanager
def ablated(
    model: HookedTransformer,
    hook_names_out: Sequence[str],
    means: dict[str, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Zero-ablate the given MLP outputs, or set them to ``means[hook]`` when given."""

    def ablate(y: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        if means is None:
            return torch.zeros_like(y)
        return means[hook.name].to(y.dtype).expand_as(y).clone()  # type: ignore[index]

    with model.hooks(fwd_hooks=[(name, ablate) for name in hook_names_out]):
        yield


@contextmanager
def ablated_features(
    model: HookedTransformer,
    transcoders: Transcoders,
    features: Sequence[tuple[int, int, int]],
) -> Iterator[list[Splice]]:
    """Remove the writes of chosen features, given as ``(layer, token position, feature)``,
    from the real MLP outputs; everything else (other features, the error term) is kept,
    so only those features' effect is taken out. A feature's writes are removed at every
    output it writes to."""
    replacement = as_replacement_set(transcoders)
    chosen: dict[int, list[tuple[int, int]]] = {}
    for layer, pos, feature in features:
        if layer not in replacement.layers:
            raise ValueError(f"feature ({layer}, {pos}, {feature}): no transcoder given for layer {layer}.")
        chosen.setdefault(layer, []).append((pos, feature))
    acts: dict[int, torch.Tensor] = {}

    def remove(y: torch.Tensor, hook: HookPoint, layer: int) -> torch.Tensor:  # noqa: ARG001
        for source in replacement.sources(layer):
            if source not in chosen:
                continue
            mask = torch.zeros_like(acts[source])
            for pos, feature in chosen[source]:
                mask[:, pos, feature] = 1.0
            y = y - ((acts[source] * mask) @ replacement.decoder(source, layer)).to(y.dtype)
        return y

    outputs = [layer for layer in replacement.layers if set(replacement.sources(layer)) & set(chosen)]
    hooks = _input_readers(replacement, sorted(chosen), acts)
    hooks += [(replacement.hook_out(layer), lambda y, hook, layer=layer: remove(y, hook, layer)) for layer in outputs]
    ensure_input_hooks(model, [replacement.hook_in(layer) for layer in replacement.layers])
    with model.hooks(fwd_hooks=hooks):
        yield list(replacement.splices.values()) if isinstance(replacement, PerLayerTranscoders) else []
