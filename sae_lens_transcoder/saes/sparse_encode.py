"""The encoder matmul of TopK-family transcoders, with a backward as sparse as its gradient.

TopK, BatchTopK and Matryoshka codes pass gradients back to at most ``k`` (plus AuxK's)
pre-activations per token, so ``dL/d(pre-activations)`` is a few percent dense. Autograd
still computes ``dL/dW_enc = x.T @ G`` as a dense ``[d_in, batch] x [batch, d_sae]`` matmul,
as costly as the forward, plus a dense pass each for the bias and SAELens's decoder-norm
rescale. ``preacts_with_sparse_grad`` computes the same forward in one op and, in its
backward, converts ``G`` to CSR once and reads only its non-zeros. Its gradients equal
autograd's dense ones (tests check 1e-5); above ``SPARSE_DECODE_MAX_DENSITY`` (where the
CSR matmul stops being faster, measured with the decode's) it takes the dense route.
"""

import warnings

import torch

from sae_lens_transcoder.saes.sparse_decode import SPARSE_DECODE_MAX_DENSITY


class _PreactsWithSparseGrad(torch.autograd.Function):
    """``(x @ W_enc + b_enc) * scale`` (no rescale when ``scale`` is None)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, scale):  # type: ignore[no-untyped-def,override]
        raw = torch.addmm(b_enc, x, W_enc)
        ctx.save_for_backward(x, W_enc, raw if scale is not None else None, scale)
        return raw if scale is None else raw * scale

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def,override]
        x, W_enc, raw, scale = ctx.saved_tensors
        need_x, need_W, need_b, need_scale = ctx.needs_input_grad
        if int(torch.count_nonzero(grad)) > SPARSE_DECODE_MAX_DENSITY * grad.numel():
            grad_scale = (grad * raw).sum(0) if need_scale else None
            grad_raw = grad if scale is None else grad * scale
            return (
                grad_raw @ W_enc.T if need_x else None,
                x.T @ grad_raw if need_W else None,
                grad_raw.sum(0) if need_b else None,
                grad_scale,
            )
        with warnings.catch_warnings():  # torch calls its CSR support beta on first use
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = grad.to_sparse_csr()
        crow, cols, values = csr.crow_indices(), csr.col_indices(), csr.values()
        grad_scale = None
        if scale is not None:
            if need_scale:
                rows = torch.repeat_interleave(torch.arange(grad.shape[0], device=grad.device), crow.diff())
                grad_scale = torch.zeros_like(scale).index_add_(0, cols, values * raw[rows, cols])
            values.mul_(scale[cols])  # csr's own values: the gradient w.r.t. the raw pre-activations
        return (
            csr @ W_enc.T if need_x else None,
            (csr.t() @ x).t() if need_W else None,
            torch.zeros(grad.shape[1], dtype=values.dtype, device=values.device).index_add_(0, cols, values)
            if need_b
            else None,
            grad_scale,
        )


def preacts_with_sparse_grad(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``(x @ W_enc + b_enc) * scale`` for ``x`` ``[batch, d_in]``, its backward sparse in the gradient."""
    return _PreactsWithSparseGrad.apply(x, W_enc, b_enc, scale)  # type: ignore[no-any-return]
