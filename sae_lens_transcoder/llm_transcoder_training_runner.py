"""``TranscoderTrainingRunner``: SAELens's training runner, fed MLP input/output pairs."""

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import wandb

from sae_lens.config import HfDataset, LanguageModelSAERunnerConfig
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
from sae_lens.load_model import load_model as sae_lens_load_model
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.prefetch import PrefetchingIterator
from sae_lens.util import temporary_seed
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule

from sae_lens_transcoder import models
from sae_lens_transcoder._version import __version__
from sae_lens_transcoder.atomic import replace_dir_atomically
from sae_lens_transcoder.hooks import default_input_hook, validate_transcoder_hooks

from sae_lens_transcoder.saes.transcoder import TrainingTranscoder, TrainingTranscoderConfig
from sae_lens_transcoder.training.activations_store import TranscoderActivationsStore
from sae_lens_transcoder.training.checkpoint_view import write_inference_view
from sae_lens_transcoder.training.evaluator import TranscoderEvaluator
from sae_lens_transcoder.training.shuffle_buffer import TrackedBatches
from sae_lens_transcoder.training.stop_signals import StopSignals
from sae_lens_transcoder.training.trainer import TranscoderTrainer
from sae_lens_transcoder.validation import (
    PLUGIN_VERSION_KEY,
    SAE_LENS_DEFAULT_HOOK,
    check_output_path,
    validate_runner_config,
    validate_runner_model,
)

logger = logging.getLogger(__name__)

CHECKPOINT_COMPLETE_FILENAME = "checkpoint_complete.json"


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
        *,
        overwrite_output: bool = False,
    ):
        # SAELens's __init__ builds a single-hook store and its stock evaluator inline
        # (no factory seam), so this builds the runner's parts itself.
        validate_runner_config(cfg, override_dataset)
        # Nothing at output_path is replaced unless it is a previous transcoder or asked.
        check_output_path(cfg.output_path, overwrite_output)
        self.overwrite_output = overwrite_output
        if cfg.resume_from_checkpoint is not None:
            require_complete_checkpoint(cfg.resume_from_checkpoint)
        self.cfg = cfg
        self.model = override_model if override_model is not None else self._load_model()
        if not isinstance(self.model, HookedTransformer):
            raise ValueError("TranscoderTrainingRunner needs a HookedTransformer model.")
        validate_runner_model(cfg, self.model)
        self._resolve_and_validate_hooks()
        self._compile_llm_if_needed()
        self.activations_store = TranscoderActivationsStore.from_runner_config(
            self.model, cfg, override_dataset=override_dataset
        )
        if override_sae is not None:
            self.sae = override_sae
        else:
            with temporary_seed(cfg.seed):  # the same seed gives the same initial weights
                self.sae = self._build_sae()
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
        self.trainer: TranscoderTrainer | None = None
        self.data_position: TrackedBatches | None = None

    def run(self) -> TrainingSAE[Any]:  # type: ignore[override]
        """Train, checkpoint, resume and save as SAELens's runner does, exactly resumable.

        SAELens's ``run`` builds a plain ``SAETrainer`` inline (no trainer seam) and starts
        prefetching before it restores the data position, so this composes the same steps.
        """
        cfg = self.cfg
        self._set_sae_metadata()
        if cfg.logger.log_to_wandb:
            wandb.init(
                project=cfg.logger.wandb_project,
                entity=cfg.logger.wandb_entity,
                config=cfg.to_dict(),
                name=cfg.logger.run_name,
                id=cfg.logger.wandb_id,
            )
        store = self.activations_store
        if cfg.resume_from_checkpoint is not None:
            store.restore_stream(store.load_stream_state(cfg.resume_from_checkpoint))
        start = store.shuffle_buffer.state()
        source: Any = store.batches_with_state()
        if cfg.prefetch_llm_batches:
            # bool is an int: True means one batch ahead.
            ahead = 1 if isinstance(cfg.prefetch_llm_batches, bool) else cfg.prefetch_llm_batches
            source = PrefetchingIterator(source, prefetch=ahead)
        self.data_position = TrackedBatches(source, start)
        stop = StopSignals()
        try:
            self.trainer = TranscoderTrainer(
                cfg=cfg.to_sae_trainer_config(),
                sae=self.sae,
                data_provider=self.data_position,
                evaluator=self.evaluator,
                save_checkpoint_fn=self.save_checkpoint,
                stop_requested=stop.received,
            )
            if cfg.resume_from_checkpoint is not None:
                logger.info("resuming from %s", cfg.resume_from_checkpoint)
                self.trainer.load_trainer_state(cfg.resume_from_checkpoint)
                self.sae.load_weights_from_checkpoint(cfg.resume_from_checkpoint)
            self._compile_sae_if_needed()
            with stop:
                sae = self.trainer.fit()
            if cfg.output_path is not None:
                self.save_final_sae(sae, cfg.output_path, self.trainer.log_feature_sparsity)
            if cfg.logger.log_to_wandb:
                wandb.finish()
            return sae
        finally:
            if isinstance(source, PrefetchingIterator):
                source.close()

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
        metadata = self.sae.cfg.metadata
        # SAELens's runner records only the input hook; Transcoder loading needs both.
        metadata.hook_name_out = self.cfg.sae.hook_name_out
        # SAELens's config adds center_writing_weights=False to every HookedTransformer's
        # kwargs; recorded, it makes each load of the transcoder warn about loading kwargs.
        kwargs = dict(metadata.model_from_pretrained_kwargs or {})
        if kwargs.get("center_writing_weights") is False:
            del kwargs["center_writing_weights"]
        metadata.model_from_pretrained_kwargs = kwargs or None

    def save_checkpoint(self, checkpoint_path: Path | None) -> None:
        # Called last by SAETrainer.save_checkpoint, after weights and trainer state.
        if checkpoint_path is None:
            return
        super().save_checkpoint(checkpoint_path)
        assert self.data_position is not None and self.trainer is not None
        self.activations_store.save_stream_state(self.data_position.state, checkpoint_path)
        scale = self.trainer.activation_scaler.scaling_factor
        if scale is not None:
            write_inference_view(self.sae, scale, Path(checkpoint_path))
        marker = Path(checkpoint_path) / CHECKPOINT_COMPLETE_FILENAME
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"complete": True}))
        os.replace(tmp, marker)

    def save_final_sae(
        self,
        sae: TrainingSAE[Any],
        output_path: str,
        log_feature_sparsity: Any = None,
    ) -> None:
        # A directory may have appeared at output_path while training ran.
        check_output_path(output_path, self.overwrite_output)
        # Loaders refuse what a newer plugin wrote; record which one this is.
        sae.cfg.metadata[PLUGIN_VERSION_KEY] = __version__
        # A crash never leaves a half-written transcoder where SAE.load_from_disk would read it.
        save = super().save_final_sae
        try:
            replace_dir_atomically(Path(output_path), lambda partial: save(sae, str(partial), log_feature_sparsity))
        except OSError as e:
            raise OSError(
                e.errno, f"could not save the transcoder to {output_path!r} ({e.strerror or e}); nothing there was changed"
            ) from e
