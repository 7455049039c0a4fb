"""Training a cross-layer transcoder: the set runner with one model over every covered MLP.

The LLM pass, activation store, shuffle buffer, checkpoints, resume, stop signals, wandb and
the spliced evaluator are the per-layer set's; what changes is that SAELens's trainer trains a
single ``TrainingCrossLayerTranscoder`` on the whole packed batch ``[x_0 | y_0 | x_1 | ...]``
(named ``clt`` in checkpoints and logs), and that it is saved in circuit-tracer's CLT layout
(``saes.clt_files``). ``TranscoderTrainingRunner(cfg)`` builds this runner for CLT
architectures.
"""

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE
from sae_lens.util import temporary_seed

from sae_lens_transcoder.llm_transcoder_training_runner import TranscoderTrainingRunner
from sae_lens_transcoder.replacement import ReplacementSet
from sae_lens_transcoder.replacement.cross_layer import CLT_HOOKS_KEY, CrossLayerTranscoders
from sae_lens_transcoder.saes.clt import CLT_TRAINER_NAME as CLT_NAME
from sae_lens_transcoder.saes.clt import TrainingCrossLayerTranscoder
from sae_lens_transcoder.saes.clt_files import load_clt, save_clt


class CrossLayerTranscoderTrainingRunner(TranscoderTrainingRunner):
    """``run`` returns the trained :class:`TrainingCrossLayerTranscoder`."""

    sae: TrainingCrossLayerTranscoder

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
        if override_sae is not None:
            clt = override_sae
        elif self.cfg.from_pretrained_path is not None:
            clt = load_clt(self.cfg.from_pretrained_path, self.cfg.device).clt.train()
        else:
            clt_cfg = replace(copy.deepcopy(self.cfg.sae), n_layers=len(layers), mlp_layer=None, hook_name_out=None)
            training_class, _ = get_sae_training_class(clt_cfg.architecture())
            with temporary_seed(self.cfg.seed):
                clt = training_class(clt_cfg)
        if not isinstance(clt, TrainingCrossLayerTranscoder) or clt.n_layers != len(layers):
            raise ValueError(f"the cross-layer transcoder must cover the {len(layers)} layers {layers} of sae.mlp_layers.")
        return {layers[0]: clt}

    def build_replacement(self) -> ReplacementSet:
        return CrossLayerTranscoders(self.sae, self.covered_hooks)

    def _trainer_saes(self) -> dict[str, TrainingSAE[Any]]:
        return {CLT_NAME: self.sae}

    def _result(self) -> TrainingCrossLayerTranscoder:
        return self.sae

    def _split_batch(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        return {CLT_NAME: packed}

    def _set_sae_metadata(self) -> None:
        super()._set_sae_metadata()
        self.sae.cfg.metadata[CLT_HOOKS_KEY] = [list(pair) for pair in self.covered_hooks]

    def _write_inference_view(self, sae: TrainingSAE[Any], scale: float, directory: Path) -> None:
        # SAELens's checkpoint files stay for resuming; the CLT's own files go beside them.
        save_clt(sae, directory / "clt_files", scale)  # type: ignore[arg-type]

    def save_final_outputs(self, output_path: str) -> None:
        assert self.trainer is not None
        scale = self.trainer.trainers[CLT_NAME].activation_scaler.scaling_factor or 1.0
        self._save_atomically(output_path, lambda partial: save_clt(self.sae, partial, scale, scan=Path(output_path).name))
