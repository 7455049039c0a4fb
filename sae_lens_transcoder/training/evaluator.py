"""In-training evaluator: the spliced evaluation of ``sae_lens_transcoder.evals``."""

from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property
from itertools import islice
from typing import Any

import torch
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.types import DataProvider
from transformer_lens import HookedTransformer

from sae_lens_transcoder._sae_lens_privates import fresh_token_sequences
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.saes.transcoder import TrainingTranscoder
from sae_lens_transcoder.splicing import Splice
from sae_lens_transcoder.training.activations_store import TranscoderActivationsStore

LOGGED_KEYS = (
    "l0",
    "explained_variance",
    "fvu",
    "mse",
    "cossim",
    "l2_ratio",
    "ce_loss_clean",
    "ce_loss_spliced",
    "ce_loss_zero_ablation",
    "ce_loss_mean_ablation",
    "ce_loss_recovered",
    "ce_loss_recovered_mean",
    "kl_div",
    "dead_features",
    "dense_features",
)


@dataclass
class TranscoderEvaluator:
    """Called by ``SAETrainer`` like SAELens's ``LLMSaeEvaluator``, with the same signature."""

    model: HookedTransformer
    activations_store: TranscoderActivationsStore
    hook_name: str
    hook_name_out: str
    n_eval_batches: int
    eval_batch_size_prompts: int | None

    def __call__(
        self,
        sae: TrainingTranscoder,
        data_provider: DataProvider,
        activation_scaler: ActivationScaler,
    ) -> dict[str, Any]:
        # The model must not run for the prefetch thread while the splice hooks are on it.
        pause = getattr(data_provider, "paused", None)
        with pause() if pause is not None else nullcontext():
            splice = Splice(
                sae,
                self.hook_name,
                self.hook_name_out,
                input_scale=activation_scaler.scaling_factor or 1.0,
            )
            metrics = evaluate_spliced(
                self.model,
                [splice],
                self.tokens,
                exclude_special_tokens=self.activations_store.exclude_special_tokens,
                batch_size=self.eval_batch_size_prompts or self.activations_store.store_batch_size_prompts,
            )
        return {f"eval/{key}": metrics[key] for key in LOGGED_KEYS}

    @cached_property
    def tokens(self) -> torch.Tensor:
        """The same evaluation tokens at every evaluation, from a stream of their own: drawing
        them from the training stream would move it, and resumed runs would see other data."""
        sequences = fresh_token_sequences(self.activations_store)
        batch = self.eval_batch_size_prompts or self.activations_store.store_batch_size_prompts
        rows = list(islice(sequences, self.n_eval_batches * batch))
        return torch.stack(rows).to(self.activations_store.device)
