"""A cross-layer transcoder as a replacement set: layer ``l``'s features read ``hook_in(l)`` and
write into ``hook_out(l')`` of every covered layer ``l' >= l``.

Everything downstream (splicing, evaluation, circuits, graph export) already addresses decoders
by (feature source, output layer), so this class is all a CLT needs to be traced and evaluated.
"""

from collections.abc import Mapping, Sequence

import torch

from sae_lens_transcoder.hooks import hook_layer
from sae_lens_transcoder.replacement.base import ReplacementSet
from sae_lens_transcoder.saes.clt import TrainingCrossLayerTranscoder

CLT_HOOKS_KEY = "clt_hooks"  # metadata: the covered MLPs' [input hook, output hook], in layer order


class CrossLayerTranscoders(ReplacementSet):
    """A :class:`TrainingCrossLayerTranscoder` and the (input, output) hooks of the MLPs it covers,
    in layer order. ``input_scale`` is a training-time activation scale (1 for saved CLTs)."""

    def __init__(self, clt: TrainingCrossLayerTranscoder, hooks: Sequence[tuple[str, str]], input_scale: float = 1.0) -> None:
        if len(hooks) != clt.n_layers:
            raise ValueError(f"the CLT covers {clt.n_layers} layers; {len(hooks)} (input, output) hook pairs were given.")
        self.clt = clt
        self.input_scale = float(input_scale)
        self._layers = [hook_layer(out, "hook_name_out") for _, out in hooks]
        if self._layers != sorted(set(self._layers)):
            raise ValueError(f"a CLT's layers must increase: its output hooks are at layers {self._layers}.")
        self._hooks = {layer: pair for layer, pair in zip(self._layers, hooks)}
        self._index = {layer: i for i, layer in enumerate(self._layers)}

    @property
    def layers(self) -> list[int]:
        return list(self._layers)

    def hook_in(self, layer: int) -> str:
        return self._hooks[self._layer(layer)][0]

    def hook_out(self, layer: int) -> str:
        return self._hooks[self._layer(layer)][1]

    def d_sae(self, layer: int) -> int:
        self._layer(layer)
        return int(self.clt.cfg.d_sae)

    def d_in(self, layer: int) -> int:
        self._layer(layer)
        return int(self.clt.cfg.d_in)

    def d_out(self, layer: int) -> int:
        self._layer(layer)
        return int(self.clt.b_dec.shape[-1])

    def sources(self, layer: int) -> list[int]:
        return self._layers[: self._index[self._layer(layer)] + 1]

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        i = self._index[self._layer(layer)]
        clt = self.clt
        hidden_pre = (x.to(clt.dtype) * self.input_scale) @ clt.W_enc[i] + clt.b_enc[i]
        if clt.cfg.activation in ("jumprelu", "batchtopk"):  # BatchTopK infers at its running cut
            return hidden_pre * (hidden_pre > clt.threshold[i])
        if clt.cfg.activation == "topk":
            return clt.topk(hidden_pre)
        return hidden_pre.relu()

    def encoder(self, layer: int) -> torch.Tensor:
        encoder = self.clt.W_enc[self._index[self._layer(layer)]]
        return encoder if self.input_scale == 1 else encoder * self.input_scale

    def b_enc(self, layer: int) -> torch.Tensor:
        return self.clt.b_enc[self._index[self._layer(layer)]]

    def decoder(self, source: int, layer: int) -> torch.Tensor:
        i, j = self._index[self._layer(source)], self._index[self._layer(layer)]
        if j < i:
            raise KeyError(f"layer {source}'s features write into layers {self._layers[i:]}, not {layer}.")
        decoder = self.clt.W_dec[i][:, j - i]
        return decoder if self.input_scale == 1 else decoder / self.input_scale  # a view, not a copy, when unscaled

    def b_dec(self, layer: int) -> torch.Tensor:
        return self.clt.b_dec[self._index[self._layer(layer)]] / self.input_scale

    def decode(self, layer: int, acts: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """The base class's sum, over the decoder rows of features active somewhere in ``acts``
        only when few are: a loaded CLT's decoders are memory-mapped files, and a trace then
        pages in the rows of its active features rather than every decoder. Where most
        features fire (an evaluation batch), gathering the rows would only copy the decoder."""
        out = self.b_dec(layer)
        for source in self.sources(layer):
            codes, decoder = acts[source], self.decoder(source, layer)
            live = codes.reshape(-1, codes.shape[-1]).ne(0).any(0).nonzero().flatten()
            if 2 * len(live) > decoder.shape[0]:
                out = out + codes.to(decoder.dtype) @ decoder
            else:
                out = out + codes[..., live].to(decoder.dtype) @ decoder[live]
        return out

    def skip(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        # Inputs and outputs share the training scale, so the skip is the same in model units.
        i = self._index[self._layer(layer)]
        if not self.clt.cfg.skip_connection:
            return None
        return x.to(self.clt.dtype) @ self.clt.W_skip[i].T

    def _layer(self, layer: int) -> int:
        if layer not in self._index:
            raise KeyError(f"the CLT does not replace MLP {layer} (it covers {self._layers}).")
        return layer


def clt_replacement(clt: TrainingCrossLayerTranscoder, input_scale: float = 1.0) -> CrossLayerTranscoders:
    """The CLT with the hook pairs its training run recorded in ``metadata.clt_hooks``."""
    hooks = clt.cfg.metadata.get(CLT_HOOKS_KEY)
    if not hooks:
        raise ValueError(f"the CLT's metadata has no {CLT_HOOKS_KEY} (the hook pairs it covers): give them to CrossLayerTranscoders.")
    return CrossLayerTranscoders(clt, [(hook_in, hook_out) for hook_in, hook_out in hooks], input_scale)
