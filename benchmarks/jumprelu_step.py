"""The main job's training step, SAELens's dense computation vs ours, and two of its parts, side by side.

Loads the main job's trained ``jumprelu_skip_transcoder`` (``bash scripts/main_job.sh`` writes
it; ``--transcoder`` for another), so the codes are as sparse as late in its run, and steps it
on real SmolLM2 MLP-3 activations of the embedded held-out text at the main job's batch:

* the step (``training_forward_pass`` + backward) with ``decoder_impl: dense`` (SAELens's own
  encode, JumpReLU and decode) and ``auto`` (ours: the gathered decode, the encoder's sparse
  backward and the JumpReLU's backward at the window's entries);
* the gathered ``dL/dW_enc`` (``[d_sae, d_in]`` from its bags by column) into ``W_enc``'s
  ``[d_in, d_sae]`` layout: the one strided copy autograd makes vs ``transposed``'s blocks;
* the JumpReLU's forward and backward: SAELens's ``JumpReLU`` over ``[batch, d_sae]`` vs
  ``WindowJumpReLU`` at the entries above ``threshold - bandwidth``.

Each pair alternates (``--repeats`` rounds) so both see the same machine load; medians in ms.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/jumprelu_step.py [--threads 2] [--batch 256]
"""

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLU
from sae_lens.saes.sae import TrainStepInput

from sae_lens_transcoder.data import load_text_split
from sae_lens_transcoder.hooks import ensure_mlp_hook_in, mlp_in_hook, mlp_out_hook
from sae_lens_transcoder.models import SMOLLM2_MODEL_NAME, load_model
from sae_lens_transcoder.saes.sparse_encode import transposed
from sae_lens_transcoder.saes.sparse_jumprelu_step import WindowJumpReLU
from sae_lens_transcoder.saes.transcoder import TRAINING_CLASSES

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = "jumprelu_skip_transcoder"
L0_COEFFICIENT = 0.07  # the main job's


def real_batch(layer: int, batch: int) -> torch.Tensor:
    """``[x | y]`` of MLP ``layer`` for the first ``batch`` non-BOS positions of the held-out text."""
    model = load_model(SMOLLM2_MODEL_NAME, cache_dir=str(ROOT / ".cache" / "models"))
    ensure_mlp_hook_in(model)
    texts = load_text_split("test")["text"]
    rows: list[torch.Tensor] = []
    for text in texts:
        tokens = model.to_tokens(text)[:, :128]
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=[mlp_in_hook(layer), mlp_out_hook(layer)], stop_at_layer=layer + 1)
        rows.append(torch.cat([cache[mlp_in_hook(layer)][0, 1:], cache[mlp_out_hook(layer)][0, 1:]], dim=-1))
        if sum(r.shape[0] for r in rows) >= batch:
            return torch.cat(rows)[:batch]
    raise SystemExit(f"the held-out text has fewer than {batch} positions")


def training_transcoder(path: Path, impl: str) -> torch.nn.Module:
    """The saved transcoder's weights in our training class (the activation scale is folded into
    them, so it reads raw activations)."""
    saved = SAE.load_from_disk(path, device="cpu")
    sae_cls, cfg_cls = TRAINING_CLASSES[ARCHITECTURE]
    cfg = cfg_cls(d_in=saved.cfg.d_in, d_sae=saved.cfg.d_sae, d_out=saved.cfg.d_out, decoder_impl=impl, l0_coefficient=L0_COEFFICIENT)
    sae = sae_cls(cfg)
    sae.load_state_dict(saved.state_dict())
    return sae


def step_timer(sae: torch.nn.Module, packed: torch.Tensor) -> Callable[[], float]:
    coefficients = {"l0": L0_COEFFICIENT}

    def once() -> float:
        start = time.perf_counter()
        out = sae.training_forward_pass(  # type: ignore[operator]
            TrainStepInput(sae_in=packed, coefficients=coefficients, dead_neuron_mask=None, n_training_steps=1, is_logging_step=False)
        )
        sae.zero_grad(set_to_none=True)
        out.loss.backward()
        return time.perf_counter() - start

    return once


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    def once() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return once


def alternate(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median ms of each timer, run in turns after one warm-up each."""
    for timer in timers.values():
        timer()
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            times[name].append(timer())
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transcoder", type=Path, default=ROOT / "output" / "smollm2-135m-layer3")
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args()
    if not (args.transcoder / "cfg.json").exists():
        raise SystemExit(f"--transcoder {args.transcoder}: no saved transcoder there; run `bash scripts/main_job.sh` first")
    torch.set_num_threads(args.threads)
    packed = real_batch(args.layer, args.batch)
    dense, ours = training_transcoder(args.transcoder, "dense"), training_transcoder(args.transcoder, "auto")
    x = packed[:, : dense.cfg.d_in]
    with torch.no_grad():
        hidden_pre = x @ ours.W_enc + ours.b_enc
    threshold = ours.threshold.detach()
    active = (hidden_pre > threshold).float().sum(-1).mean()
    rows, cols = (hidden_pre > threshold - ours.bandwidth).nonzero(as_tuple=True)
    print(f"{ARCHITECTURE} from {args.transcoder}: d_sae {ours.cfg.d_sae}, batch {args.batch}, L0 {active:.1f}, "
          f"{rows.numel() / hidden_pre.numel():.2%} of the codes above threshold - bandwidth; "
          f"{args.threads} thread(s), median ms of {args.repeats} alternating rounds")

    ms = alternate({"dense": step_timer(dense, packed), "ours": step_timer(ours, packed)}, args.repeats)
    print(f"step (forward + backward): SAELens dense {ms['dense']:.1f}, ours {ms['ours']:.1f} ({ms['dense'] / ms['ours']:.2f}x)")

    by_column = torch.randn(ours.cfg.d_sae, ours.cfg.d_in)
    ms = alternate({"autograd": timed(lambda: by_column.t().contiguous()), "blocks": timed(lambda: transposed(by_column))}, args.repeats)
    print(f"dL/dW_enc into W_enc's layout: one strided copy {ms['autograd']:.2f}, in blocks {ms['blocks']:.2f} "
          f"({ms['autograd'] / ms['blocks']:.2f}x)")

    leaf = hidden_pre.clone().requires_grad_(True)
    grad = torch.randn_like(hidden_pre)

    def jumprelu(window: bool) -> None:
        leaf.grad = None
        if window:
            out = WindowJumpReLU.apply(leaf, threshold, rows, cols, ours.bandwidth, False)
        else:
            out = JumpReLU.apply(leaf, threshold, ours.bandwidth, False)
        out.backward(grad)

    ms = alternate({"sae_lens": timed(lambda: jumprelu(False)), "window": timed(lambda: jumprelu(True))}, args.repeats)
    print(f"JumpReLU forward + backward: SAELens {ms['sae_lens']:.2f}, at the window's entries {ms['window']:.2f} "
          f"({ms['sae_lens'] / ms['window']:.2f}x)")


if __name__ == "__main__":
    main()
