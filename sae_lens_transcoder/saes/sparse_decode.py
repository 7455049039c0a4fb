"""Decoding codes that are ~1% dense without paying for the other 99%.

A dense decode ``acts @ W_dec`` and its backward cost three ``[batch, d_sae] x [d_sae, d_out]``
matmuls whatever the sparsity. Here each row's non-zero codes are gathered as one bag of its
own length and decoded with ``embedding_bag``, whose forward and backward (for the codes and
for ``W_dec``) touch only the decoder rows of the batch's codes: a row with many codes (BatchTopK
lets rows differ) costs its own codes, not a padding of every row to it. The result and its
gradients equal the dense computation (tests check 1e-5); which one runs is decided per batch
from the fraction of non-zero codes (see ``SPARSE_DECODE_MAX_DENSITY``).
"""

import torch
import torch.nn.functional as F

from sae_lens_transcoder.saes.sparse_encode import EncoderPreacts

# Above this fraction of the batch's codes non-zero the dense decode runs. Whole TopK steps crossed
# near 5% (2 CPU cores, d_sae 4608, d_out 576, batch 1024: benchmarks/sparse_decode.py); the bag
# decode alone, forward and backward on one thread with uneven rows, is 2.2x faster at 5% and
# crosses near 12%, so 5% errs on the dense side. Training codes are ~1% dense.
SPARSE_DECODE_MAX_DENSITY = 0.05
# AuxK keeps k_aux of the n_dead dead latents per row; above this fraction a dense decode of the
# dead columns (zeros where not kept) beats gathering. Measured at batch 1024, d_out 576, k_aux
# 288, n_dead 100..2500 on one CPU thread: dense 2-3x faster up to 1000 dead, even at 1500.
AUXK_DENSE_MIN_FILL = 0.2


def decodes_sparse(decoder_impl: str, exact: bool, acts: torch.Tensor) -> bool:
    """Whether a training decode of ``acts`` should gather its codes (``sparse``, or ``auto`` at
    most ``SPARSE_DECODE_MAX_DENSITY`` non-zero), where gathering is ``exact`` for the architecture."""
    if decoder_impl == "dense" or not exact:
        return False
    return decoder_impl == "sparse" or float((acts != 0).sum()) <= SPARSE_DECODE_MAX_DENSITY * acts.numel()


def bag_offsets(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Where each row's bag starts among codes listed row by row (``rows`` sorted), for ``embedding_bag``."""
    per_row = torch.bincount(rows, minlength=n_rows)
    return per_row.cumsum(0) - per_row


def decode_gathered(
    indices: torch.Tensor,
    values: torch.Tensor,
    W_dec: torch.Tensor,
    rescale_by_decoder_norm: bool = False,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σ_j values[b, j] · W_dec[indices[b, j]]`` for ``[batch, kmax]`` indices and values
    (divided by the rows' norms first when rescaling, as SAELens's TopK decode); with
    ``offsets``, flat indices and values where row ``b`` starts at ``offsets[b]``."""
    if rescale_by_decoder_norm:
        values = values / W_dec.norm(dim=-1)[indices]
    return F.embedding_bag(indices, W_dec, offsets, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def sparse_decode(acts: torch.Tensor, W_dec: torch.Tensor, rescale_by_decoder_norm: bool = False) -> torch.Tensor:
    """``acts @ W_dec`` (with ``acts / ||W_dec||`` first when rescaling, as SAELens's TopK
    decode), for ``acts`` ``[batch, d_sae]``, from its non-zero codes alone."""
    rows, columns = acts.nonzero().unbind(1)  # row by row, as the bags need
    return decode_gathered(columns, acts[rows, columns], W_dec, rescale_by_decoder_norm, bag_offsets(rows, acts.shape[0]))


def sparse_topk_aux_loss(
    residual: torch.Tensor,
    hidden_pre: torch.Tensor,
    dead_neuron_mask: torch.Tensor,
    W_dec: torch.Tensor,
    rescale_by_decoder_norm: bool = False,
    preacts: EncoderPreacts | None = None,
) -> torch.Tensor:
    """SAELens's AuxK loss before its coefficient and scale: the ``d_out // 2`` largest
    pre-activations of dead latents (at most all of them) reconstruct ``residual``. The
    top-k runs over the dead columns only and they are decoded by gathering, where SAELens
    takes the top-k over a ``[batch, d_sae]`` copy and decodes it with a dense matmul. Where the
    kept codes fill most of the dead columns they are decoded as one dense ``[batch, n_dead]``
    block instead (all of them when there are no more dead latents than ``k_aux``). With the
    step's ``preacts`` (of which ``hidden_pre`` is the whole), the gradient reaches the encoder
    from the kept codes or the dead columns alone (``EncoderPreacts``)."""
    dead = dead_neuron_mask.nonzero().squeeze(1)
    k_aux = min(residual.shape[-1] // 2, dead.numel())
    gathered = k_aux < AUXK_DENSE_MIN_FILL * dead.numel()
    if gathered:
        with torch.no_grad():
            values, which = hidden_pre.detach().index_select(-1, dead).topk(k_aux, dim=-1, sorted=False)
        columns = dead[which]
        values = hidden_pre.gather(-1, columns) if preacts is None else preacts.take(columns, values)
        recons = decode_gathered(columns, values, W_dec, rescale_by_decoder_norm)
        return (recons - residual).pow(2).sum(dim=-1).mean()
    dead_pre = hidden_pre.index_select(-1, dead) if preacts is None else preacts.columns(dead)
    if k_aux < dead.numel():
        values, which = dead_pre.topk(k_aux, dim=-1, sorted=False)
        dead_pre = torch.zeros_like(dead_pre).scatter(-1, which, values)
    dead_W_dec = W_dec.index_select(0, dead)
    if rescale_by_decoder_norm:
        dead_pre = dead_pre / dead_W_dec.norm(dim=-1)
    recons = dead_pre @ dead_W_dec
    return (recons - residual).pow(2).sum(dim=-1).mean()
