"""Running per-feature summaries of a token stream that never hold all activations.

Two pieces, both vectorised over features: ``KeptContexts`` keeps, per feature, the ``k``
sequences with the highest keys (the top activations when the key is the sequence's max
activation; a uniform random sample of active sequences when the key is a random number,
i.e. a bottom-k sketch), each with its window of tokens and activations; ``GrowingHistogram``
counts active values in fine bins whose width doubles whenever a larger value arrives, so
its counts are exact at the resolution reached (at worst ``max / (resolution / 2)``).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAD_TOKEN = -1  # window positions beyond a sequence's ends


@dataclass
class KeptContexts:
    """Per feature, the ``k`` sequences with the highest keys seen so far.

    ``keys``, ``values`` (the sequence's max activation), ``sequences`` (global index) and
    ``positions`` (of the max) are ``[n_features, k]``; ``acts`` and ``tokens`` are the windows
    ``[n_features, k, before + 1 + after]`` centred on the max. Empty slots have key ``-inf``.
    """

    keys: torch.Tensor
    values: torch.Tensor
    sequences: torch.Tensor
    positions: torch.Tensor
    acts: torch.Tensor
    tokens: torch.Tensor
    before: int
    after: int

    @classmethod
    def empty(cls, n_features: int, k: int, before: int, after: int) -> "KeptContexts":
        width = before + 1 + after
        return cls(
            keys=torch.full((n_features, k), -torch.inf),
            values=torch.zeros(n_features, k),
            sequences=torch.full((n_features, k), -1, dtype=torch.long),
            positions=torch.zeros(n_features, k, dtype=torch.long),
            acts=torch.zeros(n_features, k, width),
            tokens=torch.full((n_features, k, width), PAD_TOKEN, dtype=torch.long),
            before=before,
            after=after,
        )

    @property
    def k(self) -> int:
        return self.keys.shape[1]

    def update(self, keys: torch.Tensor, acts: torch.Tensor, tokens: torch.Tensor, offset: int) -> None:
        """Merge one batch: ``keys [batch, n_features]`` (one per sequence and feature),
        activations ``[batch, seq, n_features]``, token ids ``[batch, seq]`` whose first
        sequence has global index ``offset``."""
        n_features, k = self.keys.shape
        values, positions = acts.max(dim=1)  # [batch, n_features]
        merged = torch.cat([self.keys, keys.T], dim=1)
        order = merged.topk(k, dim=1).indices  # [n_features, k]
        is_new = order >= k
        old = order.clamp(max=k - 1)
        row = (order - k).clamp(min=0)  # the batch sequence of a new entry
        pos = positions.T.gather(1, row)
        features = torch.arange(n_features)[:, None, None]
        span = pos[..., None] + torch.arange(self.before + 1 + self.after)  # in padded coordinates
        padded_acts = F.pad(acts, (0, 0, self.before, self.after))
        padded_tokens = F.pad(tokens, (self.before, self.after), value=PAD_TOKEN)
        new_acts = padded_acts[row[..., None], span, features]
        new_tokens = padded_tokens[row[..., None], span]

        def pick(current: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            kept = current.gather(1, old if current.dim() == 2 else old[..., None].expand_as(current))
            return torch.where(is_new if current.dim() == 2 else is_new[..., None], new, kept)

        self.keys = merged.gather(1, order)
        self.values = pick(self.values, values.T.gather(1, row))
        self.sequences = pick(self.sequences, row + offset)
        self.positions = pick(self.positions, pos)
        self.acts = pick(self.acts, new_acts)
        self.tokens = pick(self.tokens, new_tokens)


@dataclass
class GrowingHistogram:
    """Counts of each feature's positive values in ``resolution`` bins of width ``width[f]``.

    The first positive value of a feature sets its width; a later value beyond the last bin
    merges bins pairwise (width doubles) until it fits, so no value is ever dropped.
    """

    counts: torch.Tensor  # [n_features, resolution]
    width: torch.Tensor  # [n_features]; 0 until the feature's first positive value

    @classmethod
    def empty(cls, n_features: int, resolution: int) -> "GrowingHistogram":
        if resolution < 2 or resolution & (resolution - 1):
            raise ValueError(f"histogram resolution={resolution} must be a power of two (bins merge pairwise).")
        return cls(torch.zeros(n_features, resolution, dtype=torch.long), torch.zeros(n_features, dtype=torch.float64))

    @property
    def resolution(self) -> int:
        return self.counts.shape[1]

    def add(self, values: torch.Tensor) -> None:
        """Count the positive entries of ``values [n, n_features]``."""
        values = values.double()
        active = values > 0
        batch_max = torch.where(active, values, 0.0).amax(dim=0)
        fresh = (self.width == 0) & (batch_max > 0)
        self.width[fresh] = batch_max[fresh] / self.resolution * 2  # room for a value twice as large
        self._grow(batch_max)
        bins = (values / self.width.clamp_min(1e-300)).floor().long().clamp(0, self.resolution - 1)
        flat = bins + torch.arange(values.shape[1]) * self.resolution
        self.counts.view(-1).index_add_(0, flat[active], torch.ones(int(active.sum()), dtype=torch.long))

    def _grow(self, batch_max: torch.Tensor) -> None:
        needed = torch.ceil(torch.log2(batch_max / (self.width * self.resolution))).clamp_min(0)
        needed = torch.where(self.width > 0, torch.nan_to_num(needed, nan=0.0, posinf=0.0), 0.0)
        for doublings in needed.unique().tolist():
            if doublings == 0:
                continue
            rows = (needed == doublings).nonzero().squeeze(1)
            factor = min(2 ** int(doublings), self.resolution)
            merged = self.counts[rows].view(len(rows), self.resolution // factor, factor).sum(-1)
            self.counts[rows] = F.pad(merged, (0, self.resolution - merged.shape[1]))
            self.width[rows] *= 2 ** int(doublings)

    def edges(self, feature: int) -> torch.Tensor:
        """``[resolution + 1]`` bin edges of ``feature``."""
        return torch.arange(self.resolution + 1, dtype=torch.float64) * self.width[feature]

    def quantiles(self, feature: int, levels: torch.Tensor) -> torch.Tensor:
        """The values below which ``levels`` (in [0, 1]) of the feature's positive values lie,
        interpolated linearly inside bins."""
        counts = self.counts[feature].double()
        total = counts.sum()
        if total == 0:
            return torch.zeros(len(levels), dtype=torch.float64)
        cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), counts.cumsum(0)]) / total
        edges = self.edges(feature)
        upper = torch.searchsorted(cumulative, levels.double().clamp(0, 1), side="left").clamp(1, self.resolution)
        low, high = cumulative[upper - 1], cumulative[upper]
        frac = torch.where(high > low, (levels - low) / (high - low), 0.0).clamp(0, 1)
        return edges[upper - 1] + frac * (edges[upper] - edges[upper - 1])

    def rebinned(self, feature: int, n_bins: int, top: float) -> list[int]:
        """Counts in ``n_bins`` equal bins over ``[0, top]``, each fine bin placed by its centre."""
        centres = (torch.arange(self.resolution, dtype=torch.float64) + 0.5) * self.width[feature]
        target = (centres / max(top, 1e-300) * n_bins).floor().long().clamp(0, n_bins - 1)
        out = torch.zeros(n_bins, dtype=torch.long)
        out.index_add_(0, target, self.counts[feature])
        return out.tolist()


_MASK = 0xFFFFFFFF


def hash_uniform(sequences: torch.Tensor, streams: torch.Tensor, seed: int) -> torch.Tensor:
    """``[len(sequences), len(streams)]`` pseudo-random numbers in [0, 1), a fixed function of
    (sequence, stream, seed): a random sample keyed by them is the same whatever the batch
    size or the split of features into passes. (A 32-bit integer mix, lowbias32-style.)"""
    x = (sequences.long()[:, None] * 0x9E3779B1 + streams.long()[None, :] * 0x85EBCA77 + seed * 0xC2B2AE3D) & _MASK
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = ((x ^ (x >> shift)) * multiplier) & _MASK
    x = x ^ (x >> 16)
    return (x >> 8).double().div(1 << 24).float()
