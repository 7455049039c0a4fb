"""Held-out evaluation after training, and the table the CLI prints."""

from collections.abc import Sequence
from typing import Any

import datasets
import torch
from transformer_lens import HookedTransformer
from transformer_lens.utils import tokenize_and_concatenate

from sae_lens_transcoder.data import resolve_dataset_path

HELDOUT_SPLITS = ("test", "validation")

TABLE_COLUMNS = (
    ("name", "transcoder", "{}"),
    ("l0", "L0", "{:.1f}"),
    ("explained_variance", "EV(mlp_out)", "{:.3f}"),
    ("ce_loss_clean", "CE clean", "{:.4f}"),
    ("ce_loss_spliced", "CE spliced", "{:.4f}"),
    ("ce_loss_zero_ablation", "CE zero-abl", "{:.4f}"),
    ("ce_loss_recovered", "CE recovered", "{:.1%}"),
    ("kl_div", "KL", "{:.4f}"),
    ("dead_features", "dead", "{}"),
)


def load_heldout_split(dataset_path: str, split: str | None = None) -> datasets.Dataset:
    """The held-out split of a dataset (``test``, else ``validation``), never ``train``."""
    path = resolve_dataset_path(dataset_path)
    splits = [split] if split else list(HELDOUT_SPLITS)
    errors = []
    for name in splits:
        try:
            dataset = datasets.load_dataset(path, split=name)
        except (ValueError, KeyError) as err:
            errors.append(f"{name}: {err}")
            continue
        assert isinstance(dataset, datasets.Dataset)
        return dataset
    raise ValueError(
        f"dataset {dataset_path!r} has no held-out split ({', '.join(splits)}): "
        + "; ".join(errors)
    )


def heldout_tokens(
    model: HookedTransformer,
    dataset: datasets.Dataset,
    context_size: int,
    n_tokens: int,
    prepend_bos: bool = True,
) -> torch.Tensor:
    """``[n_seq, context_size]`` token ids covering about ``n_tokens`` held-out tokens."""
    n_seq = max(1, n_tokens // context_size)
    n_docs = min(len(dataset), n_seq * 16)
    tokenized = tokenize_and_concatenate(
        dataset.select(range(n_docs)),
        model.tokenizer,  # type: ignore[arg-type]
        max_length=context_size,
        add_bos_token=prepend_bos,
        num_proc=1,
    )
    ids = tokenized["tokens"][:n_seq]
    assert isinstance(ids, torch.Tensor)
    if ids.shape[0] < n_seq:
        raise ValueError(f"held-out split has only {ids.shape[0]} sequences of {context_size} tokens; wanted {n_seq}.")
    return ids


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width table of evaluation rows (missing values shown as '-')."""
    header = [title for _, title, _ in TABLE_COLUMNS]
    body = [
        [fmt.format(row[key]) if key in row else "-" for key, _, fmt in TABLE_COLUMNS]
        for row in rows
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *body)]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
