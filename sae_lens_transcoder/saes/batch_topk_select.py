"""SAELens's BatchTopK selection without a top-k over the whole batch's codes.

BatchTopK keeps the ``k * batch`` largest ReLU'd pre-activations of a batch, and SAELens finds
them with one ``topk`` over all ``batch * d_sae`` of them: at d_sae 4608 and batch 1024 that is a
top-32,768 of 4.7M values, the costliest op of the training step on CPU. Here each row first
keeps its ``CANDIDATES_PER_K * k`` largest pre-activations, and the batch's top ``k * batch`` is
taken among those. A row whose smallest candidate is not below that cut may hold kept codes
outside its candidates, so such rows take part with all their codes and the cut is taken again
(it can only rise, so the other rows stay safely below it): the same selection as SAELens's.
Where the cut is not positive (fewer positive codes than ``k * batch``) SAELens's own runs.
"""

import math

import torch

# Candidates per row, in multiples of k. A row-wise top-8k costs about two thirds of the
# batch-wide top-k it replaces (d_sae 4608, batch 1024, k 32, one CPU thread), and BatchTopK rows
# rarely hold more (the densest of 1024 rows at k 32 about 250 codes).
CANDIDATES_PER_K = 8


def batch_topk_codes(hidden_pre: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Rows, columns and values of the codes SAELens's ``BatchTopK(k)`` keeps in ``hidden_pre``
    ``[batch, d_sae]``, row by row (values read from ``hidden_pre``, with its gradient if it has one), or None
    where it must run itself."""
    batch, d_sae = hidden_pre.shape
    n_keep = int(k * batch)
    n_candidates = CANDIDATES_PER_K * math.ceil(k)
    if n_candidates >= d_sae // 2 or not 0 < n_keep <= batch * n_candidates:
        return None
    with torch.no_grad():
        candidates, columns = hidden_pre.topk(n_candidates, dim=-1, sorted=False)
        cut = candidates.flatten().topk(n_keep, sorted=False).values.min()
        whole = candidates.min(dim=-1).values >= cut  # rows that may keep codes beyond their candidates
        row_ids = torch.arange(batch, device=hidden_pre.device)
        pool = torch.cat([candidates[~whole].flatten(), hidden_pre[whole].flatten()])
        pool_flat = torch.cat([
            (row_ids[~whole, None] * d_sae + columns[~whole]).flatten(),
            (row_ids[whole, None] * d_sae + torch.arange(d_sae, device=hidden_pre.device)).flatten(),
        ])
        kept, where = pool.topk(n_keep, sorted=False)
        if kept.min() <= 0:
            return None
        flat = pool_flat[where].sort().values  # row by row, as the decode's bags need
    rows, cols = flat // d_sae, flat % d_sae
    return rows, cols, hidden_pre[rows, cols]  # positive, so ReLU leaves them as they are
