"""Train the bundled tiny GPT-2-style model so tests have a real (not random) LM offline.

Trains a byte-level BPE tokenizer and a 2-layer TransformerLens ``HookedTransformer`` on
the embedded corpus' train split, for a fixed number of steps (deterministic for a given
torch version and thread count), then writes ``sae_lens_transcoder/assets/tiny-gpt2/``.

Rebuild with::

    python scripts/train_tiny_model.py
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer, PreTrainedTokenizerFast, PreTrainedTokenizerBase

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "sae_lens_transcoder" / "assets"
SPECIAL = "<|endoftext|>"
MODEL_CONFIG = {
    "model_name": "tiny-gpt2",
    "n_layers": 2,
    "d_model": 128,
    "d_mlp": 512,
    "n_heads": 4,
    "d_head": 32,
    "n_ctx": 256,
    "d_vocab": 4096,
    "act_fn": "gelu",
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
    "original_architecture": "GPT2LMHeadModel",
    "default_prepend_bos": True,
    "seed": 0,
}


def train_tokenizer(texts: list[str], out_dir: Path) -> PreTrainedTokenizerBase:
    """Train byte-level BPE, save it, and return the copy reloaded from disk.

    TransformerLens re-opens the tokenizer from ``name_or_path`` to add BOS, so the
    returned tokenizer must point at the saved directory, not at an in-memory object.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MODEL_CONFIG["d_vocab"],
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL,
        eos_token=SPECIAL,
        pad_token=SPECIAL,
        model_max_length=MODEL_CONFIG["n_ctx"],
    )
    fast.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """Documents joined by BOS, as SAELens' ActivationsStore concatenates them."""
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    for doc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.append(bos)
        ids.extend(doc)
    return torch.tensor(ids, dtype=torch.long)


def to_sequences(stream: torch.Tensor, n_ctx: int, bos: int) -> torch.Tensor:
    """Non-overlapping windows of n_ctx - 1 tokens, each prefixed with BOS."""
    body = n_ctx - 1
    windows = stream[: len(stream) // body * body].view(-1, body)
    return torch.cat([torch.full((len(windows), 1), bos), windows], dim=1)


def next_token_loss(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    # F.cross_entropy on logits is several times faster on CPU than return_type="loss".
    logits = model(tokens[:, :-1], return_type="logits")
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


@torch.no_grad()
def held_out_loss(model: HookedTransformer, seqs: torch.Tensor, batch_size: int = 32) -> float:
    total = sum(next_token_loss(model, b).item() * len(b) for b in seqs.split(batch_size))
    return total / len(seqs)


def unigram_loss(train_stream: torch.Tensor, test_seqs: torch.Tensor, vocab: int) -> float:
    """Cross-entropy of add-one-smoothed train token frequencies on the held-out targets."""
    counts = torch.bincount(train_stream, minlength=vocab).double() + 1
    log_p = (counts / counts.sum()).log()
    return -log_p[test_seqs[:, 1:].flatten()].mean().item()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def write_outputs(model: HookedTransformer, out_dir: Path, readme: str) -> None:
    params = {k: v.detach().to(torch.float16).contiguous() for k, v in model.named_parameters()}
    save_file(params, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")
    (out_dir / "README.md").write_text(readme)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2800)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=ASSETS / "tiny-gpt2")
    args = parser.parse_args()

    start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(MODEL_CONFIG["seed"])
    corpus = str(ASSETS / "text")
    train_texts = list(datasets.load_dataset(corpus, split="train")["text"])
    test_texts = list(datasets.load_dataset(corpus, split="test")["text"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(train_texts, args.out_dir)

    n_ctx, bos = MODEL_CONFIG["n_ctx"], tokenizer.bos_token_id
    train_stream = token_stream(tokenizer, train_texts)
    test_stream = token_stream(tokenizer, test_texts)
    train_seqs = to_sequences(train_stream, n_ctx, bos)
    test_seqs = to_sequences(test_stream, n_ctx, bos)
    print(f"tokens: train {len(train_stream):,}, test {len(test_stream):,}", flush=True)

    model = HookedTransformer(HookedTransformerConfig(**MODEL_CONFIG), tokenizer)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(MODEL_CONFIG["seed"])
    order = torch.randperm(len(train_seqs), generator=generator)
    cursor = 0
    for step in range(args.steps):
        if cursor + args.batch_size > len(order):  # new epoch, new order
            order, cursor = torch.randperm(len(train_seqs), generator=generator), 0
        batch = train_seqs[order[cursor : cursor + args.batch_size]]
        cursor += args.batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = next_token_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            elapsed = time.time() - start
            print(f"step {step}: train loss {loss.item():.3f} ({elapsed:.0f}s)", flush=True)

    model_loss = held_out_loss(model, test_seqs)
    base_loss = unigram_loss(train_stream, test_seqs, MODEL_CONFIG["d_vocab"])
    minutes = (time.time() - start) / 60
    print(f"held-out loss: model {model_loss:.3f}, unigram {base_loss:.3f} nats/token")
    print(f"wall time {minutes:.1f} min")
    readme = (
        "# tiny-gpt2\n\n"
        "A 2-layer GPT-2-style TransformerLens model (d_model 128, d_mlp 512, 4 heads, n_ctx 256,\n"
        "byte-level BPE vocabulary of 4096) trained on the embedded corpus\n"
        "(`sae_lens_transcoder/assets/text`), so tests can use a real language model offline.\n\n"
        f"Rebuild (the build below took {minutes:.0f} min with {args.threads} CPU threads):\n\n"
        "```\npython scripts/build_corpus.py      # only if the corpus changed\n"
        f"python scripts/train_tiny_model.py --steps {args.steps} --batch-size {args.batch_size}"
        f" --lr {args.lr} --threads {args.threads}\n```\n\n"
        f"Tokens: train split {len(train_stream):,}, test split {len(test_stream):,}"
        f" ({args.steps * args.batch_size * (n_ctx - 1):,} seen in training).\n\n"
        f"Held-out (test split) loss: **{model_loss:.3f}** nats/token, against {base_loss:.3f}"
        " for a unigram model fitted on the train split.\n\n"
        "Weights are stored in float16; `sae_lens_transcoder.models.tiny.load_tiny_model`\n"
        "rebuilds the model from `config.json` and the tokenizer files here.\n"
    )
    write_outputs(model, args.out_dir, readme)


if __name__ == "__main__":
    main()
