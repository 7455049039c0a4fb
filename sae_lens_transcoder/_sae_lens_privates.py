"""Every private SAELens name this plugin relies on, in one place, checked at import.

SAELens lacks public seams for these; if a release moves one, importing the plugin fails
here with the SAELens version and the name, instead of deep inside a training run.
"""

from collections.abc import Iterator

import sae_lens
import torch
from sae_lens import llm_sae_training_runner
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from sae_lens.training.sae_trainer import SAETrainer

REQUIRED: dict[str, tuple[object, str]] = {
    # CLI flag parser with the architecture subgroups (no public parser exists).
    "llm_sae_training_runner._parse_cfg_args": (llm_sae_training_runner, "_parse_cfg_args"),
    # The runner's metadata writer, extended with the output hook, and its compile steps.
    "LanguageModelSAETrainingRunner._set_sae_metadata": (LanguageModelSAETrainingRunner, "_set_sae_metadata"),
    "LanguageModelSAETrainingRunner._compile_llm_if_needed": (LanguageModelSAETrainingRunner, "_compile_llm_if_needed"),
    "LanguageModelSAETrainingRunner._compile_sae_if_needed": (LanguageModelSAETrainingRunner, "_compile_sae_if_needed"),
    # A fresh token stream over the store's dataset (the in-training evaluator's own tokens).
    "ActivationsStore._iterate_tokenized_sequences": (ActivationsStore, "_iterate_tokenized_sequences"),
    # Overridden in the set trainer: the step-boundary hook (stop requests) and the
    # progress bar, which SAELens only moves every 100 steps.
    "MultiSAETrainer._maybe_log_sparsity": (MultiSAETrainer, "_maybe_log_sparsity"),
    "MultiSAETrainer._update_pbar": (MultiSAETrainer, "_update_pbar"),
    # Overridden in the set trainer (its batches are replayed for training) and by the
    # data-parallel set trainer (the scaling factor of the global stream).
    "MultiSAETrainer._estimate_scaling_factors": (MultiSAETrainer, "_estimate_scaling_factors"),
    # Overridden in the Matryoshka transcoders: their nested decodes, gathered (no seam for the matmul).
    "MatryoshkaBatchTopKTrainingSAE._iterable_decode": (MatryoshkaBatchTopKTrainingSAE, "_iterable_decode"),
    # Overridden in the transcoder trainer: it resizes the firing counts to cfg.d_sae, not a CLT's
    # number of features.
    "SAETrainer._reset_running_sparsity_stats": (SAETrainer, "_reset_running_sparsity_stats"),
}


def check_sae_lens_privates() -> None:
    """Fail with a clear message if SAELens moved a private name we use."""
    missing = [name for name, (owner, attr) in REQUIRED.items() if not hasattr(owner, attr)]
    if missing:
        raise ImportError(
            f"sae-lens-transcoder needs SAELens internals that sae-lens {sae_lens.__version__} "
            f"does not have: {', '.join(missing)}. Install a supported sae-lens (6.54.x)."
        )


check_sae_lens_privates()

from sae_lens.llm_sae_training_runner import _parse_cfg_args  # noqa: E402
from sae_lens.training._interruption import InterruptedException  # noqa: E402

parse_cfg_args = _parse_cfg_args
__all__ = ["InterruptedException", "parse_cfg_args"]


def fresh_token_sequences(store: ActivationsStore) -> Iterator[torch.Tensor]:
    """A new iterator over the store's context-size token sequences, from the dataset's start."""
    return store._iterate_tokenized_sequences()
