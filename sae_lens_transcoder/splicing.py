"""Put transcoders in place of MLPs inside a ``HookedTransformer``.

Every evaluation, the training evaluator and the circuit tools go through these
context managers, so "spliced" means one thing everywhere. They only add
TransformerLens hooks, which ``model.hooks`` removes on exit, also after an error.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from sae_lens.saes.sae import SAE
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from sae_lens_transcoder.hooks import ensure_mlp_hook_in, hook_layer, mlp_out_hook


@dataclass
class Splice:
    """A transcoder and the two hooks it connects.

    ``input_scale`` is the training-time activation scaler (inputs and outputs share one
    scalar, which saving folds into the weights); it is 1 for saved transcoders.
    ``feature_mask`` keeps only chosen features (partial replacement).
    """

    transcoder: SAE  # type: ignore[type-arg]
    hook_name: str
    hook_name_out: str
    input_scale: float = 1.0
    feature_mask: torch.Tensor | None = None
    last_feature_acts: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_sae(cls, sae: SAE, input_scale: float = 1.0) -> "Splice":  # type: ignore[type-arg]
        meta = sae.cfg.metadata
        hook_name = meta.hook_name
        hook_name_out = meta.hook_name_out or getattr(sae.cfg, "hook_name_out", None)
        if hook_name is None:
            raise ValueError("transcoder cfg.metadata.hook_name is missing: cannot splice it.")
        if hook_name_out is None:
            hook_name_out = mlp_out_hook(hook_layer(hook_name, "metadata.hook_name"))
        return cls(sae, hook_name, hook_name_out, input_scale=input_scale)

    @property
    def layer(self) -> int:
        return hook_layer(self.hook_name_out, "hook_name_out")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """MLP output predicted from the MLP input; records the feature activations.

        Uses ``forward`` (not ``decode(encode(x))``) so skip connections are kept;
        the activations come from the SAE's own ``hook_sae_acts_post``.
        """
        tc = self.transcoder
        scaled = x.to(tc.dtype) * self.input_scale
        captured: list[torch.Tensor] = []

        def capture(acts: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # noqa: ARG001
            if self.feature_mask is not None:
                acts = acts * self.feature_mask.to(acts.dtype)
            captured.append(acts)
            return acts

        with tc.hooks(fwd_hooks=[("hook_sae_acts_post", capture)]):
            out = tc(scaled)
        self.last_feature_acts = captured[0]
        return (out / self.input_scale).to(x.dtype)


def as_splices(transcoders: Sequence["SAE | Splice"]) -> list[Splice]:  # type: ignore[type-arg]
    return [t if isinstance(t, Splice) else Splice.from_sae(t) for t in transcoders]


HookFn = Callable[[torch.Tensor, HookPoint], torch.Tensor | None]


def splice_hooks(
    splices: Sequence[Splice], use_error_term: bool = False
) -> list[tuple[str, HookFn]]:
    """Hooks that read each splice's input and overwrite its output hook.

    With ``use_error_term`` the output is the transcoder's plus (real − transcoder),
    so the model's outputs are unchanged while feature activations stay attributable.
    """
    hooks: list[tuple[str, HookFn]] = []
    for splice in splices:
        inputs: dict[str, torch.Tensor] = {}

        def read(x: torch.Tensor, hook: HookPoint, inputs=inputs) -> None:  # noqa: ARG001
            inputs["x"] = x

        def write(y: torch.Tensor, hook: HookPoint, splice=splice, inputs=inputs) -> torch.Tensor:  # noqa: ARG001
            y_hat = splice(inputs.pop("x"))
            if use_error_term:
                return y_hat + (y - y_hat).detach()
            return y_hat

        hooks += [(splice.hook_name, read), (splice.hook_name_out, write)]
    return hooks


@contextmanager
def spliced(
    model: HookedTransformer,
    transcoders: Sequence["SAE | Splice"],  # type: ignore[type-arg]
    use_error_term: bool = False,
) -> Iterator[list[Splice]]:
    """Replace the MLPs the transcoders were trained on, all at once."""
    splices = as_splices(transcoders)
    ensure_mlp_hook_in(model)
    with model.hooks(fwd_hooks=splice_hooks(splices, use_error_term)):
        yield splices


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
    transcoders: Sequence["SAE | Splice"],  # type: ignore[type-arg]
    features: Sequence[tuple[int, int, int]],
) -> Iterator[list[Splice]]:
    """Remove the writes of chosen features, given as ``(layer, token position, feature)``,
    from the real MLP outputs; everything else (other features, the error term) is kept,
    so only those features' effect is taken out."""
    splices = {s.layer: s for s in as_splices(transcoders)}
    chosen: dict[int, list[tuple[int, int]]] = {}
    for layer, pos, feature in features:
        if layer not in splices:
            raise ValueError(f"feature ({layer}, {pos}, {feature}): no transcoder given for layer {layer}.")
        chosen.setdefault(layer, []).append((pos, feature))
    hooks: list[tuple[str, HookFn]] = []
    for layer, picks in chosen.items():
        splice = splices[layer]
        inputs: dict[str, torch.Tensor] = {}

        def read(x: torch.Tensor, hook: HookPoint, inputs=inputs) -> None:  # noqa: ARG001
            inputs["x"] = x

        def remove(y: torch.Tensor, hook: HookPoint, splice=splice, picks=picks, inputs=inputs) -> torch.Tensor:  # noqa: ARG001
            splice(inputs.pop("x"))
            acts = splice.last_feature_acts
            assert acts is not None
            mask = torch.zeros_like(acts)
            for pos, feature in picks:
                mask[:, pos, feature] = 1.0
            decoder = splice.transcoder.W_dec / splice.input_scale
            return y - ((acts * mask) @ decoder).to(y.dtype)

        hooks += [(splice.hook_name, read), (splice.hook_name_out, remove)]
    ensure_mlp_hook_in(model)
    with model.hooks(fwd_hooks=hooks):
        yield list(splices.values())
