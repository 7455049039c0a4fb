"""One transcoder per replaced MLP: SAELens transcoders of any class as a replacement set."""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from sae_lens.saes.sae import SAE

from sae_lens_transcoder.hooks import hook_layer, mlp_out_hook, released_input_hook
from sae_lens_transcoder.replacement.base import ReplacementSet
from sae_lens_transcoder.replacement.folding import ModelUnits, fold
from sae_lens_transcoder.saes.mixin import TranscoderMixin

_CHECK_RTOL = 1e-3
_N_PROBE = 4


@dataclass
class Splice:
    """A transcoder, the two hooks it connects, and how it was trained.

    ``input_scale`` is the training-time activation scaler (inputs and outputs share one
    scalar, which saving folds into the weights); it is 1 for saved transcoders.
    ``feature_mask`` keeps only chosen features (partial replacement);
    ``last_feature_acts`` are the activations of the latest spliced run. A training
    transcoder is replaced by the inference transcoder it saves as (its TopK decoder norms
    folded, a BatchTopK one's running threshold as JumpReLU threshold), so a splice always
    computes what the saved file will.
    """

    transcoder: SAE  # type: ignore[type-arg]
    hook_name: str
    hook_name_out: str
    input_scale: float = 1.0
    feature_mask: torch.Tensor | None = None
    last_feature_acts: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.transcoder, TranscoderMixin):
            self.transcoder = self.transcoder.to_inference()

    @classmethod
    def from_sae(cls, sae: SAE, input_scale: float = 1.0) -> "Splice":  # type: ignore[type-arg]
        meta = sae.cfg.metadata
        hook_name = released_input_hook(meta)
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
        """MLP output predicted from the MLP input (skip included); records the activations."""
        replacement = PerLayerTranscoders([self])
        self.last_feature_acts = replacement.encode(self.layer, x)
        return replacement.reconstruct(self.layer, {self.layer: self.last_feature_acts}, x).to(x.dtype)


def as_splices(transcoders: Sequence["SAE | Splice"]) -> list[Splice]:  # type: ignore[type-arg]
    return [t if isinstance(t, Splice) else Splice.from_sae(t) for t in transcoders]


class PerLayerTranscoders(ReplacementSet):
    """SAELens transcoders (``Transcoder``, ``SkipTranscoder``, ``JumpReLU*``, ``TrainingTranscoder``,
    ...), one per replaced MLP output; each layer's features write only at that layer.

    ``input_scale`` is the training-time scale of bare SAEs; a :class:`Splice` carries its own
    (giving both would fold it twice, so that is refused). Activations come from SAELens's own
    ``encode`` (every activation function stays SAELens's); the output is rebuilt from the
    folded decoder, and each transcoder is checked once on a probe input to compute exactly
    that, so a class that is not ``acts @ W_dec + b_dec (+ skip)`` fails here.
    """

    def __init__(self, transcoders: Sequence["SAE | Splice"], input_scale: float = 1.0) -> None:  # type: ignore[type-arg]
        self.splices: dict[int, Splice] = {}
        for splice in as_splices(transcoders):
            if input_scale != 1.0:
                if splice.input_scale != 1.0:
                    raise ValueError(
                        f"layer {splice.layer}: the Splice has input_scale={splice.input_scale} and the set "
                        f"input_scale={input_scale}; give the scale once."
                    )
                splice = Splice(splice.transcoder, splice.hook_name, splice.hook_name_out, input_scale, splice.feature_mask)
            if splice.layer in self.splices:
                raise ValueError(f"two transcoders replace MLP {splice.layer}: pass one per layer.")
            self.splices[splice.layer] = splice
        self._folded: dict[int, ModelUnits] = {}
        for layer in self.splices:
            self._check_decomposes(layer)

    # ------------------------------------------------------------------ layout

    @property
    def layers(self) -> list[int]:
        return list(self.splices)

    def hook_in(self, layer: int) -> str:
        return self._splice(layer).hook_name

    def hook_out(self, layer: int) -> str:
        return self._splice(layer).hook_name_out

    def d_sae(self, layer: int) -> int:
        return int(self._splice(layer).transcoder.cfg.d_sae)

    def d_in(self, layer: int) -> int:
        return int(self.transcoder(layer).W_enc.shape[0])

    def d_out(self, layer: int) -> int:
        return int(self.folded(layer).b_dec.shape[0])

    def sources(self, layer: int) -> list[int]:
        self._splice(layer)
        return [layer]

    def transcoder(self, layer: int) -> SAE:  # type: ignore[type-arg]
        """The SAELens object of ``layer`` (in its training units)."""
        return self._splice(layer).transcoder

    def input_scale(self, layer: int) -> float:
        return float(self._splice(layer).input_scale)

    # ------------------------------------------------------------------ model units

    def folded(self, layer: int) -> ModelUnits:
        """Layer ``layer``'s transcoder with its input scale folded in (computed once)."""
        if layer not in self._folded:
            splice = self._splice(layer)
            self._folded[layer] = fold(splice.transcoder, float(splice.input_scale))
        return self._folded[layer]

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        splice = self._splice(layer)
        sae = splice.transcoder
        acts = sae.encode(x.to(sae.dtype) * splice.input_scale)
        if splice.feature_mask is not None:
            acts = acts * splice.feature_mask.to(acts.dtype)
        return acts

    def encoder(self, layer: int) -> torch.Tensor:
        W_enc = self.folded(layer).W_enc
        if W_enc is None:
            sae = self.transcoder(layer)
            raise ValueError(
                f"layer {layer}: normalize_activations={sae.cfg.normalize_activations!r} is not a linear map, so "
                "the transcoder's features are not affine in its input: circuits need 'none' or "
                "'expected_average_only_in'."
            )
        return W_enc

    def b_enc(self, layer: int) -> torch.Tensor:
        return self.folded(layer).b_enc

    def decoder(self, source: int, layer: int) -> torch.Tensor:
        if source != layer:
            raise KeyError(f"per-layer transcoders: layer {source}'s features write only at layer {source}, not {layer}.")
        return self.folded(layer).W_dec

    def b_dec(self, layer: int) -> torch.Tensor:
        return self.folded(layer).b_dec

    def skip(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        W_skip = self.folded(layer).W_skip
        return None if W_skip is None else x.to(W_skip.dtype) @ W_skip.T

    # ------------------------------------------------------------------ helpers

    def _splice(self, layer: int) -> Splice:
        if layer not in self.splices:
            raise KeyError(f"no transcoder replaces MLP {layer} (have {self.layers}).")
        return self.splices[layer]

    def _check_decomposes(self, layer: int) -> None:
        splice = self._splice(layer)
        sae = splice.transcoder
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(_N_PROBE, sae.cfg.d_in, generator=generator).to(device=sae.device, dtype=sae.dtype)
        with torch.no_grad():
            expected = sae(x * splice.input_scale) / splice.input_scale
            mask, splice.feature_mask = splice.feature_mask, None
            try:
                actual = self.reconstruct(layer, {layer: self.encode(layer, x)}, x)
            finally:
                splice.feature_mask = mask
        if not (actual - expected).norm() <= _CHECK_RTOL * expected.norm() + 1e-5:
            raise ValueError(
                f"transcoder of layer {layer} ({type(sae).__name__}) is not features @ W_dec + b_dec (+ skip): "
                "it cannot be used as a replacement set."
            )


def as_replacement_set(transcoders: "ReplacementSet | Sequence[SAE | Splice]") -> ReplacementSet:  # type: ignore[type-arg]
    """The set itself (per-layer or cross-layer), or SAEs / Splices as a per-layer set."""
    return transcoders if isinstance(transcoders, ReplacementSet) else PerLayerTranscoders(transcoders)
