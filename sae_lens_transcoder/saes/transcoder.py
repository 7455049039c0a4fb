"""Every trainable transcoder architecture: a SAELens training SAE composed with the mixins.

Each class is ``(TranscoderMixin, <SAELens training SAE>, TranscoderTrainingCore)`` and each
config ``(TranscoderConfigMixin, <SAELens training config>)``, so the sparsity losses,
activation functions, threshold updates and auxiliary losses are SAELens's own. The trainer
hands the SAE one ``[x | y]`` tensor per token (packed by the transcoder activation store),
so SAELens's ``SAETrainer`` runs unchanged. Saved transcoders are SAELens inference classes
(TopK ones this package's, see ``topk_transcoder``).

=================================== ================================= ===========================
architecture                        trained as                        saved as
=================================== ================================= ===========================
``transcoder``                      ReLU + decoder-norm-weighted L1   ``Transcoder``
``skip_transcoder``                 the same + ``W_skip``             ``SkipTranscoder``
``jumprelu_transcoder``             JumpReLU, straight-through        ``JumpReLUTranscoder``
                                    threshold gradient, L0 / tanh
                                    penalty, pre-activation loss
``jumprelu_skip_transcoder``        the same + ``W_skip``             ``JumpReLUSkipTranscoder``
``topk_transcoder``                 TopK + AuxK                       ``TopKTranscoder``
``topk_skip_transcoder``            the same + ``W_skip``             ``TopKSkipTranscoder``
``batchtopk_transcoder``            BatchTopK + AuxK                  ``JumpReLUTranscoder``
``batchtopk_skip_transcoder``       the same + ``W_skip``             ``JumpReLUSkipTranscoder``
``matryoshka_batchtopk_transcoder`` nested BatchTopK + AuxK           ``JumpReLUTranscoder``
``matryoshka_batchtopk_skip_...``   the same + ``W_skip``             ``JumpReLUSkipTranscoder``
=================================== ================================= ===========================
"""

from dataclasses import dataclass

import torch

from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainingSAE
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from typing_extensions import override

from sae_lens_transcoder.distributed.replicas import min_across_replicas
from sae_lens_transcoder.saes.mixin import TranscoderConfigMixin, TranscoderMixin, TranscoderTrainingCore
from sae_lens_transcoder.saes.sparse_jumprelu_step import SparseJumpReLUStep
from sae_lens_transcoder.saes.sparse_matryoshka_decode import SparseMatryoshkaDecode
from sae_lens_transcoder.saes.sparse_topk_step import SparseTopKStep
from sae_lens_transcoder.saes.topk_transcoder import TOPK_SKIP_TRANSCODER, TOPK_TRANSCODER

__all__ = ["TRAINING_CLASSES", "TrainingTranscoder", "TrainingTranscoderConfig"]


# ---------------------------------------------------------------------------- ReLU + L1


@dataclass
class TrainingTranscoderConfig(TranscoderConfigMixin, StandardTrainingSAEConfig):
    """A ReLU transcoder trained with SAELens's decoder-norm-weighted L1 penalty."""

    inference_architecture = "transcoder"

    @override
    @classmethod
    def architecture(cls) -> str:
        return "transcoder"


class TrainingTranscoder(TranscoderMixin, StandardTrainingSAE, TranscoderTrainingCore):  # type: ignore[misc]
    """Standard (ReLU + L1) SAE whose decoder targets the MLP output."""

    cfg: TrainingTranscoderConfig  # type: ignore[assignment]


@dataclass
class SkipTrainingTranscoderConfig(TrainingTranscoderConfig):
    has_skip = True
    inference_architecture = "skip_transcoder"

    @override
    @classmethod
    def architecture(cls) -> str:
        return "skip_transcoder"


class SkipTrainingTranscoder(TrainingTranscoder):
    cfg: SkipTrainingTranscoderConfig  # type: ignore[assignment]


# ---------------------------------------------------------------------------- JumpReLU


@dataclass
class JumpReLUTrainingTranscoderConfig(TranscoderConfigMixin, JumpReLUTrainingSAEConfig):
    inference_architecture = "jumprelu_transcoder"
    sparse_decode_exact = False

    @override
    @classmethod
    def architecture(cls) -> str:
        return "jumprelu_transcoder"


class JumpReLUTrainingTranscoder(TranscoderMixin, SparseJumpReLUStep, JumpReLUTrainingSAE, TranscoderTrainingCore):  # type: ignore[misc]
    cfg: JumpReLUTrainingTranscoderConfig  # type: ignore[assignment]


@dataclass
class JumpReLUSkipTrainingTranscoderConfig(JumpReLUTrainingTranscoderConfig):
    has_skip = True
    inference_architecture = "jumprelu_skip_transcoder"

    @override
    @classmethod
    def architecture(cls) -> str:
        return "jumprelu_skip_transcoder"


class JumpReLUSkipTrainingTranscoder(JumpReLUTrainingTranscoder):
    cfg: JumpReLUSkipTrainingTranscoderConfig  # type: ignore[assignment]


# ---------------------------------------------------------------------------- TopK


@dataclass
class TopKTrainingTranscoderConfig(TranscoderConfigMixin, TopKTrainingSAEConfig):
    inference_architecture = TOPK_TRANSCODER

    @override
    @classmethod
    def architecture(cls) -> str:
        return "topk_transcoder"


class TopKTrainingTranscoder(TranscoderMixin, SparseTopKStep, TopKTrainingSAE, TranscoderTrainingCore):  # type: ignore[misc]
    cfg: TopKTrainingTranscoderConfig  # type: ignore[assignment]


@dataclass
class TopKSkipTrainingTranscoderConfig(TopKTrainingTranscoderConfig):
    has_skip = True
    inference_architecture = TOPK_SKIP_TRANSCODER

    @override
    @classmethod
    def architecture(cls) -> str:
        return "topk_skip_transcoder"


class TopKSkipTrainingTranscoder(TopKTrainingTranscoder):
    cfg: TopKSkipTrainingTranscoderConfig  # type: ignore[assignment]


# ---------------------------------------------------------------------------- BatchTopK


class _ThresholdFromFirstBatch:
    """BatchTopK's saved threshold is an EMA (rate ``topk_threshold_lr``) of the smallest kept
    activation, started at 0: at 0.01 it needs ~300 steps to near its value, and until then the
    saved JumpReLU fires on far more than ``k`` features. Start it at the first batch's value."""

    topk_threshold: torch.Tensor
    _data_init_pending: dict[str, bool]

    @torch.no_grad()
    def update_topk_threshold(self, acts_topk: torch.Tensor) -> None:
        positive = acts_topk[acts_topk > 0]
        if not self._data_init_pending["topk_threshold"] or not positive.numel():
            super().update_topk_threshold(acts_topk)  # type: ignore[misc]
        else:
            self.topk_threshold = positive.min().to(self.topk_threshold.dtype)
            self._data_init_pending["topk_threshold"] = False
        # Data parallel: the minimum of the ranks' thresholds is the one of the global batch's minimum.
        self.topk_threshold = min_across_replicas(self.topk_threshold)


@dataclass
class BatchTopKTrainingTranscoderConfig(TranscoderConfigMixin, BatchTopKTrainingSAEConfig):
    inference_architecture = "jumprelu_transcoder"

    @override
    @classmethod
    def architecture(cls) -> str:
        return "batchtopk_transcoder"


class BatchTopKTrainingTranscoder(  # type: ignore[misc]
    TranscoderMixin, _ThresholdFromFirstBatch, SparseTopKStep, BatchTopKTrainingSAE, TranscoderTrainingCore
):
    cfg: BatchTopKTrainingTranscoderConfig  # type: ignore[assignment]


@dataclass
class BatchTopKSkipTrainingTranscoderConfig(BatchTopKTrainingTranscoderConfig):
    has_skip = True
    inference_architecture = "jumprelu_skip_transcoder"

    @override
    @classmethod
    def architecture(cls) -> str:
        return "batchtopk_skip_transcoder"


class BatchTopKSkipTrainingTranscoder(BatchTopKTrainingTranscoder):
    cfg: BatchTopKSkipTrainingTranscoderConfig  # type: ignore[assignment]


# ---------------------------------------------------------------------------- Matryoshka BatchTopK


@dataclass
class MatryoshkaBatchTopKTrainingTranscoderConfig(TranscoderConfigMixin, MatryoshkaBatchTopKTrainingSAEConfig):
    inference_architecture = "jumprelu_transcoder"

    @override
    @classmethod
    def architecture(cls) -> str:
        return "matryoshka_batchtopk_transcoder"


class MatryoshkaBatchTopKTrainingTranscoder(  # type: ignore[misc]
    TranscoderMixin,
    _ThresholdFromFirstBatch,
    SparseTopKStep,
    SparseMatryoshkaDecode,
    MatryoshkaBatchTopKTrainingSAE,
    TranscoderTrainingCore,
):
    cfg: MatryoshkaBatchTopKTrainingTranscoderConfig  # type: ignore[assignment]


@dataclass
class MatryoshkaBatchTopKSkipTrainingTranscoderConfig(MatryoshkaBatchTopKTrainingTranscoderConfig):
    has_skip = True
    inference_architecture = "jumprelu_skip_transcoder"

    @override
    @classmethod
    def architecture(cls) -> str:
        return "matryoshka_batchtopk_skip_transcoder"


class MatryoshkaBatchTopKSkipTrainingTranscoder(MatryoshkaBatchTopKTrainingTranscoder):
    cfg: MatryoshkaBatchTopKSkipTrainingTranscoderConfig  # type: ignore[assignment]


TRAINING_CLASSES: dict[str, tuple[type[TrainingSAE], type[TranscoderConfigMixin]]] = {  # type: ignore[type-arg]
    config.architecture(): (sae, config)
    for sae, config in (
        (TrainingTranscoder, TrainingTranscoderConfig),
        (SkipTrainingTranscoder, SkipTrainingTranscoderConfig),
        (JumpReLUTrainingTranscoder, JumpReLUTrainingTranscoderConfig),
        (JumpReLUSkipTrainingTranscoder, JumpReLUSkipTrainingTranscoderConfig),
        (TopKTrainingTranscoder, TopKTrainingTranscoderConfig),
        (TopKSkipTrainingTranscoder, TopKSkipTrainingTranscoderConfig),
        (BatchTopKTrainingTranscoder, BatchTopKTrainingTranscoderConfig),
        (BatchTopKSkipTrainingTranscoder, BatchTopKSkipTrainingTranscoderConfig),
        (MatryoshkaBatchTopKTrainingTranscoder, MatryoshkaBatchTopKTrainingTranscoderConfig),
        (MatryoshkaBatchTopKSkipTrainingTranscoder, MatryoshkaBatchTopKSkipTrainingTranscoderConfig),
    )
}
