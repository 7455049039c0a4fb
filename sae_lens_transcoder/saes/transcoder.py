"""Training-time MLP transcoder: reads the MLP's input, reconstructs the MLP's output.

The trainer hands the SAE one tensor per token. The transcoder activation store packs
``[x | y]`` (MLP input, MLP output) into that tensor, so SAELens's ``SAETrainer``
(coefficient schedules, dead-feature tracking, checkpoints, wandb) runs unchanged.
Inference uses SAELens's own ``Transcoder``, so saved files load without this plugin.
"""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from typing_extensions import override

from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from safetensors.torch import load_file

from sae_lens_transcoder.training.checkpoint_view import training_weights_file

ARCHITECTURE = "transcoder"
SUPPORTED_NORMALIZATIONS = ("none", "expected_average_only_in")


@dataclass
class TrainingTranscoderConfig(StandardTrainingSAEConfig):
    """Config of a ReLU transcoder trained with an L1 penalty.

    ``d_out`` defaults to ``d_in`` (MLPs write back to the residual stream they read).
    ``hook_name_out`` defaults to ``blocks.{layer}.hook_mlp_out`` of the runner's
    input hook. ``mlp_layer`` alone picks both hooks for that layer's MLP; ``mlp_layers``
    (``[0, 1, 2]``, ``"0-29"`` or ``"all"``) trains one transcoder per listed MLP, from one
    forward pass, each with this config.
    ``b_dec_init="mean"`` sets the output bias to the first batch's mean MLP output, as
    the paper did; it is skipped whenever weights are loaded (resume, fine-tuning). ``allow_inexact_mlp_input`` opts into an input hook that is not
    exactly what the MLP reads (e.g. ``hook_resid_mid``, as the paper's code allowed).
    """

    apply_b_dec_to_input: bool = False
    d_out: int | None = None
    hook_name_out: str | None = None
    mlp_layer: int | None = None
    mlp_layers: str | None = None
    allow_inexact_mlp_input: bool = False
    b_dec_init: Literal["mean", "zeros"] = "mean"

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        if self.apply_b_dec_to_input:
            raise ValueError(
                "sae.apply_b_dec_to_input=True is invalid for a transcoder: b_dec lives in "
                "the MLP *output* space and cannot be subtracted from the input. "
                "Set apply_b_dec_to_input: false."
            )
        if self.normalize_activations not in SUPPORTED_NORMALIZATIONS:
            raise ValueError(
                f"sae.normalize_activations={self.normalize_activations!r} is not supported "
                "for transcoders: it rescales the output with statistics of the input and "
                "cannot be folded into SAELens's inference Transcoder. Use one of "
                f"{SUPPORTED_NORMALIZATIONS}."
            )
        if self.reshape_activations != "none":
            raise ValueError(
                "sae.reshape_activations must be 'none' for a transcoder (it reads an MLP "
                f"input, not hook_z); got {self.reshape_activations!r}."
            )
        if self.b_dec_init not in ("mean", "zeros"):
            raise ValueError(f"sae.b_dec_init must be 'mean' or 'zeros'; got {self.b_dec_init!r}.")
        if isinstance(self.mlp_layers, (list, tuple)):
            # YAML/JSON give a list; the CLI (and so this field's type) a string.
            self.mlp_layers = ",".join(str(layer) for layer in self.mlp_layers)
        if self.d_out is None:
            self.d_out = self.d_in
        if self.d_in <= 0 or self.d_sae <= 0 or self.d_out <= 0:
            raise ValueError(
                f"sae.d_in, sae.d_sae and sae.d_out must be positive; got "
                f"d_in={self.d_in}, d_sae={self.d_sae}, d_out={self.d_out}."
            )
        super().__post_init__()


class TrainingTranscoder(StandardTrainingSAE):
    """Standard (ReLU + decoder-norm-weighted L1) SAE whose decoder targets the MLP output."""

    cfg: TrainingTranscoderConfig  # type: ignore[assignment]

    @property
    def d_out(self) -> int:
        assert self.cfg.d_out is not None  # resolved in the config's __post_init__
        return self.cfg.d_out

    @override
    def initialize_weights(self) -> None:
        # The base class ties W_enc = W_dec.T, which needs d_in == d_out and mixes the
        # input and output spaces; draw the two matrices independently instead.
        d_out = self.d_out
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=self.dtype, device=self.device))
        self.b_enc = nn.Parameter(
            torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device)
        )
        W_dec = torch.empty(self.cfg.d_sae, d_out, dtype=self.dtype, device=self.device)
        W_enc = torch.empty(self.cfg.d_in, self.cfg.d_sae, dtype=self.dtype, device=self.device)
        nn.init.kaiming_uniform_(W_dec)
        nn.init.kaiming_uniform_(W_enc)
        if self.cfg.decoder_init_norm is not None:
            W_dec *= self.cfg.decoder_init_norm / W_dec.norm(dim=-1, keepdim=True)
            W_enc *= self.cfg.decoder_init_norm / W_enc.norm(dim=0, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_enc)
        self._b_dec_init_pending = self.cfg.b_dec_init == "mean"
        self.register_load_state_dict_post_hook(_mark_b_dec_given)

    @override
    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        # b_dec has the output's width, so the base class's b_dec subtraction cannot apply.
        sae_in = self.hook_sae_input(sae_in.to(self.dtype))
        return self.run_time_activation_norm_fn_in(sae_in)

    def split_packed(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split a ``[x | y]`` batch from the transcoder activation store."""
        expected = self.cfg.d_in + self.d_out
        if packed.shape[-1] != expected:
            raise ValueError(
                f"Transcoder training batches must be [mlp_in | mlp_out] of width "
                f"d_in + d_out = {expected}; got width {packed.shape[-1]}. Train through "
                "TranscoderTrainingRunner (or TranscoderActivationsStore)."
            )
        return packed[..., : self.cfg.d_in], packed[..., self.cfg.d_in :]

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        x, y = self.split_packed(step_input.sae_in)
        if self._b_dec_init_pending:
            with torch.no_grad():
                self.b_dec.copy_(y.mean(0))  # y is already in the trainer's scaled space
            self._b_dec_init_pending = False
        feature_acts, hidden_pre = self.encode_with_hidden_pre(x)
        y_hat = self.decode(feature_acts)
        mse_loss = self.mse_loss_fn(y_hat, y.to(y_hat.dtype)).sum(dim=-1).mean()
        aux_losses = self.calculate_aux_loss(
            step_input=replace(step_input, sae_in=x),
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            sae_out=y_hat,
        )
        losses: dict[str, torch.Tensor] = {"mse_loss": mse_loss, **aux_losses}
        # The trainer measures explained variance against TrainStepOutput.sae_in, so the
        # target (MLP output) goes there, not the input.
        return TrainStepOutput(
            sae_in=y,
            sae_out=y_hat,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=sum(losses.values(), torch.zeros((), device=y_hat.device)),
            losses=losses,
        )

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @override
    def load_weights_from_checkpoint(self, checkpoint_path: Path | str) -> None:
        # A checkpoint trained with a scale holds the folded transcoder for inference and
        # the trainer's unfolded weights beside it; resuming needs the latter.
        state_dict = load_file(training_weights_file(Path(checkpoint_path)))
        self.process_state_dict_for_loading(state_dict)
        self.load_state_dict(state_dict)


def _mark_b_dec_given(module: nn.Module, incompatible_keys: Any) -> None:  # noqa: ARG001
    """Loaded weights already carry a trained b_dec; never overwrite it with a mean."""
    module._b_dec_init_pending = False  # type: ignore[assignment]
