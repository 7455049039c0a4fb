"""Faithfulness at matched L0: our transcoders vs EleutherAI sparsify's and SAELens's SAEs.

On the MLP of one SmolLM2-135M layer, with one d_sae, one token budget and one held-out set,
it trains and compares

* ours: every transcoder architecture of this package (``SYSTEMS`` below: ReLU/L1, JumpReLU,
  TopK, BatchTopK, Matryoshka BatchTopK, each with and without skip), each at >= 3 sparsity
  levels, with ``TranscoderTrainingRunner`` (MLP input -> MLP output);
* sparsify: EleutherAI sparsify's TopK transcoder at its defaults, in its own venv
  (``_sparsify_worker.py``, a subprocess), loaded back as our ``TopKTranscoder``;
* SAELens: its standard (ReLU/L1) SAE and its TopK SAE on ``hook_mlp_out``, with
  ``LanguageModelSAETrainingRunner`` (an SAE reconstructs the MLP output from itself).

Each is spliced in place of the MLP output on the held-out tokens (``evaluate_spliced``):
L0, FVU and EV against the MLP output, ΔCE = CE spliced − CE clean, CE recovered (against
zero-ablating the MLP), KL to the clean model, dead % (features that never fire on the
held-out tokens) and training tokens/s (wall time of training alone: the runner's ``run()``
for ours and SAELens's, which includes filling the activation buffer and the 20-batch norm
estimate; for sparsify the worker's ``train_seconds``, first batch to last optimizer step).

Run (two venvs: this package's runs the driver, sparsify's only the worker)::

    python3 -m venv /work/sparsify-venv                       # once, as _sparsify_worker.py says
    /work/sparsify-venv/bin/pip install torch==2.13.0
    /work/sparsify-venv/bin/pip install eai-sparsify==1.3.3

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/faithfulness_vs_peers.py \
        [--tokens 786432] [--systems topk_transcoder sparsify_topk_transcoder ...] \
        [--levels topk_skip_transcoder=16,32,64] [--threads 1] [--lm-dtype bfloat16] [--out DIR]

``--lm-dtype bfloat16`` runs the LM forward that makes the activations under bf16 autocast for
every system (training and evaluation stay float32) and writes to ``<tokens>_bfloat16_lm``;
``--our-lm-forward transformers`` adds ``_transformers_forward`` and ``--our-auxk off`` (ours
train no dead latents, as sparsify's default: the same work per step) ``_no_auxk``.

Results merge into ``--out`` (default ``benchmarks/results/faithfulness_vs_peers/<tokens>``):
``results.json`` keyed by system, level and budget (a run already there is skipped unless
``--force``, so runs of different ``--systems`` build one table and an interrupted run
resumes), ``table.md`` and the Pareto plots ``pareto_dce.png`` (L0 vs ΔCE) and
``pareto_fvu.png`` (L0 vs FVU), one curve per system. The HF model directory sparsify
reads, the token file and sparsify's outputs go to ``--workdir`` (not committed).

The same token stream. SAELens's store (and ours, which subclasses it) tokenises the
embedded corpus's ``train`` split on the fly: documents concatenated, cut into 128-token
rows, each row starting with BOS (``prepend_bos``), BOS between documents; positions
holding special tokens (``exclude_special_tokens``) are dropped from training. The driver
takes those rows from a fresh iterator over the store of our own runner
(``fresh_token_sequences``, the rows our runs' LLM batches are made of), keeps the first
rows holding at least ``--tokens`` non-special tokens, and saves them as the int64
``[n_rows, 128]`` file sparsify trains on, in order, once, skipping the same special ids.
Every system therefore reads the same prefix of one ordered row stream; they differ in
what they do with it:

* sparsify trains on every non-special position of exactly those rows, in row order
  (no shuffling, 8 rows a step);
* ours and SAELens's read those rows and a little more: each step draws ``--batch``
  activations from a shuffle buffer (``n_batches_in_buffer`` 64: 8192 activations, half kept
  for mixing), the first 20 batches drawn go to the normalisation estimate (SAELens's then
  drops them; ours trains on them too, since this release), and the buffer is topped up
  ahead of the trainer. So they train on ``--tokens`` activations shuffled within a window of
  ~8k, from rows ``[0, n + ~40)`` of the stream for ours and ``[0, n + ~210)`` for SAELens's
  (n = the file's rows: +0.6% and +3% at the default budget), the last buffered ones unused.
  Our store shuffles with its own seeded generator, SAELens's mixing buffer with torch's
  global RNG, so the order differs between the two.

Every runner-trained run checks this: a forward pre-hook on the model records the token
rows of every LLM batch during ``run()``, and the first ``n`` of them must equal the file
(asserted; ``stream_check`` in results.json). Only one epoch is used: the script refuses a
budget larger than the ``train`` split.

Larger budgets. The embedded ``train`` split holds about 3.2M tokens, less than the
4M budget. ``--train-dataset DIR`` streams the ``train`` split of another directory dataset
instead, such as the same three sources without the embedded corpus's 4M-characters-per-source
cap (about 4.6M tokens, ``scripts/build_corpus.py --max-source-chars 100000000 --out-dir DIR``).
The held-out set stays the embedded ``test`` split, so every budget is scored on the same
tokens; the driver refuses a train split that shares a document with it.

Hooks. ``mlp_layer`` resolves to ``blocks.L.mlp.hook_in`` (the MLP's exact input) on this
model: it is loaded without ``fold_ln``, so ``ln2`` keeps its weight and
``ln2.hook_normalized`` (before the weight) is not what the MLP reads. sparsify reads the
HF model's ``layers[L].mlp`` input, the RMSNorm output with its weight, and writes its
output: the same two tensors. The driver checks that on held-out tokens (HF model from the
same directory sparsify loads vs our HookedTransformer: inputs, outputs and the sparsify
transcoder's reconstructions from each input; ``hook_check``) and stops if they differ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import torch
from cycler import cycler
from safetensors.torch import load_file
from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from sae_lens.util import get_special_token_ids
from transformer_lens import HookedTransformer

from sae_lens_transcoder import TranscoderTrainingRunner
from sae_lens_transcoder._sae_lens_privates import fresh_token_sequences
from sae_lens_transcoder.data import EMBEDDED_DATASET, load_text_split
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.hooks import default_input_hook, mlp_out_hook
from sae_lens_transcoder.llm_transcoder_training_runner import SAE_LENS_DEFAULT_HOOK
from sae_lens_transcoder.models import load_model
from sae_lens_transcoder.plots import plot_pareto
from sae_lens_transcoder.report import format_table, heldout_tokens
from sae_lens_transcoder.saes.topk_transcoder import TopKTranscoder, TopKTranscoderConfig
from sae_lens_transcoder.saes.transcoder import TRAINING_CLASSES
from sae_lens_transcoder.splicing import Splice

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_sparsify_worker.py"
MODEL = "smollm2-135m"
CONTEXT = 128
NORMALIZATION = "expected_average_only_in"
HOOK_CHECK_ROWS = 4
HOOK_CHECK_RTOL = 1e-3

# system -> (family, the config field its levels set, default levels, fixed settings).
# A "matryoshka_widths" entry is in fractions of d_sae. JumpReLU's l0_coefficients come from a
# calibration (d_sae 1152, 768 steps): 0.5 / 2 / 8 gave L0 42 / 21 / 11. The L1 coefficients too
# (768 steps at batch 256): the standard SAE's 1 / 2 gave L0 209 / 67; the transcoder's come from
# benchmarks/results/pareto (3 / 5: L0 86 / 47 after 256 steps), scaled like the SAE's.
L1 = {"l1_warm_up_steps": 200}
NESTED = {"matryoshka_widths": (1 / 8, 1 / 2, 1)}
SYSTEMS: dict[str, tuple[str, str, tuple[float, ...], dict[str, Any]]] = {
    "transcoder": ("ours", "l1_coefficient", (2, 3, 5), L1),
    "skip_transcoder": ("ours", "l1_coefficient", (2, 3, 5), L1),
    "jumprelu_transcoder": ("ours", "l0_coefficient", (0.25, 1, 4), {}),
    "jumprelu_skip_transcoder": ("ours", "l0_coefficient", (0.25, 1, 4), {}),
    "topk_transcoder": ("ours", "k", (16, 32, 64), {}),
    "topk_skip_transcoder": ("ours", "k", (16, 32, 64), {}),
    "batchtopk_transcoder": ("ours", "k", (16, 32, 64), {}),
    "batchtopk_skip_transcoder": ("ours", "k", (16, 32, 64), {}),
    "matryoshka_batchtopk_transcoder": ("ours", "k", (16, 32, 64), NESTED),
    "matryoshka_batchtopk_skip_transcoder": ("ours", "k", (16, 32, 64), NESTED),
    "sparsify_topk_transcoder": ("sparsify", "k", (16, 32, 64), {}),
    "standard_sae": ("SAELens", "l1_coefficient", (2, 3, 5), L1),
    "topk_sae": ("SAELens", "k", (16, 32, 64), {}),
}
PEER_LABELS = {
    "sparsify_topk_transcoder": "sparsify TopK transcoder",
    "standard_sae": "SAELens standard SAE on mlp_out",
    "topk_sae": "SAELens TopK SAE on mlp_out",
}
# Plot colours: ours by position in SYSTEMS (tab20 pairs: an architecture dark, its skip light).
PEER_COLOURS = {"sparsify_topk_transcoder": "black", "standard_sae": "tab:brown", "topk_sae": "tab:cyan"}
SPEED_K = 32
# --our-lm-forward: which implementation's forward pass makes our runs' training activations.
MODEL_CLASS_FOR_FORWARD = {"transformer_lens": "HookedTransformer", "transformers": "AutoModelForCausalLM"}
LM_FORWARD_NOTE = {
    "transformer_lens": "ours and SAELens's SAEs run it in TransformerLens, sparsify in transformers",
    "transformers": "ours run it in transformers (`model_class_name: AutoModelForCausalLM`), as sparsify does; "
    "SAELens's SAEs in TransformerLens",
}
AUXK_NOTE = {
    "on": "",
    "off": " Our TopK-family runs train no dead latents (`aux_loss_coefficient` 0), as sparsify's default does.",
}
LM_DTYPE_NOTE = {
    "float32": "float32",
    "bfloat16": "bf16 autocast (SAELens's `autocast_lm` for ours and its SAEs; sparsify's layers before the MLP), "
    "the transcoders and SAEs train in float32, and every evaluation runs in float32",
}


@dataclass
class Inputs:
    """What every system is trained and evaluated on."""

    model: HookedTransformer
    train: Any  # the train split (a datasets.Dataset)
    heldout: torch.Tensor  # [n_seq, CONTEXT] held-out token ids
    exclude: torch.Tensor  # special token ids, left out of training and evaluation
    rows: torch.Tensor  # the training token stream's first rows (the token file)
    token_file: Path


# ----------------------------------------------------------------------------- configs


def level_name(system: str, level: float) -> str:
    return f"{SYSTEMS[system][1]}={level:g}"


def run_key(system: str, level: float, tokens: int) -> str:
    return f"{system} {level_name(system, level)} tokens={tokens}"


def sae_config(system: str, level: float, d_in: int, args: argparse.Namespace) -> Any:
    """The training config of one of ours or of one SAELens SAE at ``level``."""
    family, knob, _, fixed = SYSTEMS[system]
    settings = {**fixed, knob: int(level) if knob == "k" else float(level)}
    if "matryoshka_widths" in settings:
        settings["matryoshka_widths"] = [round(f * args.d_sae) for f in settings["matryoshka_widths"]]
    common = dict(d_in=d_in, d_sae=args.d_sae, normalize_activations=NORMALIZATION, **settings)
    if family == "ours":
        config_class = TRAINING_CLASSES[system][1]
        if args.our_auxk == "off" and "aux_loss_coefficient" in config_class.__dataclass_fields__:
            common["aux_loss_coefficient"] = 0.0
        return config_class(mlp_layer=args.layer, **common)
    return (StandardTrainingSAEConfig if system == "standard_sae" else TopKTrainingSAEConfig)(**common)


def runner_config(sae: Any, args: argparse.Namespace, hook_name: str) -> LanguageModelSAERunnerConfig[Any]:
    """pareto_vs_sae.py's runner config, for every runner-trained system, with the README's
    recipe: linear lr decay over the last fifth of the steps, and a dead-feature window of an
    eighth of them (SAELens's 1000 steps is longer than these runs, so AuxK would never act)."""
    steps = args.tokens // args.batch
    return LanguageModelSAERunnerConfig(
        lr_decay_steps=steps // 5, dead_feature_window=max(1, steps // 8),
        sae=sae, model_name=MODEL, hook_name=hook_name, dataset_path=args.train_dataset,
        is_dataset_tokenized=False, streaming=False, context_size=CONTEXT, prepend_bos=True,
        exclude_special_tokens=True, training_tokens=args.tokens, train_batch_size_tokens=args.batch,
        store_batch_size_prompts=16, n_batches_in_buffer=64, n_batches_for_norm_estimate=20,
        lr=args.lr, lr_warm_up_steps=100, checkpoint_path=None, output_path=None,
        autocast_lm=args.lm_autocast,
        logger=LoggingConfig(log_to_wandb=False), verbose=False,
    )


def transcoder_runner(
    system: str, level: float, model: HookedTransformer, train: Any, args: argparse.Namespace,
    lm_forward: str = "transformer_lens",
) -> TranscoderTrainingRunner:
    cfg = runner_config(sae_config(system, level, model.cfg.d_model, args), args, SAE_LENS_DEFAULT_HOOK)
    cfg.model_class_name = MODEL_CLASS_FOR_FORWARD[lm_forward]
    return TranscoderTrainingRunner(cfg, override_model=model, override_dataset=train)


# ----------------------------------------------------------------------------- the token stream


def training_rows(model: HookedTransformer, train: Any, exclude: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """The first rows of our runner's token stream holding >= ``--tokens`` non-special tokens."""
    store = transcoder_runner("transcoder", 1.0, model, train, args).activations_store
    rows, kept = [], 0
    for row in fresh_token_sequences(store):
        rows.append(row.cpu())
        kept += int(torch.isin(rows[-1], exclude, invert=True).sum())
        if kept >= args.tokens:
            return torch.stack(rows).long()
    raise SystemExit(f"the train split has {kept} trainable tokens in one epoch; --tokens {args.tokens} needs more")


@contextmanager
def recorded_token_rows(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Every token batch the model is run on meanwhile, in order."""
    seen: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(lambda _module, inputs: seen.append(inputs[0].detach().cpu().clone()))
    try:
        yield seen
    finally:
        handle.remove()


def check_stream(seen: list[torch.Tensor], rows: torch.Tensor) -> dict[str, Any]:
    """The rows a run read must start with the token file's rows."""
    read = torch.cat(seen)
    n = rows.shape[0]
    if read.shape[0] < n or not torch.equal(read[:n], rows):
        raise AssertionError(f"the run read {read.shape[0]} rows that do not start with the {n} rows of the token file")
    return {"rows_read": int(read.shape[0]), "rows_in_file": n, "file_is_prefix_of_rows_read": True}


def timed_run(runner: Any, inputs: Inputs, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Train; the wall time of ``run()`` and the stream check (on the model that makes the
    training activations: the HookedTransformer, or with ``--our-lm-forward transformers`` the
    transformers model)."""
    with recorded_token_rows(runner.activations_store.model) as seen:
        start = time.perf_counter()
        trained = runner.run()
        seconds = time.perf_counter() - start
    return trained, {"train_seconds": seconds, "train_tokens": args.tokens, "stream_check": check_stream(seen, inputs.rows)}


# ----------------------------------------------------------------------------- systems


def train_ours(system: str, level: float, inputs: Inputs, args: argparse.Namespace) -> tuple[Splice, dict[str, Any]]:
    runner = transcoder_runner(system, level, inputs.model, inputs.train, args, args.our_lm_forward)
    transcoder, info = timed_run(runner, inputs, args)
    return Splice(transcoder, *runner.hooks[args.layer]), info


def inference_sae(sae: Any) -> SAE:  # type: ignore[type-arg]
    """The SAELens inference SAE a training SAE saves as (``save_inference_model``), in memory."""
    state = {key: value.detach().clone() for key, value in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    inference = SAE.from_dict(sae.cfg.get_inference_sae_cfg_dict())
    inference.load_state_dict(state)
    return inference


def train_sae(system: str, level: float, inputs: Inputs, args: argparse.Namespace) -> tuple[Splice, dict[str, Any]]:
    hook = mlp_out_hook(args.layer)
    cfg = runner_config(sae_config(system, level, inputs.model.cfg.d_model, args), args, hook)
    runner = LanguageModelSAETrainingRunner(cfg, override_model=inputs.model, override_dataset=inputs.train)
    sae, info = timed_run(runner, inputs, args)
    return Splice(inference_sae(sae), hook, hook), info


def write_hf_model_dir(directory: Path) -> Path:
    """SmolLM2 as the plain HF model directory sparsify loads (a GGUF-loaded model cannot be saved)."""
    if (directory / "config.json").is_file():
        return directory
    from transformers import AutoModelForCausalLM

    from sae_lens_transcoder.models.hf_local import clean_hf_config
    from sae_lens_transcoder.models.smollm2 import load_smollm2_hf

    gguf_model, tokenizer = load_smollm2_hf()
    model = AutoModelForCausalLM.from_config(clean_hf_config(gguf_model), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, directory)  # whole or not at all
    return directory


def run_sparsify_worker(k: int, model_dir: Path, inputs: Inputs, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    out = args.workdir / f"sparsify_k{k}_d{args.d_sae}_t{args.tokens}_{args.lm_dtype}"
    threads = str(torch.get_num_threads())
    cmd = [args.sparsify_python, str(WORKER), "--model-dir", str(model_dir), "--tokens", str(inputs.token_file),
           "--layer", str(args.layer), "--k", str(k), "--d-sae", str(args.d_sae), "--batch-tokens", str(args.batch),
           "--out", str(out), "--threads", threads, *(["--lm-autocast"] if args.lm_autocast else []),
           "--exclude-tokens", *map(str, inputs.exclude.tolist())]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"sparsify worker failed ({proc.returncode}): {' '.join(cmd)}")
    return out, json.loads((out / "result.json").read_text())


def sparsify_splice(out: Path, k: int, layer: int, model: HookedTransformer) -> Splice:
    """sparsify's weights as our ``TopKTranscoder`` (TopK then ReLU = sparsify's ReLU then TopK)."""
    weights = load_file(str(out / "weights.safetensors"))
    if "W_skip" in weights:
        raise ValueError("sparsify trained a skip; this benchmark runs it without one")
    hook_in, hook_out = default_input_hook(model, layer), mlp_out_hook(layer)
    d_in, d_sae = weights["W_enc"].shape
    cfg = TopKTranscoderConfig(
        d_in=d_in, d_sae=d_sae, d_out=weights["W_dec"].shape[1], k=k, apply_b_dec_to_input=False,
        metadata=SAEMetadata(model_name=MODEL, hook_name=hook_in, hook_name_out=hook_out),
    )
    transcoder = TopKTranscoder(cfg)
    transcoder.load_state_dict(weights)
    return Splice(transcoder.eval(), hook_in, hook_out)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def check_hooks(model_dir: Path, splice: Splice, inputs: Inputs, layer: int) -> dict[str, Any]:
    """sparsify's MLP input/output (the HF model) vs our hooks, and the transcoder's output from each input."""
    from transformers import AutoModelForCausalLM

    tokens = inputs.heldout[:HOOK_CHECK_ROWS]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen: dict[str, torch.Tensor] = {}

    def keep(_module: Any, args: Any, output: Any) -> None:
        seen["x"], seen["y"] = args[0], output

    handle = hf.model.layers[layer].mlp.register_forward_hook(keep)
    hf(tokens)
    handle.remove()
    hooks = [splice.hook_name, splice.hook_name_out]
    _, cache = inputs.model.run_with_cache(tokens, names_filter=hooks, stop_at_layer=layer + 1)
    x, y = cache[splice.hook_name], cache[splice.hook_name_out]
    x_hf = seen["x"].reshape(x.shape)
    result = {
        "our_input_hook": splice.hook_name,
        "ln2": type(inputs.model.blocks[layer].ln2).__name__,
        "mlp_input_rel_err": relative_error(x, x_hf),
        "mlp_output_rel_err": relative_error(y, seen["y"].reshape(y.shape)),
        "reconstruction_rel_err": relative_error(splice(x.flatten(0, 1)), splice(x_hf.flatten(0, 1))),
        "n_tokens": int(tokens.numel()),
    }
    bad = {key: value for key, value in result.items() if key.endswith("_rel_err") and not value <= HOOK_CHECK_RTOL}
    if bad:
        raise AssertionError(f"sparsify's MLP tensors differ from ours ({bad}); see {result}")
    return result


def train_sparsify(k: float, inputs: Inputs, args: argparse.Namespace) -> tuple[Splice, dict[str, Any]]:
    model_dir = write_hf_model_dir(args.workdir / "hf_model" / MODEL)
    out, result = run_sparsify_worker(int(k), model_dir, inputs, args)
    splice = sparsify_splice(out, int(k), args.layer, inputs.model)
    stream = {"rows_read": result["n_sequences"], "rows_in_file": int(inputs.rows.shape[0]),
              "file_is_prefix_of_rows_read": bool(result["rows_read_in_file_order"])}
    kept = ("sparsify_version", "lr_used", "n_steps", "optimizer", "auxk_alpha", "self_check_rel_err", "fit_seconds")
    return splice, {
        "train_seconds": result["train_seconds"],
        "train_tokens": result["n_tokens"],
        "stream_check": stream,
        "hook_check": check_hooks(model_dir, splice, inputs, args.layer),
        "sparsify": {key: result[key] for key in kept},
    }


def train(system: str, level: float, inputs: Inputs, args: argparse.Namespace) -> tuple[Splice, dict[str, Any]]:
    family = SYSTEMS[system][0]
    if family == "ours":
        return train_ours(system, level, inputs, args)
    if family == "sparsify":
        return train_sparsify(level, inputs, args)
    return train_sae(system, level, inputs, args)


# ----------------------------------------------------------------------------- evaluation and results


def evaluate(splice: Splice, inputs: Inputs, d_sae: int) -> dict[str, Any]:
    metrics = evaluate_spliced(inputs.model, [splice], inputs.heldout, exclude_special_tokens=inputs.exclude)
    metrics.pop("feature_density")
    metrics.pop("per_transcoder")
    metrics["ce_loss_increase"] = metrics["ce_loss_spliced"] - metrics["ce_loss_clean"]
    metrics["dead_pct"] = 100.0 * metrics["dead_features"] / d_sae
    return metrics


def load_results(path: Path, setup: dict[str, Any]) -> dict[str, Any]:
    if not path.is_file():
        return {"setup": setup, "runs": {}}
    results = json.loads(path.read_text())
    results["setup"].setdefault("our_lm_forward", "transformer_lens")  # files from before the options
    results["setup"].setdefault("our_auxk", "on")
    if results["setup"] != setup:
        raise SystemExit(f"{path} was written for {results['setup']}, this run is {setup}: use another --out")
    return results


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def label(system: str) -> str:
    return PEER_LABELS.get(system, f"ours {system}")


def colour_and_style(system: str) -> tuple[Any, str]:
    if system in PEER_COLOURS:
        return PEER_COLOURS[system], "--"
    return matplotlib.colormaps["tab20"](list(SYSTEMS).index(system)), "-"


def plot(runs: list[dict[str, Any]], out: Path) -> None:
    """The two Pareto plots, one curve per system: ours solid, peers dashed."""
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in runs)]
    if not systems:
        return
    curves = {label(s): [r for r in runs if r["system"] == s] for s in systems}
    colours, styles = zip(*map(colour_and_style, systems))
    # plot_pareto draws the curves in order, so the cycle gives each its colour and style.
    with matplotlib.rc_context({"axes.prop_cycle": cycler(color=colours, linestyle=styles), "legend.fontsize": 6}):
        plot_pareto(curves, out / "pareto_dce.png", y_label="ΔCE = CE spliced − CE clean (nats)")
        plot_pareto(curves, out / "pareto_fvu.png", y_key="fvu", y_label="FVU (vs MLP output)")


# A peer L0 this close to a curve's end (relative) is matched by that end: a TopK run's L0 falls a
# hair below k when a kept code is zero (SAELens's TopK SAE at k 16 read 15.99988 at 4M).
L0_MATCH_TOLERANCE = 1e-3


def at_l0(runs: list[dict[str, Any]], l0: float, key: str) -> float | None:
    """``key`` of a curve at ``l0``, linear in log L0 between neighbouring runs; None outside."""
    points = sorted((r["l0"], r[key]) for r in runs if r["l0"] > 0)
    if points:
        lowest, highest = points[0][0], points[-1][0]
        if lowest * (1 - L0_MATCH_TOLERANCE) <= l0 < lowest:
            l0 = lowest
        elif highest < l0 <= highest * (1 + L0_MATCH_TOLERANCE):
            l0 = highest
    # Consecutive pairs, and the last run with itself (an L0 equal to the largest).
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[-1:]):
        if x0 <= l0 <= x1:
            t = 0.0 if x1 == x0 else (math.log(l0) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return None


def best_ours(runs: list[dict[str, Any]], l0: float, key: str) -> tuple[float, str] | None:
    """The lowest of our curves' ``key`` at ``l0``, and which architecture it is."""
    ours = [s for s, (family, *_) in SYSTEMS.items() if family == "ours"]
    values = [(at_l0([r for r in runs if r["system"] == s], l0, key), s) for s in ours]
    found = [(v, s) for v, s in values if v is not None]
    return min(found) if found else None


def matched_cells(peer: dict[str, Any], runs: list[dict[str, Any]], key: str) -> list[str]:
    best = best_ours(runs, peer["l0"], key)
    if best is None:
        return [f"{peer[key]:.4f}", "-", "-", "-"]
    ratio = f"{best[0] / peer[key]:.2f}" if peer[key] else "-"
    return [f"{peer[key]:.4f}", f"{best[0]:.4f} ({best[1]})", f"{best[0] - peer[key]:+.4f}", ratio]


def matched_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| peer | level | L0 | peer ΔCE | ours best ΔCE | Δ | ours/peer | peer FVU | ours best FVU | Δ | ours/peer |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for peer in (r for r in runs if r["system"] in PEER_LABELS):
        cells = [label(peer["system"]), level_name(peer["system"], peer["level"]), f"{peer['l0']:.1f}",
                 *matched_cells(peer, runs, "ce_loss_increase"), *matched_cells(peer, runs, "fvu")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def runs_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| system | level | L0 | FVU | EV | ΔCE (nats) | CE recovered | KL | dead % | train tokens/s | threads |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {label(r['system'])} | {level_name(r['system'], r['level'])} | {r['l0']:.1f} | {r['fvu']:.3f} | "
                     f"{r['explained_variance']:.3f} | {r['ce_loss_increase']:.4f} | {r['ce_loss_recovered']:.1%} | "
                     f"{r['kl_div']:.4f} | {r['dead_pct']:.1f} | {r['tokens_per_s']:.0f} | {r['threads']} |")
    return lines


def speed_ratio(runs: list[dict[str, Any]]) -> float | None:
    """tokens/s of our topk_transcoder over sparsify's, both at k = SPEED_K."""
    speed = {r["system"]: r["tokens_per_s"] for r in runs if r["level"] == SPEED_K}
    if "topk_transcoder" in speed and "sparsify_topk_transcoder" in speed:
        return speed["topk_transcoder"] / speed["sparsify_topk_transcoder"]
    return None


MATCHED_NOTE = (
    "At each peer run's L0, each of our architectures' curve is interpolated linearly in log L0 between its two "
    "neighbouring runs (no extrapolation: '-' where the L0 is outside every curve's range by more than 0.1%), and the lowest of them "
    "is shown with its architecture; Δ = ours − peer (negative: ours is better)."
)


def table(results: dict[str, Any]) -> str:
    setup = results["setup"]
    order = list(SYSTEMS)
    lines = [
        f"# Faithfulness at matched L0: {setup['model']} MLP {setup['layer']}", "",
        f"d_sae {setup['d_sae']}, context {setup['context_size']}, batch {setup['batch']} tokens, lr {setup['lr']} "
        f"and `{NORMALIZATION}` (ours and SAELens; sparsify: its own lr, no normalisation), the `train` split "
        f"of the `{setup['train_dataset']}` corpus, one token stream for all (see the script's docstring). The LM "
        f"forward that makes the training activations runs in {LM_DTYPE_NOTE[setup['lm_dtype']]}; {LM_FORWARD_NOTE[setup['our_lm_forward']]}.{AUXK_NOTE[setup['our_auxk']]} Every system is spliced in place of the MLP output on "
        f"{setup['heldout_positions']} held-out positions (the embedded `test` split, special tokens excluded). ΔCE = CE spliced "
        "− CE clean; FVU/EV against the MLP output; CE recovered against zero-ablating the MLP; dead % = features "
        "that never fire on the held-out tokens; tokens/s = training tokens over training wall time alone, with "
        "`threads` torch threads.", "",
    ]
    for tokens in sorted({r["tokens"] for r in results["runs"].values()}):
        runs = [r for r in results["runs"].values() if r["tokens"] == tokens]
        runs.sort(key=lambda r: (order.index(r["system"]), r["level"]))
        lines += [f"## {tokens:,} training tokens", "", "### All runs", "", *runs_table(runs), "",
                  "### At matched L0", "", MATCHED_NOTE, "", *matched_table(runs), ""]
        ratio = speed_ratio(runs)
        if ratio is not None:
            lines += [f"Training speed at k = {SPEED_K}: ours (`topk_transcoder`) / sparsify = **{ratio:.2f}×** tokens/s.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver


def parse_levels(specs: list[str]) -> dict[str, tuple[float, ...]]:
    levels = {system: default for system, (_, _, default, _) in SYSTEMS.items()}
    for spec in specs:
        system, _, values = spec.partition("=")
        if system not in SYSTEMS or not values:
            raise SystemExit(f"--levels {spec!r}: expected SYSTEM=V1,V2,... with SYSTEM one of {list(SYSTEMS)}")
        levels[system] = tuple(float(v) for v in values.split(","))
    return levels


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    p.add_argument("--levels", nargs="*", default=[], metavar="SYSTEM=V1,V2,...", help="override a system's levels")
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--tokens", type=int, default=786432)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3, help="ours and SAELens's (sparsify uses its own)")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=None, help="torch threads here and in the sparsify worker")
    p.add_argument("--lm-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the LM forward that makes the activations: bfloat16 = SAELens's autocast_lm for ours and "
                   "its SAEs, its layers before the MLP for sparsify (the SAEs train in float32 either way)")
    p.add_argument("--our-lm-forward", choices=list(MODEL_CLASS_FOR_FORWARD), default="transformer_lens",
                   help="transformers = our runs make their activations with transformers' own forward pass "
                   "(model_class_name: AutoModelForCausalLM), as sparsify does; SAELens's SAEs keep TransformerLens")
    p.add_argument("--our-auxk", choices=("on", "off"), default="on",
                   help="off = our TopK-family runs train no dead latents (aux_loss_coefficient 0), as sparsify's "
                   "default (auxk_alpha 0) does: the same work per step, for the speed pair")
    p.add_argument("--train-dataset", default=EMBEDDED_DATASET,
                   help="directory dataset whose train split is the token stream (held-out: always the embedded test split)")
    p.add_argument("--force", action="store_true", help="retrain runs already in results.json")
    p.add_argument("--sparsify-python", default="/work/sparsify-venv/bin/python")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/faithfulness_vs_peers"))
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/faithfulness_vs_peers/<tokens>")
    args = p.parse_args()
    args.lm_autocast = args.lm_dtype == "bfloat16"
    budget = str(args.tokens) + (f"_{args.lm_dtype}_lm" if args.lm_autocast else "")
    budget += "_transformers_forward" if args.our_lm_forward == "transformers" else ""
    budget += "_no_auxk" if args.our_auxk == "off" else ""
    args.out = args.out or ROOT / "benchmarks" / "results" / "faithfulness_vs_peers" / budget
    args.levels = parse_levels(args.levels)
    return args


def prepare(args: argparse.Namespace) -> Inputs:
    """Model, data, held-out tokens and the token file."""
    model = load_model(MODEL, cache_dir=str(ROOT / ".cache" / "models"))
    train = load_text_split("train", args.train_dataset)
    test = load_text_split("test")
    shared = set(train["text"]) & set(test["text"])
    if shared:
        raise SystemExit(f"--train-dataset {args.train_dataset}: {len(shared)} train documents are in the held-out split")
    heldout = heldout_tokens(model, test, CONTEXT, args.eval_tokens)
    exclude = torch.tensor(get_special_token_ids(model.tokenizer), dtype=torch.long)  # type: ignore[arg-type]
    rows = training_rows(model, train, exclude, args)
    token_file = args.workdir / f"tokens_{args.tokens}.pt"
    torch.save(rows, token_file)
    print(f"token stream: {rows.shape[0]} rows of {CONTEXT} -> {token_file}; excluded ids {exclude.tolist()}", flush=True)
    return Inputs(model, train, heldout, exclude, rows, token_file)


def dataset_name(path: str, train: Any) -> str:
    """How results.json names the training data: ``embedded``, or a directory's name and size."""
    return path if path == EMBEDDED_DATASET else f"{Path(path).name} ({len(train)} train documents)"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    inputs = prepare(args)
    setup = {"model": MODEL, "layer": args.layer, "d_sae": args.d_sae, "context_size": CONTEXT, "batch": args.batch,
             "lr": args.lr, "lm_dtype": args.lm_dtype, "our_lm_forward": args.our_lm_forward, "our_auxk": args.our_auxk, "train_dataset": dataset_name(args.train_dataset, inputs.train), "eval_tokens": args.eval_tokens,
             "heldout_positions": int(torch.isin(inputs.heldout, inputs.exclude, invert=True).sum())}
    results_path = args.out / "results.json"
    results = load_results(results_path, setup)

    done = []
    for system in args.systems:
        for level in args.levels[system]:
            key = run_key(system, level, args.tokens)
            if key in results["runs"] and not args.force:
                print(f"{key}: in {results_path}, skipped (--force retrains)", flush=True)
                continue
            splice, info = train(system, level, inputs, args)
            row = {"name": f"{system} {level_name(system, level)}", "system": system, "family": SYSTEMS[system][0],
                   "level": level, "tokens": args.tokens, **info, "tokens_per_s": info["train_tokens"] / info["train_seconds"],
                   "threads": torch.get_num_threads(), **evaluate(splice, inputs, args.d_sae)}
            results["runs"][key] = row
            write_json(results_path, results)
            done.append(row)
            print(f"{key}: L0 {row['l0']:.1f}, FVU {row['fvu']:.3f}, ΔCE {row['ce_loss_increase']:.4f}, "
                  f"{info['train_seconds']:.1f} s training ({row['tokens_per_s']:.0f} tokens/s)", flush=True)

    write_json(results_path, results)
    if done:
        print(format_table(done))
    budget = [r for r in results["runs"].values() if r["tokens"] == args.tokens]
    plot(budget, args.out)
    text = table(results)
    (args.out / "table.md").write_text(text)
    print(text)
    ratio = speed_ratio(budget)
    if ratio is not None:
        print(f"k={SPEED_K} training tokens/s, ours topk_transcoder / sparsify: {ratio:.2f}")


if __name__ == "__main__":
    main()
