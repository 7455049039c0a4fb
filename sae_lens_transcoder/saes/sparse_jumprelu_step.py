"""JumpReLU's training decode made sparse without losing its straight-through threshold gradient.

A decode of the non-zero codes alone is not exact for JumpReLU: its straight-through estimator
reads dL/d(code) wherever the pre-activation lies within half a bandwidth of the threshold,
including just below it, where the code is zero. This mixin sits before SAELens's
``JumpReLUTrainingSAE`` in a transcoder's MRO and hands the decode, per token, every feature whose
pre-activation is above ``threshold - bandwidth`` (the active codes and the whole window, with
half a bandwidth to spare for rounding). The decode gathers them with ``embedding_bag``: the zero
codes among them add nothing to the output and still receive their gradient, so losses and
gradients equal SAELens's dense step (tests). Each token's set is one bag of its own length, so
a few tokens reaching many features do not pad the rest. Where the sets hold more than
``SPARSE_DECODE_MAX_DENSITY`` of the batch's codes the dense decode is faster and runs instead;
``decoder_impl: dense`` always keeps it. The encoder's backward reads only the gradient's
non-zeros too (``sparse_encode``, as the TopK family's step), and so does the JumpReLU's own
backward (``WindowJumpReLU``): its masks and straight-through terms are taken at the same
entries, not over the whole ``[batch, d_sae]``.
"""

from typing import Any

import torch
from sae_lens.saes.jumprelu_sae import JumpReLU, JumpReLUTrainingSAEConfig, rectangle

from sae_lens_transcoder.saes.sparse_decode import SPARSE_DECODE_MAX_DENSITY, bag_offsets
from sae_lens_transcoder.saes.sparse_encode import keeps_sae_lens_encode, preacts_with_sparse_grad


class SparseJumpReLUStep:
    """``encode_with_hidden_pre`` of ``JumpReLUTrainingSAE``, remembering the codes its decode needs."""

    cfg: JumpReLUTrainingSAEConfig
    W_enc: torch.nn.Parameter
    b_enc: torch.nn.Parameter
    threshold: torch.nn.Parameter
    bandwidth: float

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAELens's JumpReLU encode with the encoder matmul's backward sparse in the gradient (which
        is non-zero only at the active codes, and within the window where the straight-through
        estimator reaches the input): SAELens has no seam for the encoder matmul. Hooks on
        ``hook_sae_acts_pre``, autocast and half precision keep SAELens's own encode."""
        if keeps_sae_lens_encode(self, x):
            return super().encode_with_hidden_pre(x)  # type: ignore[misc,no-any-return]
        hidden_pre = preacts_with_sparse_grad(self.process_sae_in(x), self.W_enc, self.b_enc)  # type: ignore[attr-defined]
        threshold = self.threshold.to(hidden_pre.dtype)
        with torch.no_grad():
            reached = hidden_pre > threshold - self.bandwidth
            rows, columns = reached.nonzero(as_tuple=True)
        ste_to_input = self.cfg.jumprelu_ste_to_input
        if columns.numel() > SPARSE_DECODE_MAX_DENSITY * reached.numel():
            feature_acts = JumpReLU.apply(hidden_pre, threshold, self.bandwidth, ste_to_input)
            return self.hook_sae_acts_post(feature_acts), hidden_pre  # type: ignore[attr-defined]
        feature_acts = WindowJumpReLU.apply(hidden_pre, threshold, rows, columns, self.bandwidth, ste_to_input)
        feature_acts = self.hook_sae_acts_post(feature_acts)  # type: ignore[attr-defined]
        # A hook on the codes may make codes non-zero outside the window: decode them densely.
        if self.hook_sae_acts_post._forward_hooks:  # type: ignore[attr-defined]
            return feature_acts, hidden_pre
        # Each token's codes as one bag of variable length: rows have as many as they reach, unpadded.
        offsets = bag_offsets(rows, reached.shape[0])
        self.remember_kept_codes(feature_acts, columns, feature_acts[rows, columns], offsets)  # type: ignore[attr-defined]
        return feature_acts, hidden_pre


class WindowJumpReLU(torch.autograd.Function):
    """SAELens's ``JumpReLU`` given the entries ``(rows, cols)`` of every pre-activation above
    ``threshold - bandwidth``: the same codes and gradients, its backward taken at those entries
    alone. Its input gradient is non-zero only where a code is active and its straight-through
    terms only within half a bandwidth of the threshold, all inside that set."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden_pre: torch.Tensor, threshold: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
        bandwidth: float, ste_to_input: bool,
    ) -> torch.Tensor:
        values, thresholds = hidden_pre[rows, cols], threshold[cols]
        ctx.save_for_backward(rows, cols, values, thresholds)
        ctx.bandwidth, ctx.ste_to_input, ctx.shape = bandwidth, ste_to_input, hidden_pre.shape
        return torch.zeros_like(hidden_pre).index_put_((rows, cols), values * (values > thresholds))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None, None, None]:  # type: ignore[override]
        rows, cols, values, thresholds = ctx.saved_tensors
        grad = grad_output[rows, cols]
        # SAELens's JumpReLU backward, entry by entry.
        ste = (thresholds / ctx.bandwidth) * rectangle((values - thresholds) / ctx.bandwidth) * grad
        threshold_grad = grad.new_zeros(ctx.shape[1]).index_add_(0, cols, -ste)
        input_grad = (values > thresholds) * grad
        if ctx.ste_to_input:
            input_grad = input_grad + ste
        return grad.new_zeros(ctx.shape).index_put_((rows, cols), input_grad), threshold_grad, None, None, None, None
