"""Training a cross-layer transcoder: the set runner with one model over every covered MLP.

The LLM pass, activation store, shuffle buffer, checkpoints, resume, stop signals, wandb and
the spliced evaluator are the per-layer set's; what changes is that SAELens's trainer trains a
single ``TrainingCrossLayerTranscoder`` on the whole packed batch ``[x_0 | y_0 | x_1 | ...]``
(named ``clt`` in checkpoints and logs), and that it is saved in circuit-tracer's CLT layout
(``saes.clt_files``). ``TranscoderTrainingRunner(cfg)`` builds this runner for CLT
architectures. With ``distributed_layers="shard_features"`` each rank trains its share of the
CLT's features (``distributed.feature_shards``) and rank 0 saves the whole CLT.
"""

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE
from sae_lens.util import temporary_seed

from sae_lens_transcoder.distributed.feature_shards import check_feature_sharding, shard_clt
from sae_lens_transcoder.distributed.feature_trainer import FeatureShardedSetTrainer
from sae_lens_transcoder.distributed.layers import LayerMode, chosen_layer_mode
from sae_lens_transcoder.distributed.world import current_world
from sae_lens_transcoder.llm_transcoder_training_runner import TranscoderTrainingRunner
from sae_lens_transcoder.replacement import ReplacementSet
from sae_lens_transcoder.replacement.cross_layer import CLT_HOOKS_KEY, CrossLayerTranscoders
from sae_lens_transcoder.saes.clt import CLT_TRAINER_NAME as CLT_NAME
from sae_lens_transcoder.saes.clt import TrainingCrossLayerTranscoder
from sae_lens_transcoder.saes.clt_files import load_clt, save_clt
from sae_lens_transcoder.training.set_trainer import TranscoderSetTrainer


class CrossLayerTranscoderTrainingRunner(TranscoderTrainingRunner):
    """``run`` returns the trained :class:`TrainingCrossLayerTranscoder` (feature sharded: the
    whole CLT on rank 0, its share on every other rank)."""

    sae: TrainingCrossLayerTranscoder  # feature sharded: this rank's share

    def __init__(self, cfg: Any, *args: Any, distributed_layers: LayerMode | None = None, **kwargs: Any):
        # Known before the transcoders are built (and refused before the model is loaded).
        distributed_layers = chosen_layer_mode(cfg.sae, distributed_layers)
        self.shard_features = distributed_layers == "shard_features"
        if self.shard_features:
            check_feature_sharding(current_world(), cfg.sae)
        super().__init__(cfg, *args, distributed_layers=distributed_layers, **kwargs)

    @property
    def covered_hooks(self) -> list[tuple[str, str]]:
        return [self.hooks[layer] for layer in sorted(self.hooks)]

    def _build_transcoders(
        self,
        override_sae: TrainingSAE[Any] | None,
        override_saes: dict[int, TrainingSAE[Any]] | None,
    ) -> dict[int, TrainingSAE[Any]]:
        layers = sorted(self.hooks)
        if override_saes is not None:
            raise ValueError("override_saes is for per-layer sets; give a cross-layer transcoder as override_sae.")
        # Feature sharded, the whole CLT is built (drawn, or loaded) on the CPU, never on the GPU.
        device = "cpu" if self.shard_features else self.cfg.device
        if override_sae is not None:
            clt = override_sae
        elif self.cfg.from_pretrained_path is not None:
            clt = load_clt(self.cfg.from_pretrained_path, device).clt.train()
        else:
            clt_cfg = replace(copy.deepcopy(self.cfg.sae), n_layers=len(layers), mlp_layer=None, hook_name_out=None, device=device)
            training_class, _ = get_sae_training_class(clt_cfg.architecture())
            with temporary_seed(self.cfg.seed):
                clt = training_class(clt_cfg)
        if not isinstance(clt, TrainingCrossLayerTranscoder) or clt.n_layers != len(layers):
            raise ValueError(f"the cross-layer transcoder must cover the {len(layers)} layers {layers} of sae.mlp_layers.")
        if self.shard_features:
            clt = shard_clt(clt, self.world, self.cfg.device)
        return {layers[0]: clt}

    def _set_trainer_class(self) -> type[TranscoderSetTrainer]:
        return FeatureShardedSetTrainer if self.shard_features else super()._set_trainer_class()

    def _trained_clt(self) -> TrainingCrossLayerTranscoder:
        """The CLT as trained: this rank's share, except the whole CLT on rank 0 once a
        feature-sharded run has ended (on the CPU until asked for on the model's device)."""
        trainer = getattr(self, "trainer", None)  # None, or not yet set, before run
        if isinstance(trainer, FeatureShardedSetTrainer) and trainer.whole_clt is not None:
            return trainer.whole_clt
        return self.sae

    def build_replacement(self) -> ReplacementSet:
        clt = self._trained_clt()
        if clt is not self.sae:
            clt.to(self.cfg.device)  # rank 0 evaluating the whole feature-sharded CLT after training
        return CrossLayerTranscoders(clt, self.covered_hooks)

    def _trainer_saes(self) -> dict[str, TrainingSAE[Any]]:
        return {CLT_NAME: self.sae}

    def _result(self) -> TrainingCrossLayerTranscoder:
        return self._trained_clt()

    def _split_batch(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        return {CLT_NAME: packed}

    def _set_sae_metadata(self) -> None:
        super()._set_sae_metadata()
        self.sae.cfg.metadata[CLT_HOOKS_KEY] = [list(pair) for pair in self.covered_hooks]

    def _write_inference_view(self, sae: TrainingSAE[Any], scale: float, directory: Path) -> None:
        # SAELens's checkpoint files stay for resuming; the CLT's own files go beside them
        # (a feature shard's checkpoint is its share, for resuming only: no view of it).
        if isinstance(sae, TrainingCrossLayerTranscoder) and sae.feature_shards is not None:
            return
        save_clt(sae, directory / "clt_files", scale)  # type: ignore[arg-type]

    def save_final_outputs(self, output_path: str) -> None:
        assert self.trainer is not None
        scale = self.trainer.trainers[CLT_NAME].activation_scaler.scaling_factor or 1.0
        clt = self._trained_clt()
        self._save_atomically(output_path, lambda partial: save_clt(clt, partial, scale, scan=Path(output_path).name))
