"""The TopK family's training step (TopK, BatchTopK, Matryoshka) with its dense parts made sparse.

Two pieces of SAELens's ``TopKTrainingSAE`` step cost as much as the rest of it while touching
only a few percent of the features: AuxK decodes the dead latents with a dense ``[batch, d_sae]``
matmul, and the encoder's backward computes ``dL/dW_enc`` densely although only the kept and
AuxK codes carry a gradient. This mixin sits before the SAELens class in a transcoder's MRO and
replaces both with equal computations (tests: losses and gradients 1e-5): AuxK over the dead
columns only (``sparse_decode.sparse_topk_aux_loss``) and an encoder backward that starts from the kept
codes and AuxK's columns alone (``sparse_encode.EncoderPreacts``).
A TopK activation also hands the decode the codes it kept, which the decode would otherwise
find again with a second top-k over ``[batch, d_sae]``; BatchTopK selects its codes row-wise
first (``batch_topk_select``) and hands them on too.
``decoder_impl: dense`` keeps SAELens's own step.
"""

import torch
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.topk_sae import TopK, TopKTrainingSAEConfig

from sae_lens_transcoder.saes.batch_topk_select import batch_topk_codes
from sae_lens_transcoder.saes.sparse_decode import bag_offsets, sparse_topk_aux_loss
from sae_lens_transcoder.saes.sparse_encode import EncoderPreacts, keeps_sae_lens_encode


class SparseTopKStep:
    """``encode_with_hidden_pre`` and ``calculate_topk_aux_loss`` of ``TopKTrainingSAE``, sparse."""

    cfg: TopKTrainingSAEConfig
    W_enc: torch.nn.Parameter
    W_dec: torch.nn.Parameter
    b_enc: torch.nn.Parameter

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAELens's TopK encode, its matmul, bias and decoder-norm rescale computed once
        (``EncoderPreacts``) and the kept codes taken from it with a gradient of their own, so
        the backward never makes a dense ``[batch, d_sae]`` gradient: SAELens has no seam for the
        encoder matmul. Hooks on ``hook_sae_acts_pre`` (which sees the pre-activations before the
        rescale), autocast and half precision keep SAELens's own encode."""
        if keeps_sae_lens_encode(self, x):
            return super().encode_with_hidden_pre(x)  # type: ignore[misc,no-any-return]
        sae_in = self.process_sae_in(x)  # type: ignore[attr-defined]
        scale = self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        preacts = EncoderPreacts(sae_in, self.W_enc, self.b_enc, scale)
        hidden_pre = preacts.hidden_pre
        self.hand_on(encoder_preacts=preacts)  # type: ignore[attr-defined]  # AuxK takes the dead columns from it
        activation = self.activation_fn  # type: ignore[attr-defined]
        # A hook on the codes may change them, and then the decode must read what it returned.
        codes_hooked = bool(self.hook_sae_acts_post._forward_hooks)  # type: ignore[attr-defined]
        if type(activation) is BatchTopK and not codes_hooked and (codes := batch_topk_codes(preacts.values, activation.k)):
            rows, columns, values = codes
            values = preacts.gather(rows, columns, values)
            feature_acts = torch.zeros_like(hidden_pre).index_put_((rows, columns), values)
            self.remember_kept_codes(feature_acts, columns, values, bag_offsets(rows, hidden_pre.shape[0]))  # type: ignore[attr-defined]
            return self.hook_sae_acts_post(feature_acts), hidden_pre  # type: ignore[attr-defined]
        if type(activation) is not TopK or activation.use_sparse_activations or codes_hooked:
            return self.hook_sae_acts_post(activation(hidden_pre)), hidden_pre  # type: ignore[attr-defined]
        # SAELens's TopK, with the kept indices and values in hand: its module returns only the dense codes.
        with torch.no_grad():
            values, indices = preacts.values.topk(activation.k, dim=-1, sorted=False)
        values = preacts.take(indices, values).relu()
        feature_acts = self.hook_sae_acts_post(torch.zeros_like(hidden_pre).scatter_(-1, indices, values))  # type: ignore[attr-defined]
        self.remember_kept_codes(feature_acts, indices, values)  # type: ignore[attr-defined]
        return feature_acts, hidden_pre

    def calculate_topk_aux_loss(
        self,
        sae_in: torch.Tensor,
        sae_out: torch.Tensor,
        hidden_pre: torch.Tensor,
        dead_neuron_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """SAELens's AuxK loss computed over the dead columns alone; ``sae_in`` is the
        transcoder's target (the mixin's step input), so AuxK reconstructs the target's residual."""
        dense = self.cfg.decoder_impl == "dense" or hidden_pre.ndim != 2  # type: ignore[attr-defined]
        if not dense and self.cfg.aux_loss_coefficient == 0:
            return sae_out.new_tensor(0.0)  # AuxK turned off (as sparsify's default): nothing to compute
        if dense or dead_neuron_mask is None or (num_dead := int(dead_neuron_mask.sum())) == 0:
            return super().calculate_topk_aux_loss(sae_in, sae_out, hidden_pre, dead_neuron_mask)  # type: ignore[misc,no-any-return]
        scale = min(num_dead / (sae_in.shape[-1] // 2), 1.0)
        residual = (sae_in - sae_out).detach()
        preacts = self.handed("encoder_preacts")  # type: ignore[attr-defined]
        if preacts is not None and preacts.hidden_pre is not hidden_pre:
            preacts = None
        loss = sparse_topk_aux_loss(
            residual, hidden_pre, dead_neuron_mask, self.W_dec, self.cfg.rescale_acts_by_decoder_norm, preacts
        )
        return self.cfg.aux_loss_coefficient * scale * loss
