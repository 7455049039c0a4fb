"""Register the training transcoder with SAELens, safely on re-import and reload."""

import logging

from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class

from sae_lens_transcoder.saes.transcoder import (
    ARCHITECTURE,
    TrainingTranscoder,
    TrainingTranscoderConfig,
)

logger = logging.getLogger(__name__)


def _is_ours(cls: type) -> bool:
    # After importlib.reload the class object is new but its qualified name is the same.
    return (cls.__module__, cls.__qualname__) == (
        TrainingTranscoder.__module__,
        TrainingTranscoder.__qualname__,
    )


def register_training_transcoder() -> None:
    """Register under ``"transcoder"``; the inference class stays SAELens's ``Transcoder``.

    A stale entry from an earlier import of this module is replaced; one that SAELens
    (or another plugin) registered itself is kept, with a warning, instead of crashing.
    """
    existing = SAE_TRAINING_CLASS_REGISTRY.get(ARCHITECTURE)
    if existing is None:
        register_sae_training_class(ARCHITECTURE, TrainingTranscoder, TrainingTranscoderConfig)
    elif _is_ours(existing[0]):
        # SAELens has no unregister; the registry is its public dict of classes.
        SAE_TRAINING_CLASS_REGISTRY[ARCHITECTURE] = (TrainingTranscoder, TrainingTranscoderConfig)
    else:
        logger.warning(
            "SAELens already has a training class for %r (%s); keeping it. Use "
            "sae_lens_transcoder.TrainingTranscoderConfig directly to train with this plugin.",
            ARCHITECTURE,
            existing[0].__qualname__,
        )
