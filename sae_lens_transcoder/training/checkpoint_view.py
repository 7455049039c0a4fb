"""Checkpoints that load as what they claim, in plain SAELens, while staying resumable.

SAELens's trainer checkpoints the *training* SAE: its config names a training architecture
(``batchtopk_transcoder`` has no inference class), its weights may keep decoder norms
unfolded (TopK) or a BatchTopK running threshold, and with ``normalize_activations:
expected_average_only_in`` they work on scaled activations whose scale lives in
``activation_scaler.json``, which ``SAE.load_from_disk`` ignores. Here every checkpoint gets
the inference transcoder, scale folded, as its ``cfg.json`` / ``sae_weights.safetensors``,
and the trainer's own files move beside it (folding is not exactly invertible, so resume
needs the originals).
"""

import copy
import os
from pathlib import Path

from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.saes.sae import TrainingSAE

# Written last into a checkpoint: without it, the directory is not a checkpoint to resume.
CHECKPOINT_COMPLETE_FILENAME = "checkpoint_complete.json"
TRAINING_WEIGHTS_FILENAME = "training_sae_weights.safetensors"
TRAINING_CFG_FILENAME = "training_cfg.json"


def write_inference_view(sae: TrainingSAE, scale: float, checkpoint: Path) -> None:  # type: ignore[type-arg]
    """Keep the trainer's files under training names; write the folded transcoder in their place."""
    os.replace(checkpoint / SAE_WEIGHTS_FILENAME, checkpoint / TRAINING_WEIGHTS_FILENAME)
    os.replace(checkpoint / SAE_CFG_FILENAME, checkpoint / TRAINING_CFG_FILENAME)
    folded = copy.deepcopy(sae)
    if scale != 1.0:
        folded.fold_activation_norm_scaling_factor(scale)
    folded.save_inference_model(checkpoint)


def training_cfg_file(checkpoint: Path) -> Path:
    """The config a resumed trainer must match in ``checkpoint``."""
    kept = checkpoint / TRAINING_CFG_FILENAME
    return kept if kept.is_file() else checkpoint / SAE_CFG_FILENAME


def training_weights_file(checkpoint: Path) -> Path:
    """The weights a resumed trainer must load from ``checkpoint``."""
    kept = checkpoint / TRAINING_WEIGHTS_FILENAME
    return kept if kept.is_file() else checkpoint / SAE_WEIGHTS_FILENAME
