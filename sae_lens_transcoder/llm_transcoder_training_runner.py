"""``TranscoderTrainingRunner``: SAELens's training runner, fed MLP input/output pairs."""

import copy
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from sae_lens.config import HfDataset, LanguageModelSAERunnerConfig
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
from sae_lens.load_model import load_model as sae_lens_load_model
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from sae_lens.training._interruption import InterruptedException, interrupt_callback
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule

from sae_lens_transcoder import models
from sae_lens_transcoder.atomic import replace_dir_atomically
from sae_lens_transcoder.hooks import (
    default_input_hook,
    hook_layer,
    mlp_out_hook,
    validate_transcoder_hooks,
)

from sae_lens_transcoder.saes.transcoder import TrainingTranscoder, TrainingTranscoderConfig
from sae_lens_transcoder.training.activations_store import TranscoderActivationsStore
from sae_lens_transcoder.training.evaluator import TranscoderEvaluator

logger = logging.getLogger(__name__)

CHECKPOINT_COMPLETE_FILENAME = "checkpoint_complete.json"
SAE_LENS_DEFAULT_HOOK = LanguageModelSAERunnerConfig.__dataclass_fields__["hook_name"].default


def validate_runner_config(cfg: LanguageModelSAERunnerConfig[Any]) -> None:
    """Checks that need no model: run them before anything slow happens."""
    if not isinstance(cfg.sae, TrainingTranscoderConfig):
        raise ValueError(
            f"sae.architecture is {cfg.sae.architecture()!r}; TranscoderTrainingRunner "
            "trains sae.architecture: transcoder (import sae_lens_transcoder first)."
        )
    if cfg.use_cached_activations:
        raise ValueError(
            "use_cached_activations=True is not supported for transcoders: SAELens caches "
            "one hook, a transcoder needs the MLP input and output of the same tokens. "
            "Set use_cached_activations: false."
        )
    if cfg.hook_head_index is not None:
        raise ValueError("hook_head_index must be None for an MLP transcoder.")
    if cfg.model_class_name != "HookedTransformer":
        raise ValueError(
            f"model_class_name={cfg.model_class_name!r}: transcoder training needs a "
            "TransformerLens HookedTransformer (its MLP hooks). Set model_class_name: HookedTransformer."
        )
    buffer_tokens = cfg.n_batches_in_buffer * cfg.context_size
    if buffer_tokens < cfg.train_batch_size_tokens:
        raise ValueError(
            f"n_batches_in_buffer × context_size = {buffer_tokens} tokens is smaller than "
            f"train_batch_size_tokens={cfg.train_batch_size_tokens}; raise n_batches_in_buffer "
            f"to at least {-(-cfg.train_batch_size_tokens // cfg.context_size)}."
        )
    sae = cfg.sae
    if sae.mlp_layer is not None:
        if cfg.hook_name != SAE_LENS_DEFAULT_HOOK and hook_layer(cfg.hook_name) != sae.mlp_layer:
            raise ValueError(
                f"sae.mlp_layer={sae.mlp_layer} disagrees with hook_name={cfg.hook_name!r}; "
                "give one of them."
            )
        sae.hook_name_out = sae.hook_name_out or mlp_out_hook(sae.mlp_layer)
    elif cfg.hook_name == SAE_LENS_DEFAULT_HOOK:
        raise ValueError(
            f"hook_name is SAELens's default {SAE_LENS_DEFAULT_HOOK!r}, an MLP *output*. "
            "Set sae.mlp_layer (e.g. mlp_layer: 3) to pick the MLP's exact input and output "
            "hooks, or set hook_name to the MLP input (e.g. 'blocks.3.mlp.hook_in')."
        )
    else:
        sae.hook_name_out = sae.hook_name_out or mlp_out_hook(hook_layer(cfg.hook_name))
    # With mlp_layer, SAELens's default hook_name means "not given": it is resolved later.
    hook_name_given = cfg.hook_name != SAE_LENS_DEFAULT_HOOK
    if hook_name_given and sae.hook_name_out == cfg.hook_name:
        raise ValueError(
            f"hook_name and sae.hook_name_out are both {cfg.hook_name!r}; a transcoder "
            "reads the MLP input (hook_name) and predicts the MLP output (hook_name_out)."
        )


def is_offline_model(name: str) -> bool:
    return models.is_embedded_model_name(name) or models.is_local_model_dir(name)


def load_offline_model(
    name: str, device: str, model_from_pretrained_kwargs: dict[str, Any] | None
) -> HookedTransformer:
    """An embedded model or local HF directory, with the runner config's loading kwargs."""
    kwargs = dict(model_from_pretrained_kwargs or {})
    # SAELens's config adds this default for every HookedTransformer; our loaders do no
    # weight processing unless asked, and the tiny model's loader takes no such flag.
    if kwargs.get("center_writing_weights") is False:
        del kwargs["center_writing_weights"]
    return models.load_model(name, device=device, **kwargs)


def require_complete_checkpoint(path: str | Path) -> None:
    """Refuse to resume from a checkpoint whose writing did not finish."""
    if not (Path(path) / CHECKPOINT_COMPLETE_FILENAME).is_file():
        raise ValueError(
            f"resume_from_checkpoint={str(path)!r} is not a complete checkpoint (no "
            f"{CHECKPOINT_COMPLETE_FILENAME}; it was interrupted while being written or is "
            "not a checkpoint). Resume from an earlier checkpoint of the run."
        )


class TranscoderTrainingRunner(LanguageModelSAETrainingRunner):
    """Train a transcoder with SAELens's runner: same checkpoints, resume, wandb, prefetch.

    ``run``, ``save_final_sae``, checkpointing and interruption handling are inherited.
    """

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[TrainingTranscoderConfig],
        override_dataset: HfDataset | None = None,
        override_model: HookedRootModule | None = None,
        override_sae: TrainingSAE[Any] | None = None,
    ):
        # SAELens's __init__ builds a single-hook store and its stock evaluator inline
        # (no factory seam), so this builds the runner's parts itself.
        validate_runner_config(cfg)
        if cfg.resume_from_checkpoint is not None:
            require_complete_checkpoint(cfg.resume_from_checkpoint)
        self.cfg = cfg
        self.model = override_model if override_model is not None else self._load_model()
        if not isinstance(self.model, HookedTransformer):
            raise ValueError("TranscoderTrainingRunner needs a HookedTransformer model.")
        self._resolve_and_validate_hooks()
        self._compile_llm_if_needed()
        self.activations_store = TranscoderActivationsStore.from_runner_config(
            self.model, cfg, override_dataset=override_dataset
        )
        self.sae = override_sae if override_sae is not None else self._build_sae()
        self.sae.to(cfg.device)
        assert cfg.sae.hook_name_out is not None
        self.evaluator = TranscoderEvaluator(  # type: ignore[assignment]
            model=self.model,
            activations_store=self.activations_store,
            hook_name=cfg.hook_name,
            hook_name_out=cfg.sae.hook_name_out,
            n_eval_batches=cfg.n_eval_batches,
            eval_batch_size_prompts=cfg.eval_batch_size_prompts,
        )

    def _load_model(self) -> HookedRootModule:
        cfg = self.cfg
        assert cfg.llm_device is not None  # set in cfg.__post_init__
        if is_offline_model(cfg.model_name):
            return load_offline_model(cfg.model_name, cfg.llm_device, cfg.model_from_pretrained_kwargs)
        return sae_lens_load_model(
            cfg.model_class_name,
            cfg.model_name,
            device=cfg.llm_device,
            model_from_pretrained_kwargs=cfg.model_from_pretrained_kwargs,
        )

    def _resolve_and_validate_hooks(self) -> None:
        sae_cfg = self.cfg.sae
        assert isinstance(self.model, HookedTransformer)
        if sae_cfg.mlp_layer is not None and self.cfg.hook_name == SAE_LENS_DEFAULT_HOOK:
            self.cfg.hook_name = default_input_hook(self.model, sae_cfg.mlp_layer)
        assert sae_cfg.hook_name_out is not None and sae_cfg.d_out is not None
        validate_transcoder_hooks(
            self.model,
            self.cfg.hook_name,
            sae_cfg.hook_name_out,
            d_in=sae_cfg.d_in,
            d_out=sae_cfg.d_out,
            allow_inexact_mlp_input=sae_cfg.allow_inexact_mlp_input,
        )

    def _build_sae(self) -> TrainingSAE[Any]:
        if self.cfg.from_pretrained_path is not None:
            return TrainingSAE.load_from_disk(self.cfg.from_pretrained_path, self.cfg.device)
        return TrainingTranscoder(copy.deepcopy(self.cfg.sae))

    def _set_sae_metadata(self) -> None:
        super()._set_sae_metadata()
        # SAELens's runner records only the input hook; Transcoder loading needs both.
        self.sae.cfg.metadata.hook_name_out = self.cfg.sae.hook_name_out

    def save_checkpoint(self, checkpoint_path: Path | None) -> None:
        # Called last by SAETrainer.save_checkpoint, after weights and trainer state.
        super().save_checkpoint(checkpoint_path)
        if checkpoint_path is not None:
            marker = Path(checkpoint_path) / CHECKPOINT_COMPLETE_FILENAME
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"complete": True}))
            os.replace(tmp, marker)

    def run_trainer_with_interruption_handling(
        self, trainer: SAETrainer[TrainingSAE[TrainingSAEConfig], TrainingSAEConfig]
    ) -> TrainingSAE[Any]:
        # SAELens's handler saves only the dataset position on SIGINT/SIGTERM (no weights,
        # optimizer or scaler), which cannot be resumed; save a full checkpoint instead.
        try:
            signal.signal(signal.SIGINT, interrupt_callback)
            signal.signal(signal.SIGTERM, interrupt_callback)
            return trainer.fit()
        except (KeyboardInterrupt, InterruptedException):
            if self.cfg.checkpoint_path is not None:
                logger.warning("interrupted: saving a resumable checkpoint")
                trainer.save_checkpoint(checkpoint_name=str(trainer.n_training_samples))
            raise

    def save_final_sae(
        self,
        sae: TrainingSAE[Any],
        output_path: str,
        log_feature_sparsity: Any = None,
    ) -> None:
        # A crash never leaves a half-written transcoder where SAE.load_from_disk would read it.
        save = super().save_final_sae
        replace_dir_atomically(Path(output_path), lambda partial: save(sae, str(partial), log_feature_sparsity))
