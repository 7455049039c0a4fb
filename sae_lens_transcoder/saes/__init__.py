from sae_lens_transcoder.saes.transcoder import (
    TrainingTranscoder,
    TrainingTranscoderConfig,
)

__all__ = ["TrainingTranscoder", "TrainingTranscoderConfig"]
