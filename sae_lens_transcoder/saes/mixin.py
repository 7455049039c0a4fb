"""What turns any SAELens training SAE into a transcoder: one config mixin, one SAE mixin.

A transcoder architecture is ``class X(TranscoderMixin, <SAELens training SAE>,
TranscoderTrainingCore)``. Python's MRO then runs, for every training step:

1. ``TranscoderMixin.training_forward_pass`` (outermost): splits the packed ``[x | y]``
   batch, initialises biases from the first batch, and hands the rest of the chain a
   :class:`TranscoderStepInput` whose ``sae_in`` is the **target** (``y`` minus the skip
   term) and whose ``mlp_in`` is ``x``;
2. the SAELens architecture's own ``training_forward_pass`` wrappers (JumpReLU's threshold
   projection, BatchTopK's threshold update, Matryoshka's nested losses), which all read
   ``step_input.sae_in`` as "what to reconstruct" and so see the target;
3. ``TranscoderTrainingCore.training_forward_pass``, in place of ``TrainingSAE``'s: encodes
   ``mlp_in`` (through the architecture's ``encode_with_hidden_pre``), decodes, and measures
   MSE and every auxiliary loss (AuxK included) against the target.

Subtracting the skip term from the target, rather than adding it to every reconstruction,
is the same loss (``|dec + skip - y|² = |dec - (y - skip)|²``, gradients reach ``W_skip``
through the target) and reaches the nested Matryoshka reconstructions and the AuxK residual
without touching SAELens's code.
"""

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors.torch import load_file
from sae_lens.registry import get_sae_class
from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig, TrainStepInput, TrainStepOutput
from torch import nn
from typing_extensions import override

from sae_lens_transcoder.distributed.layers import LAYER_MODES, LayerMode
from sae_lens_transcoder.distributed.replicas import mean_across_replicas
from sae_lens_transcoder.saes.sparse_decode import decode_gathered, decodes_sparse, sparse_decode
from sae_lens_transcoder.training.checkpoint_view import training_weights_file

SUPPORTED_NORMALIZATIONS = ("none", "expected_average_only_in")


@dataclass
class TranscoderConfigMixin(TrainingSAEConfig):
    """The fields every transcoder architecture adds to its SAELens training config.

    ``d_out`` defaults to ``d_in`` (MLPs write back to the residual stream they read).
    ``hook_name_out`` defaults to ``blocks.{layer}.hook_mlp_out`` of the runner's input hook.
    ``mlp_layer`` alone picks both hooks for that layer's MLP; ``mlp_layers`` (``[0, 1, 2]``,
    ``"0-29"`` or ``"all"``) trains one transcoder per listed MLP, from one forward pass,
    each with this config. ``b_dec_init="mean"`` sets the output bias to the first batch's
    mean MLP output (the paper's init); ``b_enc_init="mean_input"`` sets the encoder bias
    to ``-mean(x) @ W_enc`` so that features start out reading the centred input. Both are
    skipped whenever weights are loaded (resume, fine-tuning). ``allow_inexact_mlp_input``
    opts into an input hook that is not exactly what the MLP reads (e.g.
    ``hook_resid_mid``, as the paper's code allowed). Where ``mlp_layer``/``mlp_layers`` pick
    the input hook, ``mlp_input_hook="hook_mlp_in"`` picks the residual before the MLP's norm
    instead of the MLP's exact input (the hook SAELens gives Gemma Scope 2's transcoders), so
    the transcoder also does the norm's job. ``decoder_impl`` picks the training
    decode: ``sparse`` gathers each token's non-zero codes (``sparse_decode``), ``dense`` is
    SAELens's matmul, ``auto`` uses the sparse one whenever the batch is sparse enough.
    ``distributed_layers`` picks how a run under torchrun splits the work (``distributed/``).
    """

    # Skip architectures set this: a trained affine skip ``x @ W_skip.T`` (zero at start).
    has_skip: ClassVar[bool] = False
    # False where gradients must reach inactive codes: JumpReLU's straight-through threshold
    # gradient reads dL/d(code) just below the threshold, where the code is zero.
    sparse_decode_exact: ClassVar[bool] = True
    # The SAELens inference architecture the trained transcoder is saved as.
    inference_architecture: ClassVar[str]

    apply_b_dec_to_input: bool = False
    d_out: int | None = None
    hook_name_out: str | None = None
    mlp_layer: int | None = None
    mlp_layers: str | None = None
    allow_inexact_mlp_input: bool = False
    mlp_input_hook: Literal["exact", "hook_mlp_in"] = "exact"
    b_dec_init: Literal["mean", "zeros"] = "mean"
    b_enc_init: Literal["mean_input", "zeros"] = "mean_input"
    decoder_impl: Literal["auto", "dense", "sparse"] = "auto"
    # Under torchrun: every rank trains everything (data parallel), a set's layers or a CLT's features split over ranks.
    distributed_layers: LayerMode = "replicate"

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
        if self.mlp_input_hook not in ("exact", "hook_mlp_in"):
            raise ValueError(f"sae.mlp_input_hook must be 'exact' or 'hook_mlp_in'; got {self.mlp_input_hook!r}.")
        if self.b_dec_init not in ("mean", "zeros"):
            raise ValueError(f"sae.b_dec_init must be 'mean' or 'zeros'; got {self.b_dec_init!r}.")
        if self.distributed_layers not in LAYER_MODES:
            raise ValueError(f"sae.distributed_layers must be one of {', '.join(LAYER_MODES)}; got {self.distributed_layers!r}.")
        if self.decoder_impl not in ("auto", "dense", "sparse"):
            raise ValueError(f"sae.decoder_impl must be 'auto', 'dense' or 'sparse'; got {self.decoder_impl!r}.")
        if self.decoder_impl == "sparse" and not self.sparse_decode_exact:
            raise ValueError(
                f"sae.decoder_impl='sparse' is not exact for {self.architecture()}: its threshold gradient needs "
                "the decoder's gradient at inactive codes. Use decoder_impl: auto (sparse only where that stays "
                "exact) or dense."
            )
        if self.b_enc_init not in ("mean_input", "zeros"):
            raise ValueError(f"sae.b_enc_init must be 'mean_input' or 'zeros'; got {self.b_enc_init!r}.")
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

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return get_sae_class(self.inference_architecture)[1]


@dataclass
class TranscoderStepInput(TrainStepInput):
    """A training step of a transcoder: ``sae_in`` is the target, ``mlp_in`` what is encoded."""

    mlp_in: torch.Tensor | None = None


class TranscoderTrainingCore(TrainingSAE[Any]):
    """Sits where ``TrainingSAE`` is in a transcoder's MRO and replaces what assumes one space.

    The base ties ``W_enc = W_dec.T`` and sizes ``b_dec``/``W_dec`` with ``d_in``; it
    subtracts ``b_dec`` from the input; and it encodes the tensor it reconstructs.
    """

    cfg: TranscoderConfigMixin  # type: ignore[assignment]

    @override
    def initialize_weights(self) -> None:
        cfg, d_out = self.cfg, self.d_out
        like = {"dtype": self.dtype, "device": self.device}
        self.b_dec = nn.Parameter(torch.zeros(d_out, **like))
        W_dec = torch.empty(cfg.d_sae, d_out, **like)
        W_enc = torch.empty(cfg.d_in, cfg.d_sae, **like)
        nn.init.kaiming_uniform_(W_dec)
        nn.init.kaiming_uniform_(W_enc)
        if cfg.decoder_init_norm is not None:
            W_dec *= cfg.decoder_init_norm / W_dec.norm(dim=-1, keepdim=True)
            W_enc *= cfg.decoder_init_norm / W_enc.norm(dim=0, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_enc)
        if cfg.has_skip:
            # SAELens's SkipTranscoder orientation: skip = x @ W_skip.T.
            self.W_skip = nn.Parameter(torch.zeros(d_out, cfg.d_in, **like))
        self._data_init_pending = {"b_dec": cfg.b_dec_init == "mean", "b_enc": cfg.b_enc_init == "mean_input", "topk_threshold": True}
        self.register_load_state_dict_post_hook(_mark_biases_given)

    @property
    def d_out(self) -> int:
        assert self.cfg.d_out is not None  # resolved in the config's __post_init__
        return self.cfg.d_out

    @override
    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        # b_dec has the output's width, so the base class's b_dec subtraction cannot apply.
        sae_in = self.hook_sae_input(sae_in.to(self.dtype))
        return self.run_time_activation_norm_fn_in(sae_in)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        assert isinstance(step_input, TranscoderStepInput) and step_input.mlp_in is not None
        feature_acts, hidden_pre = self.encode_with_hidden_pre(step_input.mlp_in)
        sae_out = self.decode(feature_acts)
        target = step_input.sae_in
        losses = {"mse_loss": self.mse_loss_fn(sae_out, target.to(sae_out.dtype)).sum(dim=-1).mean()}
        aux = self.calculate_aux_loss(step_input=step_input, feature_acts=feature_acts, hidden_pre=hidden_pre, sae_out=sae_out)
        losses |= aux if isinstance(aux, dict) else {"aux_loss": aux}
        return TrainStepOutput(
            sae_in=target,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=sum(losses.values(), torch.zeros((), device=sae_out.device)),
            losses=losses,
        )


class TranscoderMixin:
    """The outermost layer of every training transcoder (see the module docstring)."""

    cfg: TranscoderConfigMixin
    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_enc: nn.Parameter
    b_dec: nn.Parameter
    W_skip: nn.Parameter
    _data_init_pending: dict[str, bool]

    def split_packed(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split a ``[x | y]`` batch from the transcoder activation store."""
        d_in, d_out = self.cfg.d_in, self.cfg.d_out
        assert d_out is not None
        if packed.shape[-1] != d_in + d_out:
            raise ValueError(
                f"Transcoder training batches must be [mlp_in | mlp_out] of width "
                f"d_in + d_out = {d_in + d_out}; got width {packed.shape[-1]}. Train through "
                "TranscoderTrainingRunner (or TranscoderActivationsStore)."
            )
        return packed[..., :d_in], packed[..., d_in:]

    def skip_out(self, x: torch.Tensor) -> torch.Tensor | None:
        """The affine skip term ``x @ W_skip.T``, None for architectures without one."""
        return x.to(self.W_skip.dtype) @ self.W_skip.T if self.cfg.has_skip else None

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        x, y = self.split_packed(step_input.sae_in)
        self._init_biases_from_data(x, y)
        skip = self.skip_out(x)
        target = y if skip is None else y - skip.to(y.dtype)
        given = {f.name: getattr(step_input, f.name) for f in fields(step_input)}  # no copies
        transcoder_input = TranscoderStepInput(**(given | {"sae_in": target, "mlp_in": x}))
        try:
            output: TrainStepOutput = super().training_forward_pass(transcoder_input)  # type: ignore[misc]
        finally:
            self.__dict__.pop("_step_handoff", None)  # it holds the step's graph
        if skip is None:
            return output
        # Explained variance and the logged reconstruction are of the MLP output itself.
        return replace(output, sae_in=y, sae_out=output.sae_out + skip.to(output.sae_out.dtype))

    def to_inference(self) -> SAE:  # type: ignore[type-arg]
        """The SAELens inference transcoder this one saves as (``save_inference_model``), in memory."""
        state = {key: value.detach().clone() for key, value in self.state_dict().items()}  # type: ignore[attr-defined]
        self.process_state_dict_for_saving_inference(state)  # type: ignore[attr-defined]
        inference = SAE.from_dict(self.cfg.get_inference_sae_cfg_dict())
        inference.load_state_dict(state)
        return inference

    def hand_on(self, **found: Any) -> None:
        """Keep what a training step's encode found for the parts of the step after it (the
        decodes read its kept codes, AuxK its pre-activations) instead of finding it again;
        ``training_forward_pass`` drops it when the step ends. Each reader checks that what it
        was handed belongs to the very tensor it was given."""
        if self.training and torch.is_grad_enabled():  # type: ignore[attr-defined]
            self.__dict__.setdefault("_step_handoff", {}).update(found)

    def handed(self, name: str) -> Any:
        """What this step's encode handed on as ``name``, or None."""
        return self.__dict__.get("_step_handoff", {}).get(name)

    def remember_kept_codes(
        self, feature_acts: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor | None = None
    ) -> None:
        """Let the decodes of this very ``feature_acts`` tensor gather ``values`` at ``indices``
        (``[batch, k]``, or flat with ``offsets``: ``decode_gathered``) instead of finding the
        codes again."""
        self.hand_on(kept_codes=(feature_acts, indices, values, offsets))

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        kept = self.handed("kept_codes")
        rescale = bool(getattr(self.cfg, "rescale_acts_by_decoder_norm", False))  # TopK's decode option
        if kept is not None and kept[0] is feature_acts:  # only the sparse encode remembers codes
            out = decode_gathered(kept[1], kept[2], self.W_dec, rescale, kept[3]) + self.b_dec
            return self._finish_decode(out)
        if not self._decodes_sparse(feature_acts):
            return super().decode(feature_acts)  # type: ignore[misc]
        return self._finish_decode(sparse_decode(feature_acts, self.W_dec, rescale) + self.b_dec)

    def _finish_decode(self, out: torch.Tensor) -> torch.Tensor:
        # What SAELens's decode does after its matmul.
        out = self.hook_sae_recons(out)  # type: ignore[attr-defined]
        out = self.run_time_activation_norm_fn_out(out)  # type: ignore[attr-defined]
        return self.reshape_fn_out(out, self.d_head)  # type: ignore[attr-defined]

    def _decodes_sparse(self, feature_acts: torch.Tensor) -> bool:
        """Whether the sparse decode should run on ``feature_acts``."""
        if feature_acts.ndim != 2 or feature_acts.is_sparse:
            return False
        return decodes_sparse(self.cfg.decoder_impl, self.cfg.sparse_decode_exact, feature_acts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decode(self.encode(x))  # type: ignore[attr-defined]
        skip = self.skip_out(x)
        return out if skip is None else out + skip.to(out.dtype)

    @torch.no_grad()
    def _init_biases_from_data(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # x and y are already in the trainer's scaled space; in data-parallel training the
        # means are the global batch's, so every rank's replica starts from the same biases.
        if self._data_init_pending["b_dec"]:
            self.b_dec.copy_(mean_across_replicas(y.mean(0)))
        if self._data_init_pending["b_enc"]:
            self.b_enc.copy_(-(mean_across_replicas(x.mean(0)).to(self.W_enc.dtype) @ self.W_enc))
        self._data_init_pending |= {"b_dec": False, "b_enc": False}

    def load_weights_from_checkpoint(self, checkpoint_path: Path | str) -> None:
        # A checkpoint holds the inference transcoder (scale and decoder norms folded) for
        # plain SAELens and the trainer's own weights beside it; resuming needs the latter.
        state_dict = load_file(training_weights_file(Path(checkpoint_path)))
        self.process_state_dict_for_loading(state_dict)  # type: ignore[attr-defined]
        self.load_state_dict(state_dict)  # type: ignore[attr-defined]


def _mark_biases_given(module: nn.Module, incompatible_keys: Any) -> None:  # noqa: ARG001
    """Loaded weights already carry trained biases; never overwrite them with data means."""
    module._data_init_pending = {"b_dec": False, "b_enc": False, "topk_threshold": False}  # type: ignore[assignment]
