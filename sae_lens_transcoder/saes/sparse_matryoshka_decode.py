"""The Matryoshka BatchTopK step's nested decodes, made sparse.

SAELens's Matryoshka step decodes the codes once for the whole dictionary and once more for each
inner prefix of ``matryoshka_widths`` (in its loss, and again in its AuxK loss), each a dense
``[batch, width] x [width, d_out]`` matmul with a dense backward, although ~1% of the codes are
non-zero. This mixin sits before ``MatryoshkaBatchTopKTrainingSAE`` in a transcoder's MRO and
decodes each level's own codes with ``embedding_bag`` instead, adding them to the previous
level's output as SAELens does. Outputs and gradients equal the dense ones (tests, 1e-5); a batch
denser than ``SPARSE_DECODE_MAX_DENSITY`` or ``decoder_impl: dense`` keeps SAELens's decode.
"""

from collections.abc import Generator

import torch
from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAEConfig

from sae_lens_transcoder.saes.sparse_decode import bag_offsets, decode_gathered


class SparseMatryoshkaDecode:
    """``_iterable_decode`` of ``MatryoshkaBatchTopKTrainingSAE`` from the non-zero codes alone."""

    cfg: MatryoshkaBatchTopKTrainingSAEConfig
    W_dec: torch.nn.Parameter
    b_dec: torch.nn.Parameter

    def _iterable_decode(
        self, feature_acts: torch.Tensor, include_outer_loss: bool = False
    ) -> Generator[tuple[int, torch.Tensor], None, None]:
        # Overrides a private: SAELens has no seam for the nested decodes' matmul.
        if not self._decodes_sparse(feature_acts):  # type: ignore[attr-defined]
            yield from super()._iterable_decode(feature_acts, include_outer_loss)  # type: ignore[misc]
            return
        kept = self.handed("kept_codes")  # type: ignore[attr-defined]
        if kept is not None and kept[0] is feature_acts and kept[3] is not None:
            # BatchTopK's codes as its encode kept them (row by row, with their own gradient).
            _, columns, values, offsets = kept
            per_row = torch.diff(offsets, append=offsets.new_tensor([columns.numel()]))
            rows = torch.repeat_interleave(torch.arange(feature_acts.shape[0], device=columns.device), per_row)
        else:
            rows, columns = feature_acts.nonzero().unbind(1)  # row by row, as the bags need
            values = feature_acts[rows, columns]
        if self.cfg.rescale_acts_by_decoder_norm:
            values = values * (1 / self.W_dec.norm(dim=-1))[columns]  # SAELens's reciprocal, for equal rounding
        widths = self.cfg.matryoshka_widths if include_outer_loss else self.cfg.matryoshka_widths[:-1]
        decoded, previous = self.b_dec, 0
        for width in widths:
            level = (columns >= previous) & (columns < width)
            offsets = bag_offsets(rows[level], feature_acts.shape[0])
            decoded = decode_gathered(columns[level], values[level], self.W_dec, offsets=offsets) + decoded
            previous = width
            yield width, self.run_time_activation_norm_fn_out(decoded)  # type: ignore[attr-defined]
