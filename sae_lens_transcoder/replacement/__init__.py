"""Replacement sets: the one seam between transcoders and splicing, evaluations, circuits and exports."""

from sae_lens_transcoder.replacement.base import ReplacementSet
from sae_lens_transcoder.replacement.folding import ModelUnits, fold
from sae_lens_transcoder.replacement.per_layer import PerLayerTranscoders, Splice, as_replacement_set, as_splices

__all__ = ["ModelUnits", "PerLayerTranscoders", "ReplacementSet", "Splice", "as_replacement_set", "as_splices", "fold"]
