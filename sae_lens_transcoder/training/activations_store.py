"""Activation store yielding token-aligned ``[mlp_in | mlp_out]`` batches."""

from collections.abc import Iterator
from typing import Any

import torch
from sae_lens.config import HfDataset, LanguageModelSAERunnerConfig
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.util import get_special_token_ids
from transformer_lens.hook_points import HookedRootModule

from sae_lens_transcoder.data import resolve_dataset_path
from sae_lens_transcoder.saes.transcoder import TrainingTranscoderConfig


def special_token_ids(
    model: HookedRootModule, exclude: bool | list[int], device: torch.device | str
) -> torch.Tensor | None:
    """``exclude_special_tokens`` of the runner config as a tensor (None = keep all)."""
    if exclude is False:
        return None
    ids = get_special_token_ids(model.tokenizer) if exclude is True else exclude  # type: ignore[arg-type]
    return torch.tensor(ids, dtype=torch.long, device=device)


class TranscoderActivationsStore(ActivationsStore):
    """SAELens's multi-hook store (one forward pass, one shared shuffle) packed for the trainer.

    Being a plain ``ActivationsStore`` iterator of tensors, it plugs into the stock
    runner's prefetching, checkpointing (dataset position) and resume unchanged.
    """

    @classmethod
    def from_runner_config(
        cls,
        model: HookedRootModule,
        cfg: LanguageModelSAERunnerConfig[TrainingTranscoderConfig],
        override_dataset: HfDataset | None = None,
    ) -> "TranscoderActivationsStore":
        sae = cfg.sae
        assert sae.hook_name_out is not None and sae.d_out is not None
        assert cfg.act_store_device is not None  # set in cfg.__post_init__
        store_kwargs: dict[str, Any] = dict(
            streaming=cfg.streaming,
            context_size=cfg.context_size,
            n_batches_in_buffer=cfg.n_batches_in_buffer,
            total_training_tokens=cfg.training_tokens,
            store_batch_size_prompts=cfg.store_batch_size_prompts,
            train_batch_size_tokens=cfg.train_batch_size_tokens,
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
            hook_names=[cfg.hook_name, sae.hook_name_out],
            hook_d_ins={cfg.hook_name: sae.d_in, sae.hook_name_out: sae.d_out},
            **store_kwargs,
        )
        assert isinstance(store, cls)
        return store

    @property
    def hook_name_out(self) -> str:
        assert self._hook_names is not None
        return self._hook_names[1]

    def get_data_loader(self) -> Iterator[torch.Tensor]:
        # The trainer takes one tensor per step; pack input and target side by side.
        hook_in, hook_out = self.hook_name, self.hook_name_out
        for batch in self.get_multi_hook_data_loader():
            yield torch.cat([batch[hook_in], batch[hook_out]], dim=-1)
