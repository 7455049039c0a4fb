"""Inference TopK transcoders: SAELens has a TopK SAE but no TopK transcoder class.

They register under names that carry this package's import name, so that a process without
the plugin fails on their ``cfg.json`` with ``KeyError: 'sae_lens_transcoder.topk_transcoder'``
(naming what to install) instead of loading a TopK transcoder as a ReLU one.
"""

from dataclasses import dataclass
from typing import Any, Callable

import torch
from sae_lens.saes.topk_sae import TopK
from sae_lens.saes.transcoder import SkipTranscoder, SkipTranscoderConfig, Transcoder, TranscoderConfig
from typing_extensions import override

TOPK_TRANSCODER = "sae_lens_transcoder.topk_transcoder"
TOPK_SKIP_TRANSCODER = "sae_lens_transcoder.topk_skip_transcoder"


@dataclass
class TopKTranscoderConfig(TranscoderConfig):
    """``k`` features per token: the ``k`` largest pre-activations, then ReLU (SAELens's ``TopK``)."""

    k: int = 100

    @override
    @classmethod
    def architecture(cls) -> str:
        return TOPK_TRANSCODER


class _TopKActivation:
    """SAELens's ``TopK`` as the activation of a SAELens transcoder class."""

    cfg: "TopKTranscoderConfig | TopKSkipTranscoderConfig"

    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return TopK(self.cfg.k)


class TopKTranscoder(_TopKActivation, Transcoder):
    """``z = ReLU(TopK_k(x @ W_enc + b_enc))``, ``y_hat = z @ W_dec + b_dec`` (decoder norms folded)."""

    cfg: TopKTranscoderConfig  # type: ignore[assignment]

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "TopKTranscoder":
        return cls(TopKTranscoderConfig.from_dict(config_dict))


@dataclass
class TopKSkipTranscoderConfig(SkipTranscoderConfig):
    """A :class:`TopKTranscoderConfig` with SAELens's affine skip (``x @ W_skip.T``)."""

    k: int = 100

    @override
    @classmethod
    def architecture(cls) -> str:
        return TOPK_SKIP_TRANSCODER


class TopKSkipTranscoder(_TopKActivation, SkipTranscoder):
    """:class:`TopKTranscoder` plus ``x @ W_skip.T``."""

    cfg: TopKSkipTranscoderConfig  # type: ignore[assignment]

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "TopKSkipTranscoder":
        return cls(TopKSkipTranscoderConfig.from_dict(config_dict))


INFERENCE_CLASSES = {
    TOPK_TRANSCODER: (TopKTranscoder, TopKTranscoderConfig),
    TOPK_SKIP_TRANSCODER: (TopKSkipTranscoder, TopKSkipTranscoderConfig),
}
