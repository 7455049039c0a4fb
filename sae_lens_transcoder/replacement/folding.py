"""A transcoder in the model's units: the one place a training-time input scale is folded.

Training may rescale both the MLP input and output by one scalar ``s`` (SAELens's
``expected_average_only_in``); the transcoder then computes ``f(x·s)/s``. Every consumer
(splicing, circuits, exports) wants the same transcoder as a function of the raw input, so
the effective weights are computed here once instead of in each of them.
"""

from dataclasses import dataclass

import torch
from sae_lens.saes.sae import SAE


@dataclass(frozen=True)
class ModelUnits:
    """One transcoder's tensors for raw (unscaled) inputs and outputs, detached.

    Pre-activations are ``x @ W_enc + b_enc``; the output is ``acts @ W_dec + b_dec``
    (+ ``x @ W_skip.T``). ``W_enc`` is None when SAELens's input normalisation is not a
    linear map: features are then not affine in the input (splicing still works, circuits
    do not). ``threshold`` is the JumpReLU threshold (pre-activations are not rescaled).
    """

    W_enc: torch.Tensor | None  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_out]
    b_dec: torch.Tensor  # [d_out]
    threshold: torch.Tensor | None  # [d_sae]
    W_skip: torch.Tensor | None  # [d_out, d_in]


def _input_map(sae: SAE, scale: float) -> float | torch.Tensor | None:  # type: ignore[type-arg]
    """What multiplies the raw input before ``W_enc`` (the scale and SAELens's run-time input
    normalisation): a number in the usual cases, a ``[d_in, d_in]`` matrix, or None if not linear."""
    eye = torch.eye(sae.cfg.d_in, dtype=sae.dtype, device=sae.device) * scale
    with torch.no_grad():
        once, twice = sae.run_time_activation_norm_fn_in(eye), sae.run_time_activation_norm_fn_in(2 * eye)
    if not torch.allclose(twice, 2 * once, rtol=1e-5, atol=1e-6):
        return None
    diagonal = once.diagonal()
    if torch.equal(once, torch.diag(diagonal)) and bool((diagonal == diagonal[0]).all()):
        return float(diagonal[0])
    return once


def fold(sae: SAE, scale: float = 1.0) -> ModelUnits:  # type: ignore[type-arg]
    """``sae`` trained on inputs and outputs multiplied by ``scale``, as a function of raw ones.

    Tensors are the SAE's own (no copy) where ``scale`` is 1 and nothing else rescales.
    """
    with torch.no_grad():
        W_enc = sae.W_enc.detach()
        in_map = _input_map(sae, scale)
        if in_map is None:
            encoder = None
        elif isinstance(in_map, float):
            encoder = W_enc if in_map == 1.0 else W_enc * in_map
        else:
            encoder = in_map @ W_enc
        W_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
        if scale != 1.0:
            W_dec, b_dec = W_dec / scale, b_dec / scale
        threshold = getattr(sae, "threshold", None)
        W_skip = getattr(sae, "W_skip", None)
        return ModelUnits(
            W_enc=encoder,
            b_enc=sae.b_enc.detach(),
            W_dec=W_dec,
            b_dec=b_dec,
            threshold=None if threshold is None else threshold.detach(),
            W_skip=None if W_skip is None else W_skip.detach(),
        )
