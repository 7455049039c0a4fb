"""``TranscoderTrainingRunner``: SAELens's training runner, fed MLP input/output pairs.

One runner trains one transcoder (``sae.mlp_layer`` / ``hook_name``) or a set of them
(``sae.mlp_layers``) from one LLM forward pass per batch. A single transcoder is the set of
one: both go through the same store, trainer, checkpoints and saving.
"""

import copy
import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import wandb
from sae_lens.config import HfDataset, LanguageModelSAERunnerConfig
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
from sae_lens.load_model import load_model as sae_lens_load_model
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.prefetch import PrefetchingIterator
from sae_lens.util import temporary_seed
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule

from sae_lens_transcoder import models
from sae_lens_transcoder._version import __version__
from sae_lens_transcoder.atomic import replace_dir_atomically
from sae_lens_transcoder.distributed import DataParallelSetTrainer, current_world
from sae_lens_transcoder.distributed.collectives import all_ranks_ok
from sae_lens_transcoder.distributed.config import prepare_config_for_world
from sae_lens_transcoder.distributed.layers import LayerMode, check_enough_layers, check_layer_mode, chosen_layer_mode
from sae_lens_transcoder.distributed.sharded_trainer import LayerShardedSetTrainer
from sae_lens_transcoder.hooks import chosen_input_hook, hook_layer, mlp_out_hook, validate_transcoder_hooks
from sae_lens_transcoder.layer_spec import parse_mlp_layers
from sae_lens_transcoder.models.transformers_source import TRANSFORMERS_MODEL_CLASS, load_transformers_source
from sae_lens_transcoder.replacement import PerLayerTranscoders, ReplacementSet, Splice
from sae_lens_transcoder.saes.clt import is_clt_architecture
from sae_lens_transcoder.replacement.saving import layer_dir, write_transcoder_set
from sae_lens_transcoder.saes.transcoder import TrainingTranscoderConfig
from sae_lens_transcoder.training.activations_store import TranscoderActivationsStore
from sae_lens_transcoder.training.checkpoint_view import CHECKPOINT_COMPLETE_FILENAME, write_inference_view
from sae_lens_transcoder.training.evaluator import TranscoderSetEvaluator
from sae_lens_transcoder.training.set_trainer import TranscoderSetTrainer
from sae_lens_transcoder.training.shuffle_buffer import TrackedBatches
from sae_lens_transcoder.training.stop_signals import StopSignals
from sae_lens_transcoder.validation import (
    PLUGIN_VERSION_KEY,
    SAE_LENS_DEFAULT_HOOK,
    check_output_path,
    validate_runner_config,
    validate_runner_model,
)

logger = logging.getLogger(__name__)

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


def trainer_name(layer: int) -> str:
    """A transcoder's name in the trainer: its checkpoint sub-directory and wandb key prefix."""
    return f"layer_{layer}"


class TranscoderTrainingRunner(LanguageModelSAETrainingRunner):
    """Train a transcoder, or a set, with SAELens's pieces: store, trainer, checkpoints, wandb.

    ``run`` returns the trained transcoder, or for a set the dict ``layer -> transcoder``
    (always in ``transcoders``). ``override_sae`` replaces a single run's transcoder,
    ``override_saes`` a set's (keyed by layer).
    """

    def __new__(cls, cfg: LanguageModelSAERunnerConfig[Any], *args: Any, **kwargs: Any) -> "TranscoderTrainingRunner":  # noqa: ARG003
        # A cross-layer transcoder trains through its own runner; the architecture picks it, so
        # ``TranscoderTrainingRunner(cfg)`` works for every architecture (imported here: it
        # subclasses this module's runner).
        from sae_lens_transcoder.training.clt_runner import CrossLayerTranscoderTrainingRunner

        if cls is TranscoderTrainingRunner and is_clt_architecture(cfg.sae.architecture()):
            cls = CrossLayerTranscoderTrainingRunner
        return super().__new__(cls)

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[TrainingTranscoderConfig],
        override_dataset: HfDataset | None = None,
        override_model: HookedRootModule | None = None,
        override_sae: TrainingSAE[Any] | None = None,
        *,
        override_saes: dict[int, TrainingSAE[Any]] | None = None,
        overwrite_output: bool = False,
        distributed_layers: LayerMode | None = None,
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
        # Inside a process group of several ranks, training is data parallel (see distributed/).
        self.world = current_world()
        prepare_config_for_world(cfg, self.world)
        # "shard": each rank trains some of the set's transcoders on the global batch (distributed/layers.py).
        distributed_layers = chosen_layer_mode(cfg.sae, distributed_layers)
        check_layer_mode(distributed_layers, is_clt_architecture(cfg.sae.architecture()))
        self.shard_layers = self.world.is_distributed and distributed_layers == "shard"
        self.model = override_model if override_model is not None else self._load_model()
        if not isinstance(self.model, HookedTransformer):
            raise ValueError("TranscoderTrainingRunner needs a HookedTransformer model.")
        validate_runner_model(cfg, self.model)
        self.is_set = cfg.sae.mlp_layers is not None
        self.hooks = self._resolve_and_validate_hooks()
        if self.shard_layers:
            check_enough_layers(self.world, len(self.hooks))
        self._compile_llm_if_needed()
        self.transcoders = self._build_transcoders(override_sae, override_saes)
        for transcoder in self.transcoders.values():
            transcoder.to(cfg.device)
        self.sae = next(iter(self.transcoders.values()))
        self.replacement = self.build_replacement()
        self.activations_store = TranscoderActivationsStore.from_runner_config(
            self._activation_source(), cfg, self.replacement.batch_layout, override_dataset=override_dataset
        )
        self.evaluator = TranscoderSetEvaluator(  # type: ignore[assignment]
            model=self.model,
            activations_store=self.activations_store,
            n_eval_batches=cfg.n_eval_batches,
            eval_batch_size_prompts=cfg.eval_batch_size_prompts,
        )
        self.trainer: TranscoderSetTrainer | None = None
        self.data_position: TrackedBatches[dict[str, torch.Tensor]] | None = None

    @property
    def layers(self) -> list[int]:
        return list(self.transcoders)

    def run(self) -> Any:
        """Train, checkpoint, resume and save, exactly resumable.

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
                mode=None if self.world.is_writer else "disabled",  # one run, logged by rank 0
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
        self.data_position = TrackedBatches(source, start, self._split_batch)
        saes = self._trainer_saes()
        stop = StopSignals()
        try:
            self.trainer = self._set_trainer_class()(
                cfg=cfg.to_sae_trainer_config(),
                saes=saes,
                hook_names={name: name for name in saes},
                data_provider=self.data_position,
                evaluator=self.evaluator,
                save_checkpoint_fn=self.save_checkpoint,
                stop_requested=stop.received,
                replayed_batches=self.data_position.replayed,
            )
            if cfg.resume_from_checkpoint is not None:
                logger.info("resuming from %s", cfg.resume_from_checkpoint)
                self.trainer.load_checkpoint(cfg.resume_from_checkpoint)
            self._compile_sae_if_needed()
            with stop:
                self.trainer.fit()
            if cfg.output_path is not None:
                self._save_final_outputs_once(cfg.output_path)
            if cfg.logger.log_to_wandb:
                wandb.finish()
            return self._result()
        finally:
            if isinstance(source, PrefetchingIterator):
                source.close()

    def _set_trainer_class(self) -> type[TranscoderSetTrainer]:
        """What trains the set in this world: one process, data parallel, or layer sharded."""
        if not self.world.is_distributed:
            return TranscoderSetTrainer
        return LayerShardedSetTrainer if self.shard_layers else DataParallelSetTrainer

    def _write_inference_view(self, sae: TrainingSAE[Any], scale: float, directory: Path) -> None:
        write_inference_view(sae, scale, directory)

    def build_replacement(self) -> ReplacementSet:
        """The transcoders as a replacement set, as they are now (e.g. after ``run``)."""
        return PerLayerTranscoders([Splice(tc, *self.hooks[layer]) for layer, tc in self.transcoders.items()])

    def _trainer_saes(self) -> dict[str, TrainingSAE[Any]]:
        """What the trainer trains, by name (checkpoint sub-directory, wandb prefix)."""
        return {trainer_name(layer): transcoder for layer, transcoder in self.transcoders.items()}

    def _result(self) -> Any:
        return dict(self.transcoders) if self.is_set else self.sae

    def _split_batch(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        """A packed batch as each transcoder's ``[mlp_in | mlp_out]`` columns (views)."""
        return {trainer_name(layer): packed[:, columns] for layer, columns in self._pair_columns.items()}

    @cached_property
    def _pair_columns(self) -> dict[int, slice]:
        return {layer: self.replacement.pair_columns(layer) for layer in self.layers}

    def _load_model(self) -> HookedRootModule:
        cfg = self.cfg
        assert cfg.llm_device is not None  # set in cfg.__post_init__
        if is_offline_model(cfg.model_name):
            return load_offline_model(cfg.model_name, cfg.llm_device, cfg.model_from_pretrained_kwargs)
        # Always the HookedTransformer: model_class_name picks only what makes the training
        # activations (_activation_source); hooks, evals and saving need TransformerLens's model.
        return sae_lens_load_model(
            "HookedTransformer",
            cfg.model_name,
            device=cfg.llm_device,
            model_from_pretrained_kwargs=cfg.model_from_pretrained_kwargs,
        )

    def _activation_source(self) -> HookedRootModule:
        """The model whose forward pass makes the training activations: the HookedTransformer,
        or with ``model_class_name: AutoModelForCausalLM`` transformers' own model of the same
        weights (faster on CPU; see models/transformers_source.py)."""
        if self.cfg.model_class_name != TRANSFORMERS_MODEL_CLASS:
            return self.model
        assert isinstance(self.model, HookedTransformer)
        hooks = [hook for hook, _ in self.replacement.batch_layout]
        return load_transformers_source(self.cfg.model_name, self.model, hooks, self.cfg.model_from_pretrained_kwargs)

    def _resolve_and_validate_hooks(self) -> dict[int, tuple[str, str]]:
        """``layer -> (input hook, output hook)``, each pair checked on the model."""
        cfg, sae_cfg = self.cfg, self.cfg.sae
        assert isinstance(self.model, HookedTransformer) and sae_cfg.d_out is not None
        if sae_cfg.mlp_layers is not None:
            layers = parse_mlp_layers(sae_cfg.mlp_layers, self.model.cfg.n_layers)
            hooks = {layer: (chosen_input_hook(self.model, layer, sae_cfg.mlp_input_hook), mlp_out_hook(layer)) for layer in layers}
        else:
            if sae_cfg.mlp_layer is not None and cfg.hook_name == SAE_LENS_DEFAULT_HOOK:
                cfg.hook_name = chosen_input_hook(self.model, sae_cfg.mlp_layer, sae_cfg.mlp_input_hook)
            assert sae_cfg.hook_name_out is not None
            layer = hook_layer(sae_cfg.hook_name_out, "sae.hook_name_out")
            hooks = {layer: (cfg.hook_name, sae_cfg.hook_name_out)}
        for hook_in, hook_out in hooks.values():
            validate_transcoder_hooks(
                self.model,
                hook_in,
                hook_out,
                d_in=sae_cfg.d_in,
                d_out=sae_cfg.d_out,
                allow_inexact_mlp_input=sae_cfg.allow_inexact_mlp_input,
            )
        return hooks

    def _build_transcoders(
        self,
        override_sae: TrainingSAE[Any] | None,
        override_saes: dict[int, TrainingSAE[Any]] | None,
    ) -> dict[int, TrainingSAE[Any]]:
        layers = sorted(self.hooks)
        if override_sae is not None:
            if self.is_set:
                raise ValueError("override_sae is for a single transcoder; give a set override_saes={layer: sae}.")
            return {layers[0]: override_sae}
        if override_saes is not None:
            if sorted(override_saes) != layers:
                raise ValueError(f"override_saes has layers {sorted(override_saes)}; the config trains {layers}.")
            return dict(sorted(override_saes.items()))
        return {layer: self._build_transcoder(layer) for layer in layers}

    def _build_transcoder(self, layer: int) -> TrainingSAE[Any]:
        if self.cfg.from_pretrained_path is not None:
            return TrainingSAE.load_from_disk(self.cfg.from_pretrained_path, self.cfg.device)
        # A deep copy: the configs must not share one metadata object.
        layer_cfg = replace(copy.deepcopy(self.cfg.sae), mlp_layer=layer, mlp_layers=None, hook_name_out=self.hooks[layer][1])
        # Built through SAELens's registry, so another architecture is another class, not a
        # runner edit; seeded per layer, so a layer's transcoder starts the same alone or in a set.
        training_class, _ = get_sae_training_class(layer_cfg.architecture())
        with temporary_seed(self.cfg.seed + layer):
            return training_class(layer_cfg)

    def _set_sae_metadata(self) -> None:
        for layer, transcoder in self.transcoders.items():
            self.sae = transcoder  # SAELens writes the run's metadata on self.sae
            super()._set_sae_metadata()
            metadata = transcoder.cfg.metadata
            # SAELens records the runner's one input hook; Transcoder loading needs both.
            metadata.hook_name, metadata.hook_name_out = self.hooks[layer]
            # The hooks are TransformerLens's whichever model made the activations.
            metadata.model_class_name = "HookedTransformer"
            # Any recorded kwarg makes every load of the transcoder warn about loading kwargs;
            # keep only those that change the model (not SAELens's center_writing_weights=False
            # default, not our loaders' cache directory).
            kwargs = dict(metadata.model_from_pretrained_kwargs or {})
            if kwargs.get("center_writing_weights") is False:
                del kwargs["center_writing_weights"]
            kwargs.pop("cache_dir", None)
            metadata.model_from_pretrained_kwargs = kwargs or None
            # Loaders refuse what a newer plugin wrote (checkpoints included); record ours.
            metadata[PLUGIN_VERSION_KEY] = __version__
        self.sae = next(iter(self.transcoders.values()))

    def save_checkpoint(self, checkpoint_path: Path | None) -> None:
        # Called last by MultiSAETrainer.save_checkpoint, after every transcoder's files.
        if checkpoint_path is None:
            return
        assert self.data_position is not None and self.trainer is not None
        # Every rank's own data position (and, layer sharded, its transcoders' views); everything else once, by rank 0.
        self.activations_store.save_stream_state(self.data_position.state, checkpoint_path)
        if self.world.is_writer or self.shard_layers:
            for name, trainer in self.trainer.trainers.items():
                self._write_inference_view(trainer.sae, trainer.activation_scaler.scaling_factor or 1.0, Path(checkpoint_path) / name)
        if not self.world.is_writer:
            return
        super().save_checkpoint(checkpoint_path)
        marker = Path(checkpoint_path) / CHECKPOINT_COMPLETE_FILENAME
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"complete": True}))
        os.replace(tmp, marker)

    def _save_final_outputs_once(self, output_path: str) -> None:
        """Rank 0 writes the outputs; every rank fails if that failed, none returns alone."""
        if not self.world.is_distributed:
            self.save_final_outputs(output_path)
            return
        error: Exception | None = None
        if self.world.is_writer:
            try:
                self.save_final_outputs(output_path)
            except Exception as e:  # noqa: BLE001  (re-raised once the ranks agree)
                error = e
        saved = all_ranks_ok(error is None, "confirming rank 0 saved the transcoders")
        if error is not None:
            raise error
        if not saved:
            raise OSError(f"rank 0 could not save the transcoders to {output_path!r} (see its error)")

    def save_final_outputs(self, output_path: str) -> None:
        """The transcoder at ``output_path``, or a set there (one directory per layer, a
        manifest, circuit-tracer's files when every layer from 0 is covered)."""
        assert self.trainer is not None
        sparsities = self.trainer.feature_sparsities()
        sparsity = {layer: sparsities[trainer_name(layer)] for layer in self.layers}
        if not self.is_set:
            self.save_final_sae(self.sae, output_path, sparsity[self.layers[0]])
            return

        def fill(partial: Path) -> None:
            for layer, transcoder in self.transcoders.items():
                self._write_transcoder(transcoder, partial / layer_dir(layer), sparsity[layer])
            trained = PerLayerTranscoders(list(self.transcoders.values()))
            write_transcoder_set(trained, partial, self.cfg.model_name, scan_name=Path(output_path).name, layer_dirs=False)

        self._save_atomically(output_path, fill)

    def save_final_sae(self, sae: TrainingSAE[Any], output_path: str, log_feature_sparsity: Any = None) -> None:
        """One transcoder at ``output_path``, as SAELens's runner writes it."""
        self._save_atomically(output_path, lambda partial: self._write_transcoder(sae, partial, log_feature_sparsity))

    def _write_transcoder(self, sae: TrainingSAE[Any], directory: Path, log_feature_sparsity: Any) -> None:
        # Loaders refuse what a newer plugin wrote; record which one this is.
        sae.cfg.metadata[PLUGIN_VERSION_KEY] = __version__
        super().save_final_sae(sae, str(directory), log_feature_sparsity)

    def _save_atomically(self, output_path: str, fill: Callable[[Path], None]) -> None:
        """Complete or not at all: a crash never leaves a half-written transcoder to load."""
        # A directory may have appeared at output_path while training ran.
        check_output_path(output_path, self.overwrite_output)
        try:
            replace_dir_atomically(Path(output_path), fill)
        except OSError as e:
            raise OSError(
                e.errno, f"could not save the transcoder to {output_path!r} ({e.strerror or e}); nothing there was changed"
            ) from e
