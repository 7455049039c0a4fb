"""Work over many prompts shared by the ranks (attribution graphs, one prompt at a time).

Rank r takes prompts r, r + N, r + 2N, ... and each prompt's work writes into a folder of its
own; the per-prompt results come back to rank 0 in prompt order, for the one index rank 0
writes. One process is the world of one: every prompt, in order.
"""

from collections.abc import Callable
from typing import Any

from sae_lens_transcoder.distributed.collectives import all_ranks_ok, gather_to_writer
from sae_lens_transcoder.distributed.world import World


class PromptsFailed(RuntimeError):
    """Some prompt's work failed on some rank; the other prompts' results were kept."""


def rank_prompts(n_prompts: int, world: World) -> list[int]:
    """The prompt indices this rank works on (round-robin, so long and short prompts mix)."""
    return list(range(world.rank, n_prompts, world.size))


def over_prompts(prompts: list[str], work: Callable[[int, str], dict[str, Any]], world: World) -> list[dict[str, Any]] | None:
    """``work(i, prompt)`` for this rank's prompts; on rank 0 every prompt's result in prompt
    order (None on the others). A rank whose prompt fails stops its own work but still joins
    the gather, so no rank waits forever; then every rank raises :class:`PromptsFailed` (rank
    0's names each failed prompt and its error). The folders of prompts done are kept."""
    done: dict[int, dict[str, Any]] = {}
    failure: str | None = None
    for i in rank_prompts(len(prompts), world):
        try:
            done[i] = work(i, prompts[i])
        except (Exception, SystemExit) as error:  # noqa: BLE001  (a bad input exits; reported on every rank once the ranks agree)
            failure = f"prompt {i} ({prompts[i]!r}) failed on rank {world.rank}: {error}"
            break
    gathered = gather_to_writer((done, failure), world, "gathering the prompts' results")
    ok = all_ranks_ok(failure is None, "agreeing that every prompt was done") if world.is_distributed else failure is None
    if not ok:
        failures = [f for _, f in gathered or [] if f is not None]
        raise PromptsFailed("; ".join(failures) if failures else "a prompt failed on another rank (see rank 0's error)")
    if gathered is None:
        return None
    results = {i: result for part, _ in gathered for i, result in part.items()}
    return [results[i] for i in range(len(prompts))]
