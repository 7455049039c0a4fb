"""EleutherAI sparsify's side of a transcoder benchmark: one TopK transcoder, in sparsify's own venv.

    python3 -m venv /work/sparsify-venv
    /work/sparsify-venv/bin/pip install torch==2.13.0      # the local CPU wheel
    /work/sparsify-venv/bin/pip install eai-sparsify==1.3.3  # transformers unpinned: 5.24.0

    /work/sparsify-venv/bin/python benchmarks/_sparsify_worker.py --model-dir DIR --tokens FILE.pt \
        --layer 3 --k 32 --d-sae 4608 --batch-tokens 1024 --out OUTDIR [--lr LR] [--seed 0] \
        [--threads N] [--exclude-tokens ID ...]

Imports only torch, transformers, safetensors, sparsify and the standard library (never this
package). DIR is a Hugging Face model directory (``config.json``, ``model.safetensors``)
written by the driver from our venv; FILE.pt is an int64 tensor ``[n_sequences, context]`` of
token ids. The worker trains one sparsify transcoder (``transcode=True``: input = what
``layers[layer].mlp`` reads, i.e. the post-RMSNorm residual with the norm weight applied;
target = that MLP's output) with sparsify's public ``Trainer`` on exactly these tokens, in
this order, one pass. Everything not given on the command line is sparsify's default: the
signum optimizer (SignSGD in a schedule-free wrapper, momentum 0.95), its lr
``5e-3 / sqrt(d_sae / 2**14)``, FVU loss, ``auxk_alpha = 0`` (AuxK off), no k decay, no
skip, its data-dependent bias init on the first batch; every position is trained on
unless ``--exclude-tokens`` names ids (sparsify's default excludes none).

Order: sparsify's Trainer builds ``DataLoader(shuffle=False)``; only its CLI
(``python -m sparsify``) shuffles a Hugging Face dataset, and that path is not used here, so
batches are rows ``[0, b), [b, 2b), ...`` of FILE.pt with ``b = batch_tokens / context``.
A last partial batch (``n_sequences % b``) is still trained on as one smaller step.

Speed: the model is loaded as the base ``AutoModel`` (no LM head, as sparsify's CLI does
for the FVU loss) with ``num_hidden_layers = layer + 1``, so the layers after ``layer``
are never built or run (only the final RMSNorm is left after it, which is cheap).
``train_seconds`` is wall clock from fetching the first batch to the end of the last
optimizer step: model loading, Trainer setup and sparsify's final checkpoint write are not
in it (``fit_seconds`` has the whole ``fit()`` call). Pass the same ``--threads`` as the
other side: with two OpenMP threads on two busy cores torch slows down several-fold.

Output in OUTDIR: ``result.json`` and ``weights.safetensors`` in the model's raw units
(sparsify normalises nothing): ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_out]``,
``b_dec``, and ``W_skip [d_out, d_in]`` only if a skip was trained. The weights are the
schedule-free *averaged* iterate, i.e. what sparsify itself writes to its checkpoint
(``_checkpoint`` calls ``optimizer.eval()`` first); the raw training iterate differs.
Encode, read from sparsify 1.3.3's ``SparseCoder.encode`` / ``fused_encoder``: in transcode
mode ``b_dec`` is *not* subtracted from the input; ``acts = relu(x @ W_enc + b_enc)`` over
all latents, then ``torch.topk(acts, k)`` keeps the k largest (ReLU before top-k, which
gives the same output as top-k then ReLU: they differ only in which zero latents are
"kept"); ``out = sum of kept acts * W_dec rows + b_dec``. A self-check compares sparsify's
own module output with that formula from the saved file on 256 real MLP inputs of the last
batch and exits 1 if the largest relative error exceeds 1e-4. sparsify's checkpoint
directory ``OUTDIR/sparsify_checkpoints`` is left in place.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

SELF_CHECK_ROWS = 256
SELF_CHECK_TOL = 1e-4
ACTIVATION = "relu_topk"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--tokens", type=Path, required=True, help="int64 tensor [n_sequences, context] (torch.save)")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--d-sae", type=int, required=True)
    p.add_argument("--batch-tokens", type=int, required=True, help="tokens per step; a multiple of the context")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lr", type=float, default=None, help="default: sparsify's own, 5e-3 / sqrt(d_sae / 2**14)")
    p.add_argument("--seed", type=int, default=0, help="sparsify's init seed (torch.manual_seed before the init)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--lm-autocast", action="store_true",
                   help="run the layers before the MLP under bf16 autocast (see autocast_before_mlp)")
    p.add_argument("--exclude-tokens", type=int, nargs="*", default=[], help="token ids sparsify skips (default none)")
    return p.parse_args()


def rope_theta_of(config: Any) -> float | None:
    """RoPE base as transformers 5 (``rope_parameters``) or 4.x (``rope_theta``) stores it."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return None if theta is None else float(theta)


def load_cut_model(model_dir: Path, layer: int) -> tuple[Any, dict[str, Any]]:
    """The base model with only layers ``0..layer`` built and loaded, in float32.

    transformers <= 4.57 reads the RoPE base of a config written by transformers 5
    (``rope_parameters``) as its 10,000 default; SmolLM2's is 100,000. The base written in
    config.json is checked against the loaded one and passed explicitly when they differ.
    """
    from transformers import AutoModel

    raw = json.loads((model_dir / "config.json").read_text())
    theta_file = raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta")
    n_layers = int(raw["num_hidden_layers"])
    if not 0 <= layer < n_layers:
        raise SystemExit(f"--layer {layer} outside 0..{n_layers - 1}")
    kwargs: dict[str, Any] = {"num_hidden_layers": layer + 1}
    model, info = AutoModel.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True, **kwargs)
    rope_fix = False
    if theta_file is not None and rope_theta_of(model.config) != float(theta_file):
        kwargs["rope_theta"] = float(theta_file)
        model, info = AutoModel.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True, **kwargs)
        rope_fix = True
        if rope_theta_of(model.config) != float(theta_file):
            raise RuntimeError(f"RoPE base {rope_theta_of(model.config)} != {theta_file} from config.json")
    if info["missing_keys"]:
        raise RuntimeError(f"weights missing from {model_dir}: {sorted(info['missing_keys'])}")
    if len(model.layers) != layer + 1:
        raise RuntimeError(f"expected {layer + 1} layers after the cut, got {len(model.layers)}")
    model.eval()
    return model, {
        "n_layers_full": n_layers,
        "n_layers_run": len(model.layers),
        "n_unloaded_weights": len(info["unexpected_keys"]),
        "rope_theta": rope_theta_of(model.config),
        "rope_theta_passed_explicitly": rope_fix,
        "model_class": type(model).__name__,
    }


class TokenRows(torch.utils.data.Dataset):
    """The token file's rows, in order, as sparsify's Trainer reads a dataset.

    The first fetch is timestamped: it is where training starts.
    """

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens
        self.first_fetch: float | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if self.first_fetch is None:
            self.first_fetch = time.perf_counter()
        return {"input_ids": self.tokens[idx]}


def timed_steps(optimizers: list[Any]) -> list[float]:
    """Record the end time of every optimizer step (the wrapper changes nothing else)."""
    ends: list[float] = []
    for opt in optimizers:
        step = opt.step

        def wrapped(*a: Any, _step: Any = step, **kw: Any) -> Any:
            out = _step(*a, **kw)
            ends.append(time.perf_counter())
            return out

        opt.step = wrapped
    return ends


def export_weights(sae: Any) -> dict[str, torch.Tensor]:
    """sparsify's ``SparseCoder`` in the benchmark's layout (``pre = x @ W_enc + b_enc``)."""
    out = {
        "W_enc": sae.encoder.weight.detach().T.contiguous().clone(),  # encoder is nn.Linear: [d_sae, d_in]
        "b_enc": sae.encoder.bias.detach().contiguous().clone(),
        "W_dec": sae.W_dec.detach().contiguous().clone(),  # [d_sae, d_out], one row per latent
        "b_dec": sae.b_dec.detach().contiguous().clone(),
    }
    if sae.W_skip is not None:  # sparsify adds x @ W_skip.mT: already [d_out, d_in]
        out["W_skip"] = sae.W_skip.detach().contiguous().clone()
    return out


def formula_forward(w: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    """The saved weights' output, written out: ReLU, top-k of that, dense decode."""
    acts = torch.relu(x @ w["W_enc"] + w["b_enc"])
    vals, idx = acts.topk(k, dim=-1)
    dense = torch.zeros_like(acts).scatter_(-1, idx, vals)
    y = dense @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        y = y + x @ w["W_skip"].T
    return y


def autocast_before_mlp(model: Any, layer: int) -> None:
    """bf16 autocast for the layers that compute the MLP's input (the counterpart of SAELens's
    ``autocast_lm``). The MLP itself and the transcoder stay float32: sparsify's coder is float32
    and its fused encoder takes only inputs of its own dtype, and an autocast around the whole
    model would also run the transcoder's step in bf16, many times slower on a CPU."""
    for module in [*model.layers[:layer], model.layers[layer].self_attn]:
        module.forward = torch.autocast("cpu", dtype=torch.bfloat16)(module.forward)


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    from safetensors.torch import load_file, save_file

    import sparsify
    from sparsify import SparseCoder, SparseCoderConfig, TrainConfig, Trainer

    tokens = torch.load(args.tokens, map_location="cpu", weights_only=True)
    if not (isinstance(tokens, torch.Tensor) and tokens.dtype == torch.int64 and tokens.ndim == 2):
        raise SystemExit(f"{args.tokens}: expected an int64 tensor [n_sequences, context]")
    n_seq, ctx = tokens.shape
    if args.batch_tokens % ctx:
        raise SystemExit(f"--batch-tokens {args.batch_tokens} is not a multiple of the context {ctx}")
    batch_size = args.batch_tokens // ctx  # sparsify counts its batch in sequences

    t_load = time.perf_counter()
    model, model_info = load_cut_model(args.model_dir, args.layer)
    if args.lm_autocast:
        autocast_before_mlp(model, args.layer)
    load_seconds = time.perf_counter() - t_load
    hookpoint = f"layers.{args.layer}.mlp"  # relative to model.base_model, as sparsify resolves it
    mlp = model.get_submodule(hookpoint)

    dataset = TokenRows(tokens)
    cfg = TrainConfig(
        sae=SparseCoderConfig(transcode=True, k=args.k, num_latents=args.d_sae),
        batch_size=batch_size,
        lr=args.lr,
        hookpoints=[hookpoint],
        init_seeds=[args.seed],
        exclude_tokens=list(args.exclude_tokens),
        log_to_wandb=False,
        save_dir=str(args.out / "sparsify_checkpoints"),
        run_name="transcoder",
    )
    trainer = Trainer(cfg, dataset, model)
    if list(trainer.saes) != [hookpoint]:
        raise RuntimeError(f"sparsify resolved hookpoints {list(trainer.saes)}, expected [{hookpoint!r}]")
    sae = trainer.saes[hookpoint]
    lr_used = float(trainer.optimizers[0].param_groups[0]["lr"])

    # Keep the last batch's MLP inputs and outputs (the self-check's data); a forward hook
    # that returns nothing leaves the model's computation as it is.
    last: dict[str, torch.Tensor] = {}

    def keep(_module: Any, inputs: Any, output: Any) -> None:
        last["x"] = inputs[0].detach().flatten(0, 1)[:SELF_CHECK_ROWS].clone()
        last["y"] = output.detach().flatten(0, 1)[:SELF_CHECK_ROWS].clone()

    # Check that sparsify feeds the model the file's rows in order, each exactly once.
    seen = {"rows": 0, "in_order": True}

    def check_order(_module: Any, inputs: Any) -> None:
        ids = inputs[0]
        start = seen["rows"]
        seen["in_order"] &= bool(torch.equal(ids.cpu(), tokens[start : start + ids.shape[0]]))
        seen["rows"] = start + ids.shape[0]

    handle = mlp.register_forward_hook(keep)
    order_handle = model.register_forward_pre_hook(check_order)
    step_ends = timed_steps(trainer.optimizers)
    t_fit = time.perf_counter()
    trainer.fit()
    fit_seconds = time.perf_counter() - t_fit
    handle.remove()
    order_handle.remove()
    if not (seen["in_order"] and seen["rows"] == n_seq):
        raise RuntimeError(f"sparsify did not read the token rows in order once each: {seen}")
    if dataset.first_fetch is None or not step_ends:
        raise RuntimeError("sparsify trained no step")
    train_seconds = step_ends[-1] - dataset.first_fetch
    exclude = torch.tensor(args.exclude_tokens, dtype=torch.long)
    n_tokens = int(torch.isin(tokens, exclude, invert=True).sum())

    # The trained transcoder is what sparsify wrote at the end of fit(): its checkpoint holds
    # the schedule-free averaged iterate (``_checkpoint`` calls ``optimizer.eval()``, saves,
    # then ``optimizer.train()`` again), while ``trainer.saes`` is left at the training
    # iterate. Load the checkpoint with sparsify's own loader and convert that; as a check,
    # switch the optimizer to eval mode too and compare (lerp round trips: ~1e-9, not 0).
    ckpt = SparseCoder.load_from_disk(Path(cfg.save_dir) / cfg.run_name / hookpoint).eval()
    for opt in trainer.optimizers:
        if hasattr(opt, "train_mode"):
            opt.eval()
    ckpt_diff = max(float((a - b).abs().max()) for a, b in zip(ckpt.state_dict().values(), sae.state_dict().values()))
    sae = ckpt
    weights = export_weights(sae)
    save_file(weights, str(args.out / "weights.safetensors"))

    saved = load_file(str(args.out / "weights.safetensors"))
    x, y = last["x"], last["y"]
    with torch.no_grad():
        theirs = sae(x).sae_out.float()
        ours = formula_forward(saved, x, args.k)
    row_err = (theirs - ours).norm(dim=-1) / theirs.norm(dim=-1).clamp_min(1e-30)
    rel_err = float(row_err.max())
    fvu = float((y - ours).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    n_positive = float(((x @ saved["W_enc"] + saved["b_enc"]) > 0).sum(-1).float().mean())

    steps = math.ceil(n_seq / batch_size)
    notes = (
        f"activation {ACTIVATION}: pre = x @ W_enc + b_enc (b_dec is not subtracted from the input in "
        "transcode mode), a = relu(pre) over all latents, then torch.topk(a, k) keeps the k largest; "
        "out = kept a @ W_dec rows + b_dec (same output as top-k then ReLU). No input/output normalisation. "
        f"Optimizer: sparsify default signum (SignSGD in schedulefree.ScheduleFreeWrapper, momentum 0.95), "
        f"lr {'given' if args.lr is not None else 'default 5e-3/sqrt(d_sae/2**14)'} = {lr_used:.4g}, no warmup "
        "or decay; loss FVU; auxk_alpha 0 (sparsify's default: no AuxK); k constant (k_decay_steps 0); "
        "W_dec not unit-normalised (transcode mode); first batch sets b_enc = -mean(x) @ W_enc and "
        "b_dec = mean(y). Saved weights are the schedule-free averaged iterate (= sparsify's checkpoint). "
        f"Data: rows of the token file in order (DataLoader shuffle=False, no shuffling in Trainer), "
        f"{batch_size} sequences/step, {steps} steps"
        + (f", last step {n_seq % batch_size} sequences" if n_seq % batch_size else "")
        + f"; excluded token ids {list(args.exclude_tokens)}. Model: AutoModel with num_hidden_layers="
        f"{args.layer + 1} (layers after {args.layer} not built or run). fit() calls "
        "torch.set_float32_matmul_precision('high')."
    )
    result = {
        "sparsify_version": getattr(sparsify, "__version__", None) or version("eai-sparsify"),
        "transformers_version": version("transformers"),
        "torch_version": torch.__version__,
        "k": args.k,
        "d_sae": args.d_sae,
        "layer": args.layer,
        "n_tokens": n_tokens,
        "n_sequences": int(n_seq),
        "context_size": int(ctx),
        "batch_size_sequences": batch_size,
        "n_steps": len(step_ends),
        "rows_read_in_file_order": True,
        "train_seconds": train_seconds,
        "tokens_per_s": n_tokens / train_seconds,
        "fit_seconds": fit_seconds,
        "load_seconds": load_seconds,
        "torch_threads": torch.get_num_threads(),
        "lm_autocast": args.lm_autocast,
        "lr_used": lr_used,
        "seed": args.seed,
        "hookpoint": hookpoint,
        "activation": ACTIVATION,
        "skip": "W_skip" in weights,
        "optimizer": "signum (SignSGD + schedulefree.ScheduleFreeWrapper, momentum 0.95)",
        "auxk_alpha": cfg.auxk_alpha,
        "exclude_tokens": list(args.exclude_tokens),
        "model": model_info,
        "self_check_rel_err": rel_err,
        "self_check_n": int(x.shape[0]),
        "self_check_fvu": fvu,
        "self_check_mean_positive_preacts": n_positive,
        "checkpoint_vs_eval_mode_max_abs_diff": ckpt_diff,
        "notes": notes,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "notes"}))
    if not rel_err <= SELF_CHECK_TOL or not ckpt_diff <= 1e-6:
        print(f"self-check failed: rel err {rel_err:.3g} (tol {SELF_CHECK_TOL}), checkpoint diff {ckpt_diff:.3g}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
