"""Cross-layer transcoders (CLTs): features read one MLP's input and write to that MLP's output
and every later one's.

A CLT over layers ``l_0 < l_1 < ... < l_{L-1}`` has, for each covered layer ``i``, an encoder
``W_enc[i] [d_in, d_sae]`` reading MLP ``l_i``'s exact input, and a decoder
``W_dec[i] [d_sae, L - i, d_out]`` writing into the outputs of MLPs ``l_i .. l_{L-1}``; the
reconstruction of MLP ``l_j``'s output is ``b_dec[j] + Σ_{i ≤ j} a_i @ W_dec[i][:, j - i]``.
Decoders are stored per source, as circuit-tracer stores them, so memory is the
``L(L+1)/2 · d_sae · d_out`` the model needs and no more.

It trains in SAELens's trainer as one ``TrainingSAE`` on the whole packed batch
(``[x_0 | y_0 | x_1 | y_1 | ...]``, one activation store pass). SAELens's architectures compute
pre-activations as one ``sae_in @ W_enc``, which cannot give each layer's features their own
input without an ``L×``-sized block-diagonal encoder, so this class reuses their activation
functions (``JumpReLU``/``Step`` with straight-through threshold gradients, ``TopK``) and
sparsity penalties rather than their classes:

=================  ====================================================================
``clt``            ReLU + L1 weighted by each feature's concatenated decoder norm
``jumprelu_clt``   JumpReLU; L0 (``step``) or Anthropic's ``tanh`` penalty on the same norm
``topk_clt``       TopK per layer (``k`` features of each layer per token)
``batchtopk_clt``  BatchTopK per layer (``k`` on average over the batch); inference
                   thresholds at each layer's running cut, so it saves as a JumpReLU CLT
=================  ====================================================================

``cfg.d_sae`` is the number of features per layer (as in circuit-tracer's files); the trainer
sees ``n_features = L · d_sae``.
"""

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.jumprelu_sae import JumpReLU, Step
from sae_lens.saes.sae import SAEConfig, TrainCoefficientConfig, TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopK
from torch import nn
from typing_extensions import override

from sae_lens_transcoder.distributed.replicas import mean_across_replicas, min_across_replicas
from sae_lens_transcoder.distributed.collectives import sum_over_ranks
from sae_lens_transcoder.distributed.shard_topk import batch_topk_across_shards, min_over_shards, topk_across_shards
from sae_lens_transcoder.distributed.world import World
from sae_lens_transcoder.saes.mixin import TranscoderConfigMixin
from sae_lens_transcoder.saes.sparse_decode import decodes_sparse, sparse_decode


@dataclass
class TrainingCLTConfig(TranscoderConfigMixin):
    """A ReLU cross-layer transcoder with the decoder-norm-weighted L1 penalty.

    ``n_layers`` (how many MLPs the CLT covers) is set by the runner from ``mlp_layers``.
    ``skip_connection`` adds a trained affine skip per layer, ``x_l @ W_skip[l].T`` into MLP
    ``l``'s output (zero at start), as the per-layer skip transcoders have.
    """

    activation: ClassVar[str] = "relu"
    inference_architecture = "clt"

    n_layers: int = 1
    skip_connection: bool = False
    l1_coefficient: float = 1.0
    l1_warm_up_steps: int = 0

    @override
    @classmethod
    def architecture(cls) -> str:
        return "clt"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        # SAELens has no CLT class (``saes.clt_files`` saves CLTs); its base config tells
        # SAELens's metadata which fields are training-only.
        return SAEConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_layers < 1:
            raise ValueError(f"sae.n_layers={self.n_layers}: a cross-layer transcoder covers at least one MLP.")
        if self.normalize_activations != "none":
            raise ValueError(
                f"sae.normalize_activations={self.normalize_activations!r}: cross-layer transcoders train on the "
                "raw activations (each layer has its own scale); use 'none'."
            )


@dataclass
class JumpReLUCLTConfig(TrainingCLTConfig):
    """JumpReLU cross-layer transcoder (Anthropic's circuit-tracing recipe)."""

    activation: ClassVar[str] = "jumprelu"
    inference_architecture = "jumprelu_clt"
    sparse_decode_exact: ClassVar[bool] = False  # the threshold gradient reads inactive codes

    l0_coefficient: float = 1.0
    l0_warm_up_steps: int = 0
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    jumprelu_sparsity_loss_mode: Literal["step", "tanh"] = "tanh"
    jumprelu_tanh_scale: float = 4.0

    @override
    @classmethod
    def architecture(cls) -> str:
        return "jumprelu_clt"


@dataclass
class TopKCLTConfig(TrainingCLTConfig):
    """TopK cross-layer transcoder: ``k`` active features per layer and token."""

    activation: ClassVar[str] = "topk"
    inference_architecture = "topk_clt"

    k: int = 32

    @override
    @classmethod
    def architecture(cls) -> str:
        return "topk_clt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"sae.k={self.k} must be between 1 and sae.d_sae={self.d_sae} (features per layer).")


@dataclass
class BatchTopKCLTConfig(TopKCLTConfig):
    """BatchTopK cross-layer transcoder: ``k`` active features per layer and token on average
    over the batch; inference uses each layer's running threshold (a JumpReLU CLT)."""

    activation: ClassVar[str] = "batchtopk"
    inference_architecture = "batchtopk_clt"

    topk_threshold_lr: float = 0.01

    @override
    @classmethod
    def architecture(cls) -> str:
        return "batchtopk_clt"


class TrainingCrossLayerTranscoder(TrainingSAE[TrainingCLTConfig]):
    """A CLT as SAELens's trainer trains it; also what circuits, evals and saving read."""

    W_enc: nn.Parameter  # [L, d_in, d_sae]
    b_enc: nn.Parameter  # [L, d_sae]
    b_dec: nn.Parameter  # [L, d_out]
    W_dec: nn.ParameterList  # [i] -> [d_sae, L - i, d_out]
    # Set on one rank's share of a feature-sharded CLT (cfg.d_sae is then that share's width).
    feature_shards: World | None = None

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def n_features(self) -> int:
        """All features, the width of ``feature_acts`` the trainer tracks."""
        return self.cfg.n_layers * self.cfg.d_sae

    @override
    def initialize_weights(self) -> None:
        cfg, L = self.cfg, self.cfg.n_layers
        assert cfg.d_out is not None
        kw: dict[str, Any] = dict(dtype=self.dtype, device=self.device)
        # Anthropic's CLT init: encoders at 1/sqrt(d_sae), decoders at 1/sqrt(L · d_out).
        enc_bound, dec_bound = 1 / math.sqrt(cfg.d_sae), 1 / math.sqrt(L * cfg.d_out)
        self.W_enc = nn.Parameter(torch.empty(L, cfg.d_in, cfg.d_sae, **kw).uniform_(-enc_bound, enc_bound))
        self.b_enc = nn.Parameter(torch.zeros(L, cfg.d_sae, **kw))
        self.W_dec = nn.ParameterList(
            nn.Parameter(torch.empty(cfg.d_sae, L - i, cfg.d_out, **kw).uniform_(-dec_bound, dec_bound)) for i in range(L)
        )
        self.b_dec = nn.Parameter(torch.zeros(L, cfg.d_out, **kw))
        if cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(L, cfg.d_out, cfg.d_in, **kw))
        if self.cfg.activation == "jumprelu":
            threshold = torch.full((L, cfg.d_sae), cfg.jumprelu_init_threshold, **kw)  # type: ignore[attr-defined]
            self.log_threshold = nn.Parameter(torch.log(threshold))
        if self.cfg.activation == "topk":
            self.topk = TopK(cfg.k)  # type: ignore[attr-defined]
        if self.cfg.activation == "batchtopk":
            self.batch_topk = BatchTopK(cfg.k)  # type: ignore[attr-defined]
            # Each layer's running cut, what inference thresholds at (SAELens's BatchTopK rule).
            self.register_buffer("topk_threshold", torch.zeros(L, **kw))
        self._data_init_pending = True

    @property
    def threshold(self) -> torch.Tensor:
        """``[L, d_sae]``: where each feature switches on at inference (JumpReLU and BatchTopK)."""
        if self.cfg.activation == "batchtopk":
            return self.topk_threshold[:, None].expand(-1, self.cfg.d_sae)
        return self.log_threshold.exp()

    # ------------------------------------------------------------------ the model

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., L, d_sae]`` from each layer's input ``x [..., L, d_in]``."""
        return torch.einsum("...ld,lds->...ls", x.to(self.dtype), self.W_enc) + self.b_enc

    def activate(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.activation == "relu":
            return hidden_pre.relu()
        if self.cfg.activation == "jumprelu":
            return JumpReLU.apply(hidden_pre, self.threshold, self.cfg.jumprelu_bandwidth, False)  # type: ignore[attr-defined,no-any-return]
        if self.cfg.activation == "batchtopk":
            if not self.training:
                return hidden_pre * (hidden_pre > self.threshold)
            # Per layer: the k · batch largest of that layer's codes over the whole batch (and every shard).
            batch_topk = self.batch_topk if self.feature_shards is None else lambda x: batch_topk_across_shards(x, self.cfg.k)  # type: ignore[attr-defined]
            return torch.stack([batch_topk(hidden_pre[..., i, :]) for i in range(self.n_layers)], dim=-2)
        if self.feature_shards is not None:  # the top k of every rank's features, not this share's
            return topk_across_shards(hidden_pre, self.cfg.k)  # type: ignore[attr-defined]
        return self.topk(hidden_pre)

    @torch.no_grad()
    def _update_topk_threshold(self, acts: torch.Tensor, first: bool) -> None:
        """Each layer's threshold follows the smallest code its batch kept, as SAELens's BatchTopK;
        the first batch sets it outright (an average from 0 would need hundreds of steps)."""
        lr = 1.0 if first else self.cfg.topk_threshold_lr  # type: ignore[attr-defined]
        smallest = torch.where(acts > 0, acts, torch.inf).flatten(0, -3).amin(0).amin(-1)  # [L], inf: none kept
        if self.feature_shards is not None:  # the smallest code any shard kept
            smallest = min_over_shards(smallest)
        for i in range(self.n_layers):
            if torch.isfinite(smallest[i]):
                self.topk_threshold[i] = (1 - lr) * self.topk_threshold[i] + lr * smallest[i]
        # Data parallel: the minimum of the ranks' cuts is the cut of the global batch's minimum.
        self.topk_threshold.copy_(min_across_replicas(self.topk_threshold))

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = self.pre_activations(x)
        return self.activate(hidden_pre), hidden_pre

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_with_hidden_pre(x)[0]

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """``[..., L, d_out]``: every layer's reconstruction from all features ``[..., L, d_sae]``.

        Each source layer's codes are decoded into all its outputs at once; with
        ``decoder_impl`` ``auto``/``sparse`` a sparse enough layer goes through ``sparse_decode``
        (the same result and gradients, touching only the active decoder rows).
        """
        # Feature sharded, the replicated b_dec is added once, after the shards' parts are summed.
        sharded = self.feature_shards is not None
        batch = feature_acts.shape[:-2]
        out = self.b_dec.new_zeros(*batch, *self.b_dec.shape) if sharded else self.b_dec.expand(*batch, -1, -1).clone()
        for i, decoder in enumerate(self.W_dec):
            acts = feature_acts[..., i, :]
            if not decodes_sparse(self.cfg.decoder_impl, self.cfg.sparse_decode_exact, acts):
                written = torch.einsum("...s,sjd->...jd", acts, decoder)
            else:
                flat = sparse_decode(acts.reshape(-1, acts.shape[-1]), decoder.flatten(1))
                written = flat.reshape(*acts.shape[:-1], *decoder.shape[1:])
            out[..., i:, :] += written
        return self.b_dec + self.sum_over_feature_shards(out) if sharded else out

    def sum_over_feature_shards(self, partial: torch.Tensor) -> torch.Tensor:
        """A sum over features, of which this module holds all, or (feature sharded, see
        ``distributed.feature_shards``) one rank's share: then the sum over every rank's share,
        the same on every rank, whose backward gives each rank its own features' gradients."""
        if self.feature_shards is None:
            return partial
        return sum_over_ranks(partial, self.feature_shards)

    def decoder_norms(self) -> torch.Tensor:
        """``[L, d_sae]``: each feature's decoder norm over every layer it writes to."""
        return torch.stack([decoder.flatten(1).norm(dim=-1) for decoder in self.W_dec])

    def skip_out(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[..., L, d_out]``: each layer's skip term, or None without one."""
        if not self.cfg.skip_connection:
            return None
        return torch.einsum("...ld,lod->...lo", x.to(self.dtype), self.W_skip)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decode(self.encode(x))
        skip = self.skip_out(x)
        return out if skip is None else out + skip

    # ------------------------------------------------------------------ training

    def split_packed(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[batch, L·(d_in + d_out)]`` as laid out by the store → inputs and targets ``[batch, L, d]``."""
        cfg = self.cfg
        assert cfg.d_out is not None
        width = cfg.d_in + cfg.d_out
        if packed.shape[-1] != cfg.n_layers * width:
            raise ValueError(
                f"a CLT over {cfg.n_layers} layers reads [x | y] pairs of width {width}; the batch has width {packed.shape[-1]}."
            )
        pairs = packed.reshape(*packed.shape[:-1], cfg.n_layers, width)
        return pairs[..., : cfg.d_in], pairs[..., cfg.d_in :]

    @torch.no_grad()
    def _initialise_from_data(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The first batch's means start ``b_dec`` (each layer's mean output) and ``b_enc``
        (features reading the centred input), as for per-layer transcoders."""
        # Data parallel: the global batch's means, so every rank's replica starts the same.
        if self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(mean_across_replicas(y.float().mean(0)).to(self.dtype))
        if self.cfg.b_enc_init == "mean_input":
            x_mean = mean_across_replicas(x.float().mean(0)).to(self.dtype)
            self.b_enc.copy_(-torch.einsum("ld,lds->ls", x_mean, self.W_enc))
        self._data_init_pending = False

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        x, y = self.split_packed(step_input.sae_in)
        first = self._data_init_pending and step_input.n_training_steps == 0
        if first:
            self._initialise_from_data(x, y)
        hidden_pre = self.pre_activations(x)
        acts = self.activate(hidden_pre)
        if self.cfg.activation == "batchtopk":
            self._update_topk_threshold(acts, first)
        recon = self.decode(acts)
        # The skip term leaves the target, as for per-layer skip transcoders: the same loss,
        # and what the features are trained (and logged) on is what they must reconstruct.
        skip = self.skip_out(x)
        if skip is not None:
            y = y.to(skip.dtype) - skip
        mse = (recon - y.to(recon.dtype)).pow(2).sum(dim=(-2, -1)).mean()
        losses: dict[str, torch.Tensor] = {"mse_loss": mse}
        losses.update(self._sparsity_losses(acts, hidden_pre, step_input.coefficients))
        return TrainStepOutput(
            sae_in=y.flatten(-2),
            sae_out=recon.flatten(-2),
            feature_acts=acts.flatten(-2),
            hidden_pre=hidden_pre.flatten(-2),
            loss=sum(losses.values(), torch.zeros((), device=mse.device)),
            losses=losses,
        )

    def _sparsity_losses(self, acts: torch.Tensor, hidden_pre: torch.Tensor, coefficients: dict[str, float]) -> dict[str, torch.Tensor]:
        # Sums over features, so a feature shard's part is summed over the shards.
        if self.cfg.activation == "relu":
            l1 = self.sum_over_feature_shards((acts * self.decoder_norms()).sum(dim=(-2, -1)).mean())
            return {"l1_loss": coefficients["l1"] * l1}
        if self.cfg.activation == "jumprelu":
            cfg: JumpReLUCLTConfig = self.cfg  # type: ignore[assignment]
            if cfg.jumprelu_sparsity_loss_mode == "step":
                per_token = Step.apply(hidden_pre, self.threshold, cfg.jumprelu_bandwidth, False).sum(dim=(-2, -1))  # type: ignore[attr-defined]
            else:
                per_token = torch.tanh(cfg.jumprelu_tanh_scale * acts * self.decoder_norms()).sum(dim=(-2, -1))
            return {"l0_loss": coefficients["l0"] * self.sum_over_feature_shards(per_token.mean())}
        return {}

    @override
    def calculate_aux_loss(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # noqa: ARG002
        return {}  # every loss is computed in training_forward_pass

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        if self.cfg.activation == "relu":
            return {"l1": TrainCoefficientConfig(value=self.cfg.l1_coefficient, warm_up_steps=self.cfg.l1_warm_up_steps)}
        if self.cfg.activation == "jumprelu":
            cfg: JumpReLUCLTConfig = self.cfg  # type: ignore[assignment]
            return {"l0": TrainCoefficientConfig(value=cfg.l0_coefficient, warm_up_steps=cfg.l0_warm_up_steps)}
        return {}



CLT_TRAINER_NAME = "clt"  # the CLT's directory in a checkpoint, and its prefix in logs

CLT_CLASSES: dict[str, tuple[type, type]] = {
    "clt": (TrainingCrossLayerTranscoder, TrainingCLTConfig),
    "jumprelu_clt": (TrainingCrossLayerTranscoder, JumpReLUCLTConfig),
    "topk_clt": (TrainingCrossLayerTranscoder, TopKCLTConfig),
    "batchtopk_clt": (TrainingCrossLayerTranscoder, BatchTopKCLTConfig),
}


def is_clt_architecture(architecture: str) -> bool:
    return architecture in CLT_CLASSES
