"""Evaluate transcoders spliced into the model they replace an MLP of.

SAELens's ``run_evals`` writes the reconstruction back to the *input* hook and
compares it with the input; for a transcoder both are wrong. Here the prediction
replaces the MLP output and is scored against it, and the CE/KL numbers come from
the model with the MLP(s) replaced.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from sae_lens.saes.sae import SAE
from transformer_lens import HookedTransformer

from sae_lens_transcoder.distributed.collectives import all_reduce_
from sae_lens_transcoder.replacement import ReplacementSet, as_replacement_set
from sae_lens_transcoder.splicing import Splice, ablated, spliced
from sae_lens_transcoder.validation import check_replacement_fits_model

DENSE_FEATURE_FREQUENCY = 0.1


@dataclass
class _ReconstructionSums:
    """Running sums over evaluated tokens for one transcoder."""

    d_sae: int
    n_tokens: int = 0
    sq_error: float = 0.0
    y_sum: torch.Tensor | None = None
    y_sq: float = 0.0
    l0: float = 0.0
    cossim: float = 0.0
    l2_ratio: float = 0.0
    firing: torch.Tensor | None = field(default=None, repr=False)

    def add(self, y: torch.Tensor, y_hat: torch.Tensor, acts: torch.Tensor) -> None:
        y, y_hat, acts = y.double(), y_hat.double(), acts.double()
        self.n_tokens += y.shape[0]
        self.sq_error += (y_hat - y).pow(2).sum().item()
        self.y_sum = y.sum(0) if self.y_sum is None else self.y_sum + y.sum(0)
        self.y_sq += y.pow(2).sum().item()
        fired = (acts > 0).double()
        self.l0 += fired.sum().item()
        self.firing = fired.sum(0) if self.firing is None else self.firing + fired.sum(0)
        self.cossim += F.cosine_similarity(y_hat, y, dim=-1).sum().item()
        self.l2_ratio += (y_hat.norm(dim=-1) / y.norm(dim=-1).clamp(min=1e-12)).sum().item()

    def sum_over_ranks(self) -> None:
        """Every rank's sums added up (each rank evaluated its own tokens)."""
        assert self.y_sum is not None and self.firing is not None, "no tokens evaluated on this rank"
        scalars = torch.tensor([self.n_tokens, self.sq_error, self.y_sq, self.l0, self.cossim, self.l2_ratio], dtype=torch.float64)
        all_reduce_(scalars, what="summing evaluation statistics")
        all_reduce_(self.y_sum, what="summing evaluation statistics")
        all_reduce_(self.firing, what="summing evaluation statistics")
        n_tokens, self.sq_error, self.y_sq, self.l0, self.cossim, self.l2_ratio = scalars.tolist()
        self.n_tokens = int(n_tokens)

    def metrics(self) -> dict[str, object]:
        n = max(self.n_tokens, 1)
        assert self.y_sum is not None and self.firing is not None, "no tokens evaluated"
        total_variance = self.y_sq - self.y_sum.pow(2).sum().item() / n
        fvu = self.sq_error / total_variance if total_variance > 0 else float("nan")
        density = (self.firing / n).float()
        return {
            "l0": self.l0 / n,
            "explained_variance": 1.0 - fvu,
            "fvu": fvu,
            "mse": self.sq_error / (n * self.y_sum.numel()),
            "cossim": self.cossim / n,
            "l2_ratio": self.l2_ratio / n,
            "dead_features": int((density == 0).sum().item()),
            "dense_features": int((density > DENSE_FEATURE_FREQUENCY).sum().item()),
            "feature_density": density,
        }


def _token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position next-token loss, shape [batch, seq - 1]."""
    log_probs = logits[:, :-1].log_softmax(-1).float()
    return -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]


def _kl(clean_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ other) per position, shape [batch, seq - 1]."""
    p = clean_logits[:, :-1].float().log_softmax(-1)
    q = other_logits[:, :-1].float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def _mask(tokens: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    if exclude is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, exclude.to(tokens.device))


def _kept(activations: torch.Tensor, flat_keep: torch.Tensor) -> torch.Tensor:
    """``[batch, pos, d]`` activations at the kept positions, as ``[n_kept, d]``."""
    return activations.reshape(-1, activations.shape[-1])[flat_keep]


def _batches(tokens: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(tokens, torch.Tensor):
        yield from tokens.split(batch_size)
    else:
        yield from tokens


@torch.no_grad()
def evaluate_spliced(
    model: HookedTransformer,
    transcoders: ReplacementSet | Sequence["SAE | Splice"],  # type: ignore[type-arg]
    tokens: torch.Tensor | Iterable[torch.Tensor],
    exclude_special_tokens: Sequence[int] | torch.Tensor | None = None,
    batch_size: int = 8,
    sum_over_ranks: bool = False,
) -> dict[str, object]:
    """Reconstruction and downstream metrics with all ``transcoders`` replacing their MLPs.

    ``tokens``: ``[n_seq, seq]`` ids (or an iterable of batches), already with BOS if
    the model wants one. Positions holding ``exclude_special_tokens`` are left out of
    every metric. Reconstruction metrics are measured on the clean model's activations;
    with several transcoders they are means over transcoders and per-transcoder values are
    in ``per_transcoder``. ``ce_loss_recovered`` = 1 − (spliced − clean)/(zero − clean).
    ``sum_over_ranks``: every rank of the default process group passes its own share of the
    tokens, and all get the metrics of all the tokens (every rank must call it).
    """
    replacement = as_replacement_set(transcoders)
    layers = replacement.layers
    exclude = None if exclude_special_tokens is None else torch.as_tensor(exclude_special_tokens)
    sums = [_ReconstructionSums(replacement.d_sae(layer)) for layer in layers]
    totals = {k: 0.0 for k in ("clean", "spliced", "zero", "mean", "kl")}
    n_positions = 0
    hooks = sorted({h for layer in layers for h in (replacement.hook_in(layer), replacement.hook_out(layer))})
    outs = [replacement.hook_out(layer) for layer in layers]
    check_replacement_fits_model(model, replacement)
    for batch in _batches(tokens, batch_size):
        batch = batch.to(model.cfg.device)
        clean_logits, cache = model.run_with_cache(batch, names_filter=hooks)
        keep = _mask(batch, exclude)
        flat_keep = keep.reshape(-1)
        xs = {layer: _kept(cache[replacement.hook_in(layer)], flat_keep) for layer in layers}
        acts = {layer: replacement.encode(layer, x) for layer, x in xs.items()}
        for layer, acc in zip(layers, sums):
            y = _kept(cache[replacement.hook_out(layer)], flat_keep)
            acc.add(y, replacement.reconstruct(layer, acts, xs[layer]), acts[layer])
        means = {h: _kept(cache[h], flat_keep).mean(0) for h in outs}
        with spliced(model, replacement):
            spliced_logits = model(batch)
        with ablated(model, outs):
            zero_logits = model(batch)
        with ablated(model, outs, means=means):
            mean_logits = model(batch)
        pos = keep[:, :-1]
        n_positions += int(pos.sum().item())
        totals["clean"] += _token_ce(clean_logits, batch)[pos].sum().item()
        totals["spliced"] += _token_ce(spliced_logits, batch)[pos].sum().item()
        totals["zero"] += _token_ce(zero_logits, batch)[pos].sum().item()
        totals["mean"] += _token_ce(mean_logits, batch)[pos].sum().item()
        totals["kl"] += _kl(clean_logits, spliced_logits)[pos].sum().item()
    if sum_over_ranks:
        for acc in sums:
            acc.sum_over_ranks()
        summed = all_reduce_(torch.tensor([n_positions, *totals.values()], dtype=torch.float64), what="summing losses")
        n_positions = int(summed[0].item())
        totals = dict(zip(totals, summed[1:].tolist()))
    if n_positions == 0:
        raise ValueError("evaluate_spliced got no tokens to score (all excluded or empty input).")
    ce = {k: v / n_positions for k, v in totals.items()}
    per_transcoder = [
        {"hook_name": replacement.hook_in(layer), "hook_name_out": replacement.hook_out(layer), **acc.metrics()}
        for layer, acc in zip(layers, sums)
    ]
    result: dict[str, object] = _weighted_mean(per_transcoder)
    result.update(
        ce_loss_clean=ce["clean"],
        ce_loss_spliced=ce["spliced"],
        ce_loss_zero_ablation=ce["zero"],
        ce_loss_mean_ablation=ce["mean"],
        ce_loss_recovered=_recovered(ce["clean"], ce["spliced"], ce["zero"]),
        ce_loss_recovered_mean=_recovered(ce["clean"], ce["spliced"], ce["mean"]),
        kl_div=ce["kl"],
        n_tokens=sums[0].n_tokens if sums else 0,
        per_transcoder=per_transcoder,
    )
    return result


def _recovered(clean: float, spliced_loss: float, ablated_loss: float) -> float:
    gap = ablated_loss - clean
    return float("nan") if gap == 0 else (ablated_loss - spliced_loss) / gap


def _weighted_mean(per_transcoder: list[dict[str, object]]) -> dict[str, object]:
    if len(per_transcoder) == 1:
        return {k: v for k, v in per_transcoder[0].items() if not k.startswith("hook_name")}
    scalar_keys = ("l0", "explained_variance", "fvu", "mse", "cossim", "l2_ratio")
    count_keys = ("dead_features", "dense_features")
    out: dict[str, object] = {
        k: sum(float(m[k]) for m in per_transcoder) / len(per_transcoder)  # type: ignore[arg-type]
        for k in scalar_keys
    }
    out.update({k: sum(int(m[k]) for m in per_transcoder) for k in count_keys})  # type: ignore[call-overload]
    out["feature_density"] = torch.cat([m["feature_density"] for m in per_transcoder])  # type: ignore[misc]
    return out
