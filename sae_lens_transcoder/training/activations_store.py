"""Activation store yielding token-aligned ``[mlp_in | mlp_out]`` batches."""

import json
import logging
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import HfDataset, LanguageModelSAERunnerConfig
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.util import get_special_token_ids
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformer_lens.hook_points import HookedRootModule

from sae_lens_transcoder._sae_lens_privates import fresh_token_sequences
from sae_lens_transcoder.data import resolve_dataset_path
from sae_lens_transcoder.distributed.checkpoint import stream_state_name, stream_state_to_read
from sae_lens_transcoder.distributed.data import per_rank_batch_tokens, shard_dataset
from sae_lens_transcoder.distributed.world import current_world
from sae_lens_transcoder.saes.transcoder import TrainingTranscoderConfig
from sae_lens_transcoder.training.shuffle_buffer import ShuffleBuffer, StreamState

logger = logging.getLogger(__name__)

class NonFiniteActivationsError(ValueError):
    """The model produced NaN or inf activations at a transcoder's hook."""


def special_token_ids(
    model: HookedRootModule, exclude: bool | list[int], device: torch.device | str
) -> torch.Tensor | None:
    """``exclude_special_tokens`` of the runner config as a tensor (None = keep all)."""
    if exclude is False:
        return None
    ids = get_special_token_ids(model.tokenizer) if exclude is True else exclude  # type: ignore[arg-type]
    return torch.tensor(ids, dtype=torch.long, device=device)


class TranscoderActivationsStore(ActivationsStore):
    """SAELens's multi-hook store (one forward pass for all hooks) packed for the trainer.

    Batches are the ``layout``'s hooks side by side per token (each transcoder's input next to
    its output), shuffled together by a :class:`ShuffleBuffer`,
    whose state travels with every batch so a checkpoint records exactly the data position
    the trainer reached (also when a prefetch thread runs ahead).
    """

    layout: list[tuple[str, int]]
    shuffle_seed: int = 42
    _dataset_name: str = ""

    @classmethod
    def from_runner_config(
        cls,
        model: HookedRootModule,
        cfg: LanguageModelSAERunnerConfig[TrainingTranscoderConfig],
        layout: list[tuple[str, int]],
        override_dataset: HfDataset | None = None,
    ) -> "TranscoderActivationsStore":
        """A store packing the hooks of ``layout`` (name, width), in that order, per token."""
        sae = cfg.sae
        world = current_world()  # in a process group: this rank's shard and share of the batch
        assert cfg.act_store_device is not None  # set in cfg.__post_init__
        store_kwargs: dict[str, Any] = dict(
            streaming=cfg.streaming,
            context_size=cfg.context_size,
            n_batches_in_buffer=cfg.n_batches_in_buffer,
            total_training_tokens=cfg.training_tokens,
            store_batch_size_prompts=cfg.store_batch_size_prompts,
            train_batch_size_tokens=per_rank_batch_tokens(cfg.train_batch_size_tokens, world),
            prepend_bos=cfg.prepend_bos,
            normalize_activations=sae.normalize_activations,
            device=cfg.act_store_device,
            dtype=cfg.dtype,
            model_kwargs=cfg.model_kwargs,
            autocast_lm=cfg.autocast_lm,
            dataset_trust_remote_code=cfg.dataset_trust_remote_code,
            seqpos_slice=cfg.seqpos_slice,
            exclude_special_tokens=special_token_ids(
                model, cfg.exclude_special_tokens, cfg.act_store_device
            ),
            disable_concat_sequences=cfg.disable_concat_sequences,
            sequence_separator_token=cfg.sequence_separator_token,
            activations_mixing_fraction=cfg.activations_mixing_fraction,
            use_chat_formatting=cfg.use_chat_formatting,
        )
        store = cls.from_config_multi_hook(
            model,
            dataset=override_dataset or resolve_dataset_path(cfg.dataset_path),
            hook_names=[hook for hook, _ in layout],
            hook_d_ins=dict(layout),
            **store_kwargs,
        )
        assert isinstance(store, cls)
        if world.is_distributed:
            store.dataset = shard_dataset(store.dataset, world)
            store.iterable_sequences = fresh_token_sequences(store)
        store.layout = list(layout)
        store.shuffle_seed = cfg.seed
        store._dataset_name = cfg.dataset_path
        return store

    def _draw_tokens(self) -> torch.Tensor:
        """One LLM batch of token sequences, starting a new epoch at the dataset's end as
        SAELens's multi-hook loader does (an epoch's incomplete last batch is dropped)."""
        try:
            return self.get_batch_tokens(raise_at_epoch_end=True)
        except StopIteration:
            logger.info("the training dataset is exhausted; starting a new epoch")
            try:
                return self.get_batch_tokens()
            except StopIteration:
                raise ValueError(
                    f"dataset_path={self._dataset_name!r} yields no {self.context_size}-token "
                    "sequence: it is empty or too short. Use a larger dataset or a smaller context_size."
                ) from None

    def _packed_llm_batch(self) -> torch.Tensor:
        """The layout's hooks side by side for each token of one LLM batch, special tokens dropped."""
        tokens = self._draw_tokens()
        activations = self.get_multi_hook_activations(tokens)
        hooks = [hook for hook, _ in self.layout]
        packed = torch.cat([activations[h] for h in hooks], dim=-1)
        if not torch.isfinite(packed).all():  # one check; the hook is looked up only on failure
            bad = next(h for h in hooks if not torch.isfinite(activations[h]).all())
            raise NonFiniteActivationsError(
                f"the model produced non-finite (NaN/inf) activations at {bad} in LLM batch "
                f"{self.n_llm_batches_drawn + 1}; the transcoder would train to garbage. Check the "
                "model's weights and dtype (fp16 overflow?); the last complete checkpoint is kept."
            )
        packed = packed.to(self.device).reshape(-1, packed.shape[-1])
        if self.exclude_special_tokens is not None:
            token_ids = tokens[:, slice(*self.seqpos_slice)].reshape(-1).to(self.device)
            packed = packed[~torch.isin(token_ids, self.exclude_special_tokens)]
        return packed

    @property
    def n_llm_batches_drawn(self) -> int:
        return self.shuffle_buffer.n_source_batches

    @cached_property
    def shuffle_buffer(self) -> ShuffleBuffer:
        return ShuffleBuffer(
            self._packed_llm_batch,
            buffer_size=self.n_batches_in_buffer * self.training_context_size,
            batch_size=self.train_batch_size_tokens,
            mix_fraction=self.activations_mixing_fraction,
            seed=self.shuffle_seed,
        )

    def batches_with_state(self) -> Iterator[tuple[torch.Tensor, StreamState]]:
        """Packed training batches, each with the stream state right after it."""
        return iter(self.shuffle_buffer)

    def get_data_loader(self) -> Iterator[torch.Tensor]:
        # Iterating the store itself (SAELens's protocol) gives the packed batches alone.
        return (batch for batch, _ in self.batches_with_state())

    def restore_stream(self, state: StreamState) -> None:
        """Continue exactly where ``state`` was taken: token position, buffer, shuffle RNG."""
        if self.n_llm_batches_drawn:
            raise RuntimeError("restore_stream must be called before any batch is drawn.")
        self.shuffle_buffer.restore(state, skip_source_batch=self._draw_tokens)

    def save_stream_state(self, state: StreamState, checkpoint_path: str | Path) -> None:
        # The layout travels with the buffered rows: their columns mean nothing without it.
        metadata = {"layout": json.dumps(self.layout)}
        path = Path(checkpoint_path) / stream_state_name(current_world())
        save_file(state.to_tensors(), path, metadata=metadata)

    def load_stream_state(self, checkpoint_path: str | Path) -> StreamState:
        path = stream_state_to_read(Path(checkpoint_path), current_world())
        with safe_open(path, framework="pt") as file:
            saved = json.loads((file.metadata() or {}).get("layout", "null"))
        if saved is not None and [tuple(entry) for entry in saved] != self.layout:
            raise ValueError(
                f"{path} was written for the hooks and widths {saved}; this run reads {self.layout}. "
                "Resume with the same sae.mlp_layers (or hooks), d_in and d_out as the run that wrote it."
            )
        return StreamState.from_tensors(load_file(path))
