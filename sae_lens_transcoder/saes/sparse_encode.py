"""The encoder matmul of TopK-family and JumpReLU transcoders, with a backward as sparse as its gradient.

TopK, BatchTopK and Matryoshka codes pass gradients back to at most ``k`` (plus AuxK's)
pre-activations per token, so ``dL/d(pre-activations)`` is a few percent dense. Autograd
still computes ``dL/dW_enc = x.T @ G`` as a dense ``[d_in, batch] x [batch, d_sae]`` matmul,
as costly as the forward, plus a dense pass each for the bias and SAELens's decoder-norm
rescale. ``preacts_with_sparse_grad`` computes the same forward in one op and, in its
backward, reads only the non-zeros of ``G`` (gathered once) in the columns whose density is
under ``GATHER_MAX_COLUMN_DENSITY`` (where gathering stops being faster); the columns above it
(the dead latents AuxK trains, features that fire on most tokens) go as one dense block. Its
gradients equal autograd's dense ones (tests check 1e-5).
"""

from typing import Any

import torch
import torch.nn.functional as F

# A column of the gradient denser than this is cheaper as part of one dense block than gathered
# entry by entry. Measured at d_sae 4608, d_in 576, batch 1024, k 32 plus AuxK's 288 codes over
# 1000 or 2500 dead latents (column densities 29% and 11.5%), one CPU thread.
GATHER_MAX_COLUMN_DENSITY = 0.2


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
        needs = ctx.needs_input_grad
        # AuxK makes the dead latents' columns dense while the rest stay k-sparse: each column
        # takes the cheaper route, a dense block above the crossover density, gathering below.
        rows, cols = grad.nonzero().unbind(1)
        column_nnz = torch.bincount(cols, minlength=grad.shape[1])
        dense = column_nnz > GATHER_MAX_COLUMN_DENSITY * grad.shape[0]
        dense_columns = dense.nonzero().squeeze(1)
        if dense_columns.numel() == grad.shape[1]:
            return _dense_grads(grad, x, W_enc, raw, scale, needs)
        if dense_columns.numel() == 0:
            return _gathered_grads(grad, rows, cols, column_nnz, x, W_enc, raw, scale, needs)
        sparse_entries = ~dense[cols]
        rows, cols = rows[sparse_entries], cols[sparse_entries]
        grads = _gathered_grads(grad, rows, cols, column_nnz.masked_fill(dense, 0), x, W_enc, raw, scale, needs)
        block = _dense_grads(
            grad.index_select(1, dense_columns),
            x,
            W_enc.index_select(1, dense_columns),
            None if raw is None else raw.index_select(1, dense_columns),
            None if scale is None else scale.index_select(0, dense_columns),
            needs,
        )
        grad_x, grad_W, grad_b, grad_scale = grads
        block_x, block_W, block_b, block_scale = block
        return (
            None if grad_x is None else grad_x + block_x,
            None if grad_W is None else grad_W.index_copy_(1, dense_columns, block_W),
            None if grad_b is None else grad_b.index_copy_(0, dense_columns, block_b),
            None if grad_scale is None else grad_scale.index_copy_(0, dense_columns, block_scale),
        )


Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def _dense_grads(
    grad: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor, raw: torch.Tensor | None,
    scale: torch.Tensor | None, needs: tuple[bool, ...],
) -> Grads:
    """The gradients of ``(x @ W_enc + b) * scale`` by dense matmuls."""
    need_x, need_W, need_b, need_scale = needs
    grad_scale = (grad * raw).sum(0) if need_scale else None
    grad_raw = grad if scale is None else grad * scale
    return (
        grad_raw @ W_enc.T if need_x else None,
        x.T @ grad_raw if need_W else None,
        grad_raw.sum(0) if need_b else None,
        grad_scale,
    )


def _gathered_grads(
    grad: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, column_nnz: torch.Tensor, x: torch.Tensor,
    W_enc: torch.Tensor, raw: torch.Tensor | None, scale: torch.Tensor | None, needs: tuple[bool, ...],
) -> Grads:
    """The same gradients from the entries ``(rows, cols)`` of ``grad`` alone (``column_nnz``
    of them per column): ``dL/dW_enc`` column ``j`` is the sum of the inputs ``x[r]`` of
    column ``j``'s entries weighted by them, one ``embedding_bag`` over the entries by column."""
    need_x, need_W, need_b, need_scale = needs
    values = grad[rows, cols]
    grad_scale = None
    if scale is not None:
        if need_scale:
            grad_scale = torch.zeros_like(scale).index_add_(0, cols, values * raw[rows, cols])  # type: ignore[index]
        values = values * scale[cols]  # the gradient w.r.t. the raw pre-activations
    grad_W = None
    if need_W:
        by_column = cols.argsort(stable=True)
        offsets = column_nnz.cumsum(0) - column_nnz
        grad_W = F.embedding_bag(rows[by_column], x, offsets, mode="sum", per_sample_weights=values[by_column]).t()
    grad_x = None
    if need_x:
        # Valid by construction (indices of grad), so torch's invariant check is skipped.
        entries = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, grad.shape, check_invariants=False)
        grad_x = torch.sparse.mm(entries, W_enc.T)
    return (
        grad_x,
        grad_W,
        torch.zeros(grad.shape[1], dtype=values.dtype, device=values.device).index_add_(0, cols, values) if need_b else None,
        grad_scale,
    )


def preacts_with_sparse_grad(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``(x @ W_enc + b_enc) * scale`` for ``x`` ``[batch, d_in]``, its backward sparse in the gradient."""
    return _PreactsWithSparseGrad.apply(x, W_enc, b_enc, scale)  # type: ignore[no-any-return]


def keeps_sae_lens_encode(sae: Any, x: torch.Tensor) -> bool:
    """Where a sparse training step must run SAELens's own encode: ``decoder_impl: dense``, hooks on
    ``hook_sae_acts_pre`` (the fused op does not run it), inputs other than ``[batch, d_in]``,
    autocast and half precision."""
    hooked = bool(sae.hook_sae_acts_pre._forward_hooks)
    full_precision = sae.W_enc.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(x.device.type)
    return sae.cfg.decoder_impl == "dense" or hooked or x.ndim != 2 or not full_precision
