"""Train, evaluate and analyse MLP transcoders with SAELens.

Importing this package registers ``architecture="transcoder"`` in SAELens's training
registry; saved transcoders load in plain SAELens as ``sae_lens.Transcoder``.
"""

from sae_lens_transcoder._version import __version__
from sae_lens_transcoder.registration import register_training_transcoder
from sae_lens_transcoder.saes.transcoder import TrainingTranscoder, TrainingTranscoderConfig

register_training_transcoder()

from sae_lens_transcoder.llm_transcoder_training_runner import (  # noqa: E402
    TranscoderTrainingRunner,
)


__all__ = [
    "__version__",
    "TrainingTranscoder",
    "TrainingTranscoderConfig",
    "TranscoderTrainingRunner",
    "register_training_transcoder",
]
