"""What every consumer of transcoders may ask of them: the replacement-set interface.

Splicing, evaluations, circuits and exports used to assume "one transcoder = one MLP" and
each recomputed the transcoder in model units. They now see only this interface, which is
shaped like circuit-tracer's attribution components: features read at one input location
(an activation matrix and encoder vectors per input layer) and write, through decoder
vectors addressed by (feature source, output location), at one or more outputs. A
per-layer set writes only at its own layer; a cross-layer transcoder (features read at
layer l write at every l' >= l) is another implementation of the same interface.
"""

import abc
from collections.abc import Mapping

import torch


class ReplacementSet(abc.ABC):
    """Transcoders replacing the MLP outputs of ``layers``, in the model's units.

    Layers are addressed by the output they replace (``hook_out(layer)``); the features that
    read at ``hook_in(layer)`` are "layer ``layer``'s features" (their *source*).
    """

    @property
    @abc.abstractmethod
    def layers(self) -> list[int]:
        """The layers whose MLP output is replaced, in the order they were given."""

    @abc.abstractmethod
    def hook_in(self, layer: int) -> str:
        """The hook layer ``layer``'s features read."""

    @abc.abstractmethod
    def hook_out(self, layer: int) -> str:
        """The hook the reconstruction of layer ``layer`` replaces."""

    @abc.abstractmethod
    def d_sae(self, layer: int) -> int:
        """How many features read at ``hook_in(layer)``."""

    @abc.abstractmethod
    def d_in(self, layer: int) -> int:
        """The width of ``hook_in(layer)``."""

    @abc.abstractmethod
    def d_out(self, layer: int) -> int:
        """The width of ``hook_out(layer)``."""

    @abc.abstractmethod
    def sources(self, layer: int) -> list[int]:
        """The layers whose features write into ``hook_out(layer)``."""

    @abc.abstractmethod
    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Activations ``[..., d_sae(layer)]`` of layer ``layer``'s features on its raw input ``x``."""

    @abc.abstractmethod
    def encoder(self, layer: int) -> torch.Tensor:
        """``[d_in, d_sae]``: pre-activations are ``x @ encoder + b_enc`` for raw inputs ``x``."""

    @abc.abstractmethod
    def b_enc(self, layer: int) -> torch.Tensor:
        """``[d_sae(layer)]``."""

    @abc.abstractmethod
    def decoder(self, source: int, layer: int) -> torch.Tensor:
        """``[d_sae(source), d_out(layer)]``: what ``source``'s features write into ``hook_out(layer)``."""

    @abc.abstractmethod
    def b_dec(self, layer: int) -> torch.Tensor:
        """``[d_out(layer)]``: the constant part of the reconstruction at ``hook_out(layer)``."""

    @abc.abstractmethod
    def skip(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """The skip term at ``hook_out(layer)`` for raw input ``x`` at ``hook_in(layer)``; None without one."""

    # ------------------------------------------------------------------ derived, shared

    def decode(self, layer: int, acts: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """The features' reconstruction at ``hook_out(layer)`` from ``acts[source]`` (no skip)."""
        out = self.b_dec(layer)
        for source in self.sources(layer):
            decoder = self.decoder(source, layer)
            out = out + acts[source].to(decoder.dtype) @ decoder
        return out

    def reconstruct(self, layer: int, acts: Mapping[int, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """What the set writes at ``hook_out(layer)``: ``decode`` plus the skip term."""
        out = self.decode(layer, acts)
        skip = self.skip(layer, x)
        return out if skip is None else out + skip.to(out.dtype)

    def error(self, layer: int, y: torch.Tensor, acts: Mapping[int, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The real output ``y`` at ``hook_out(layer)`` minus the reconstruction."""
        return y - self.reconstruct(layer, acts, x).to(y.dtype)

    @property
    def batch_layout(self) -> list[tuple[str, int]]:
        """The packed training batch: ``(hook name, width)`` in order along the last dimension,
        each layer's input hook followed by its output hook, layers in order."""
        pairs = [
            entry
            for layer in self.layers
            for entry in ((self.hook_in(layer), self.d_in(layer)), (self.hook_out(layer), self.d_out(layer)))
        ]
        return list(dict.fromkeys(pairs))

    def split_batch(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        """A packed batch ``[..., sum of widths]`` as one tensor per hook of ``batch_layout``."""
        layout = self.batch_layout
        widths = [width for _, width in layout]
        if packed.shape[-1] != sum(widths):
            raise ValueError(f"packed batch has width {packed.shape[-1]}; the layout {layout} needs {sum(widths)}.")
        return {name: part for (name, _), part in zip(layout, packed.split(widths, dim=-1))}

    def pair_columns(self, layer: int) -> slice:
        """The columns of a packed batch holding ``[input | output]`` of ``layer`` (a view, no copy)."""
        start, offsets = 0, {}
        for name, width in self.batch_layout:
            offsets[name] = (start, start + width)
            start += width
        (in_start, in_stop), (out_start, out_stop) = offsets[self.hook_in(layer)], offsets[self.hook_out(layer)]
        if out_start != in_stop:
            raise ValueError(f"layer {layer}'s input and output are not side by side in the batch layout.")
        return slice(in_start, out_stop)
