"""The encoder matmul of TopK-family and JumpReLU transcoders, with a backward as sparse as its gradient.

TopK, BatchTopK and Matryoshka codes pass gradients back to at most ``k`` (plus AuxK's)
pre-activations per token, so ``dL/d(pre-activations)`` is a few percent dense. Autograd
still computes ``dL/dW_enc = x.T @ G`` as a dense ``[d_in, batch] x [batch, d_sae]`` matmul,
as costly as the forward, plus a dense pass each for the bias and SAELens's decoder-norm
rescale. ``EncoderPreacts`` computes the forward once; its ``hidden_pre`` has a backward that
reads only the non-zeros of ``G`` in the columns whose density is under
``GATHER_MAX_COLUMN_DENSITY`` (where gathering stops being faster) and the denser columns (the
dead latents AuxK trains, features that fire on most tokens) as one dense block. A step that
knows which pre-activations it uses takes them with ``gather`` (the kept codes) and ``columns``
(AuxK's dead latents) instead: their backward starts from those values alone, so the dense
``G`` itself (a zero-fill and scatter per top-k, their sum, the scan for its non-zeros) is never
made. Every gradient equals autograd's dense one (tests check 1e-5).
"""

from typing import Any

import torch
import torch.nn.functional as F

# A column of the gradient denser than this is cheaper as part of one dense block than gathered
# entry by entry. Measured at d_sae 4608, d_in 576, batch 1024, k 32 plus AuxK's 288 codes over
# 1000 or 2500 dead latents (column densities 29% and 11.5%), one CPU thread.
GATHER_MAX_COLUMN_DENSITY = 0.2
# Rows per block of the CPU transpose of the gathered dL/dW_enc (d_sae 4608, d_in 576, 2 threads:
# 256 rows, 0.6 MB a block, was the fastest of 32 to 1152).
TRANSPOSE_BLOCK_ROWS = 256

Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


class EncoderPreacts:
    """One batch's pre-activations ``(x @ W_enc + b_enc) * scale`` (no rescale when ``scale`` is
    None), computed once without a graph, and three ways to take them with a gradient."""

    def __init__(self, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, scale: torch.Tensor | None = None):
        with torch.no_grad():
            raw = torch.addmm(b_enc, x, W_enc)
            self.values = raw if scale is None else raw * scale
        self._raw = raw
        self._params = (x, W_enc, b_enc, scale)
        self.hidden_pre: torch.Tensor = _WholePreacts.apply(self.values, raw, *self._params)

    def gather(self, rows: torch.Tensor, columns: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """The entries ``(rows, columns)`` (``values`` when already read), with a backward over them alone."""
        if values is None:
            values = self.values[rows, columns]
        return _GatheredPreacts.apply(values, rows, columns, self._raw, *self._params)  # type: ignore[no-any-return]

    def take(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``gather`` for ``[batch, k]`` column ``indices`` per row and their ``values``, as ``[batch, k]``."""
        rows = torch.arange(indices.shape[0], device=indices.device).repeat_interleave(indices.shape[1])
        return self.gather(rows, indices.flatten(), values.flatten()).view_as(indices)

    def columns(self, columns: torch.Tensor) -> torch.Tensor:
        """``[batch, len(columns)]``, with a dense backward over those columns alone."""
        return _PreactColumns.apply(self.values.index_select(1, columns), columns, self._raw, *self._params)  # type: ignore[no-any-return]


class _WholePreacts(torch.autograd.Function):
    """``values`` as the whole pre-activations, their gradient taken column by column the cheaper way."""

    @staticmethod
    def forward(ctx, values, raw, x, W_enc, b_enc, scale):  # type: ignore[no-untyped-def,override]
        ctx.save_for_backward(raw, x, W_enc, scale)
        return values

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def,override]
        raw, x, W_enc, scale = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        # AuxK makes the dead latents' columns dense while the rest stay k-sparse: each column
        # takes the cheaper route, a dense block above the crossover density, gathering below.
        rows, cols = grad.nonzero().unbind(1)
        dense = torch.bincount(cols, minlength=grad.shape[1]) > GATHER_MAX_COLUMN_DENSITY * grad.shape[0]
        if not bool(dense.any()):
            return None, None, *_gathered_grads(grad[rows, cols], rows, cols, x, W_enc, raw, scale, needs)
        dense_columns = dense.nonzero().squeeze(1)
        if dense_columns.numel() == grad.shape[1]:
            return None, None, *_column_grads(grad, dense_columns, x, W_enc, raw, scale, needs)
        sparse_entries = ~dense[cols]
        rows, cols = rows[sparse_entries], cols[sparse_entries]
        gathered = _gathered_grads(grad[rows, cols], rows, cols, x, W_enc, raw, scale, needs)
        block = grad.index_select(1, dense_columns)
        return None, None, *_column_grads(block, dense_columns, x, W_enc, raw, scale, needs, into=gathered)


class _GatheredPreacts(torch.autograd.Function):
    """Entries already read from the pre-activations, their gradient gathered from them alone."""

    @staticmethod
    def forward(ctx, values, rows, cols, raw, x, W_enc, b_enc, scale):  # type: ignore[no-untyped-def,override]
        ctx.save_for_backward(rows, cols, raw, x, W_enc, scale)
        return values

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def,override]
        rows, cols, raw, x, W_enc, scale = ctx.saved_tensors
        return None, None, None, None, *_gathered_grads(grad, rows, cols, x, W_enc, raw, scale, ctx.needs_input_grad[4:])


class _PreactColumns(torch.autograd.Function):
    """Columns already read from the pre-activations, their gradient by matmuls over them alone."""

    @staticmethod
    def forward(ctx, block, cols, raw, x, W_enc, b_enc, scale):  # type: ignore[no-untyped-def,override]
        ctx.save_for_backward(cols, raw, x, W_enc, scale)
        return block

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def,override]
        cols, raw, x, W_enc, scale = ctx.saved_tensors
        return None, None, None, *_column_grads(grad, cols, x, W_enc, raw, scale, ctx.needs_input_grad[3:])


def _gathered_grads(
    values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor,
    raw: torch.Tensor, scale: torch.Tensor | None, needs: tuple[bool, ...],
) -> Grads:
    """The gradients of ``x``, ``W_enc``, ``b_enc`` and ``scale`` from the gradient ``values`` of
    the entries ``(rows, cols)`` alone: ``dL/dW_enc`` column ``j`` is the sum of the inputs
    ``x[r]`` of column ``j``'s entries weighted by them, one ``embedding_bag`` over the entries by column."""
    need_x, need_W, need_b, need_scale = needs
    grad_scale = None
    if scale is not None:
        if need_scale:
            grad_scale = torch.zeros_like(scale).index_add_(0, cols, values * raw[rows, cols])
        values = values * scale[cols]  # the gradient w.r.t. the raw pre-activations
    grad_W = None
    if need_W:
        column_nnz = torch.bincount(cols, minlength=W_enc.shape[1])
        by_column = cols.argsort(stable=True)
        offsets = column_nnz.cumsum(0) - column_nnz
        grad_W = transposed(F.embedding_bag(rows[by_column], x, offsets, mode="sum", per_sample_weights=values[by_column]))
    grad_x = None
    if need_x:
        # Valid by construction (indices of the batch), so torch's invariant check is skipped.
        shape = (x.shape[0], W_enc.shape[1])
        entries = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, check_invariants=False)
        grad_x = torch.sparse.mm(entries, W_enc.T)
    grad_b = torch.zeros(W_enc.shape[1], dtype=values.dtype, device=values.device).index_add_(0, cols, values) if need_b else None
    return grad_x, grad_W, grad_b, grad_scale


def transposed(a: torch.Tensor) -> torch.Tensor:
    """``a.T`` for a 2-D ``a``, contiguous on CPU. Autograd copies a transposed gradient into its
    parameter's layout in one strided pass; copying ``TRANSPOSE_BLOCK_ROWS`` rows at a time, which
    stay in cache, is faster on CPU (``benchmarks/jumprelu_step.py``). Other devices get the view."""
    if a.device.type != "cpu":
        return a.t()
    out = a.new_empty(a.shape[1], a.shape[0])
    for start in range(0, a.shape[0], TRANSPOSE_BLOCK_ROWS):
        out[:, start : start + TRANSPOSE_BLOCK_ROWS].copy_(a[start : start + TRANSPOSE_BLOCK_ROWS].t())
    return out


def _column_grads(
    grad: torch.Tensor, cols: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor, raw: torch.Tensor,
    scale: torch.Tensor | None, needs: tuple[bool, ...], into: Grads | None = None,
) -> Grads:
    """The same gradients from the dense gradient ``grad`` ``[batch, len(cols)]`` of the columns
    ``cols``, by dense matmuls over those columns, placed at ``cols`` of ``into`` (gradients that
    are zero there: the gathered ones of the other columns) or of zeros; as they are when ``cols``
    lists every column."""
    need_x, need_W, need_b, need_scale = needs
    every = cols.numel() == W_enc.shape[1]
    into_x, into_W, into_b, into_scale = into or (None, None, None, None)
    W_cols = W_enc if every else W_enc.index_select(1, cols)
    grad_scale = None
    if scale is not None:
        if need_scale:
            part = (grad * (raw if every else raw.index_select(1, cols))).sum(0)
            grad_scale = _place(part, cols, scale.shape, every, into_scale)
        grad = grad * (scale if every else scale.index_select(0, cols))
    grad_x = grad @ W_cols.T if need_x else None
    return (
        grad_x if grad_x is None or into_x is None else grad_x + into_x,
        _place(x.T @ grad, cols, W_enc.shape, every, into_W) if need_W else None,
        _place(grad.sum(0), cols, (W_enc.shape[1],), every, into_b) if need_b else None,
        grad_scale,
    )


def _place(
    part: torch.Tensor, cols: torch.Tensor, shape: tuple[int, ...] | torch.Size, every: bool, into: torch.Tensor | None
) -> torch.Tensor:
    """``part``'s last dimension at ``cols`` of ``into`` (of zeros of ``shape`` when None)."""
    if every:
        return part
    return (part.new_zeros(shape) if into is None else into).index_copy_(-1, cols, part)


def preacts_with_sparse_grad(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``(x @ W_enc + b_enc) * scale`` for ``x`` ``[batch, d_in]``, its backward sparse in the gradient."""
    return EncoderPreacts(x, W_enc, b_enc, scale).hidden_pre


def keeps_sae_lens_encode(sae: Any, x: torch.Tensor) -> bool:
    """Where a sparse training step must run SAELens's own encode: ``decoder_impl: dense``, hooks on
    ``hook_sae_acts_pre`` (the fused op does not run it), inputs other than ``[batch, d_in]``,
    autocast and half precision."""
    hooked = bool(sae.hook_sae_acts_pre._forward_hooks)
    full_precision = sae.W_enc.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(x.device.type)
    return sae.cfg.decoder_impl == "dense" or hooked or x.ndim != 2 or not full_precision
