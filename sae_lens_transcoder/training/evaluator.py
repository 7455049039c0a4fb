"""In-training evaluator: the spliced evaluation of ``sae_lens_transcoder.evals``."""

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.prefetch import PrefetchingIterator
from sae_lens.training.types import DataProvider
from transformer_lens import HookedTransformer

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
        # Eval reads the store directly, racing a prefetch thread unless paused.
        pause: AbstractContextManager[None] = (
            data_provider.paused()
            if isinstance(data_provider, PrefetchingIterator)
            else nullcontext()
        )
        with pause:
            tokens = torch.cat(
                [
                    self.activations_store.get_batch_tokens(self.eval_batch_size_prompts)
                    for _ in range(self.n_eval_batches)
                ]
            )
        splice = Splice(
            sae,
            self.hook_name,
            self.hook_name_out,
            input_scale=activation_scaler.scaling_factor or 1.0,
        )
        metrics = evaluate_spliced(
            self.model,
            [splice],
            tokens,
            exclude_special_tokens=self.activations_store.exclude_special_tokens,
            batch_size=self.eval_batch_size_prompts or self.activations_store.store_batch_size_prompts,
        )
        return {f"eval/{key}": metrics[key] for key in LOGGED_KEYS}
