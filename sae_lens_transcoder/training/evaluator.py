"""In-training evaluator: the spliced evaluation of ``sae_lens_transcoder.evals``, per transcoder and all at once."""

from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property
from itertools import islice
from typing import Any

import torch
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.activation_scaler import ActivationScaler
from transformer_lens import HookedTransformer

from sae_lens_transcoder._sae_lens_privates import fresh_token_sequences
from sae_lens_transcoder.distributed.world import current_world
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.hooks import hook_layer
from sae_lens_transcoder.replacement.cross_layer import clt_replacement
from sae_lens_transcoder.saes.clt import TrainingCrossLayerTranscoder
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
PER_LAYER_KEYS = ("fvu", "explained_variance", "l0", "dead_features")


@dataclass
class TranscoderSetEvaluator:
    """Called by ``MultiSAETrainer`` like SAELens's ``MultiSAEEvaluator``: every transcoder
    spliced alone and, for a set, all at once (the MLPs replaced together)."""

    model: HookedTransformer
    activations_store: TranscoderActivationsStore
    n_eval_batches: int
    eval_batch_size_prompts: int | None

    def __call__(
        self,
        saes: dict[str, TrainingSAE[Any]],
        data_provider: Any,
        activation_scalers: dict[str, ActivationScaler],
        hook_names: dict[str, str],  # noqa: ARG002  (hooks come from each transcoder's metadata)
    ) -> dict[str, Any]:
        # The model must not run for the prefetch thread while the splice hooks are on it.
        pause = getattr(data_provider, "paused", None)
        scales = {name: activation_scalers[name].scaling_factor or 1.0 for name in saes}
        clts = {name: sae for name, sae in saes.items() if isinstance(sae, TrainingCrossLayerTranscoder)}
        groups: dict[str, Any] = {name: clt_replacement(clt, scales[name]) for name, clt in clts.items()}
        splices = {name: Splice.from_sae(sae, input_scale=scales[name]) for name, sae in saes.items() if name not in clts}
        groups |= {name: [splice] for name, splice in splices.items()}
        if len(splices) > 1:
            groups["all"] = list(splices.values())
        out: dict[str, Any] = {}
        with pause() if pause is not None else nullcontext():
            for group, members in groups.items():
                metrics = evaluate_spliced(
                    self.model,
                    members,
                    self.tokens,
                    exclude_special_tokens=self.activations_store.exclude_special_tokens,
                    batch_size=self.eval_batch_size_prompts or self.activations_store.store_batch_size_prompts,
                    # Data parallel: each rank scores its own shard's tokens; the sums are added up.
                    sum_over_ranks=current_world().is_distributed,
                )
                out |= {f"{group}/eval/{key}": metrics[key] for key in LOGGED_KEYS}
                if group in clts:  # a CLT's layers are one model: log each layer's fit too
                    for layer in metrics["per_transcoder"]:
                        prefix = f"{group}/eval/layer_{hook_layer(layer['hook_name_out'])}"
                        out |= {f"{prefix}/{key}": layer[key] for key in PER_LAYER_KEYS}
        return out

    @cached_property
    def tokens(self) -> torch.Tensor:
        """The same evaluation tokens at every evaluation, from a stream of their own: drawing
        them from the training stream would move it, and resumed runs would see other data."""
        sequences = fresh_token_sequences(self.activations_store)
        batch = self.eval_batch_size_prompts or self.activations_store.store_batch_size_prompts
        rows = list(islice(sequences, self.n_eval_batches * batch))
        return torch.stack(rows).to(self.activations_store.device)
