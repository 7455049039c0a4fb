"""A token-shuffling buffer whose exact state can be saved, so resumed training is bit-exact.

SAELens's ``mixing_buffer`` is a generator: its buffered activations and the global RNG it
shuffles with cannot be captured at a checkpoint, so a resumed run sees other batches. This
buffer runs the same algorithm (fill to ``buffer_size``, shuffle, keep ``mix_fraction`` for
mixing, serve the rest in batches) with its own ``torch.Generator``, and hands out with every
batch an immutable :class:`StreamState` of everything needed to continue from there.
"""

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class StreamState:
    """Where the batch stream stands right after one batch was handed out.

    Tensors are never modified in place by the buffer, so holding a state costs no copy.
    """

    n_source_batches: int
    storage: torch.Tensor
    serving: torch.Tensor
    n_served: int
    generator_state: torch.Tensor

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors for a safetensors file."""
        return {
            "n_source_batches": torch.tensor(self.n_source_batches),
            "storage": self.storage.contiguous(),
            "serving": self.serving[self.n_served :].contiguous(),
            "generator_state": self.generator_state,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "StreamState":
        return cls(
            n_source_batches=int(tensors["n_source_batches"].item()),
            storage=tensors["storage"],
            serving=tensors["serving"],
            n_served=0,
            generator_state=tensors["generator_state"],
        )


class ShuffleBuffer:
    """Serves shuffled ``batch_size`` rows from rows pulled batch by batch from ``source``."""

    def __init__(
        self,
        source: Callable[[], torch.Tensor],
        buffer_size: int,
        batch_size: int,
        mix_fraction: float,
        seed: int,
    ):
        if buffer_size < batch_size:
            raise ValueError(
                f"the shuffle buffer ({buffer_size} tokens) is smaller than one training batch "
                f"({batch_size} tokens); raise n_batches_in_buffer."
            )
        if not 0 <= mix_fraction <= 1:
            raise ValueError(f"activations_mixing_fraction must be in [0, 1]; got {mix_fraction}.")
        self.source = source
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.mix_fraction = mix_fraction
        self.generator = torch.Generator().manual_seed(seed)
        self.n_source_batches = 0
        self.storage: torch.Tensor | None = None
        self.serving: torch.Tensor | None = None
        self.n_served = 0
        self._generator_state = self.generator.get_state()

    def restore(self, state: StreamState, skip_source_batch: Callable[[], None]) -> None:
        """Continue from ``state``; ``skip_source_batch`` advances the source by one batch
        without computing it (the source must be at its start)."""
        for _ in range(state.n_source_batches - self.n_source_batches):
            skip_source_batch()
        self.n_source_batches = state.n_source_batches
        self.serving = state.serving if state.serving.numel() else None
        # Rows still to serve beside an empty remainder (a buffer that split into whole
        # batches): the remainder is an empty tensor, as when the state was taken, not none.
        self.storage = state.storage if state.storage.numel() or self.serving is not None else None
        self.n_served = state.n_served
        self.generator.set_state(state.generator_state)
        self._generator_state = state.generator_state

    def state(self) -> StreamState:
        """The current position (before any batch: the start)."""
        empty = torch.empty(0)
        return StreamState(
            self.n_source_batches,
            empty if self.storage is None else self.storage,
            empty if self.serving is None else self.serving,
            self.n_served,
            self._generator_state,
        )

    def _refill(self) -> None:
        storage = self.storage
        while storage is None or storage.shape[0] < self.buffer_size:
            rows = self.source()
            self.n_source_batches += 1
            storage = rows if storage is None else torch.cat([storage, rows], dim=0)
        if self.mix_fraction > 0:
            order = torch.randperm(storage.shape[0], generator=self.generator).to(storage.device)
            storage = storage[order]
            self._generator_state = self.generator.get_state()
        keep = int(self.buffer_size * self.mix_fraction)
        n_batches = max(1, (storage.shape[0] - keep) // self.batch_size)
        cutoff = n_batches * self.batch_size
        self.serving, self.storage, self.n_served = storage[:cutoff], storage[cutoff:], 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, StreamState]]:
        while True:
            if self.serving is None or self.n_served >= self.serving.shape[0]:
                self._refill()
            assert self.serving is not None and self.storage is not None
            batch = self.serving[self.n_served : self.n_served + self.batch_size]
            self.n_served += self.batch_size
            yield batch, self.state()


class TrackedBatches(Iterator[T]):
    """The trainer's data provider: batches from ``(batch, state)`` pairs, remembering the
    state after the last batch handed out. A prefetching source runs ahead of the trainer;
    this is the position a checkpoint must record. ``split`` turns each packed batch into what
    the trainer takes (e.g. one slice per transcoder)."""

    def __init__(
        self,
        source: Iterator[tuple[torch.Tensor, StreamState]],
        start: StreamState,
        split: Callable[[torch.Tensor], T],
    ):
        self.source = source
        self.state = start
        self.split = split
        self._replay: deque[tuple[torch.Tensor, StreamState]] = deque()
        self._recording: list[tuple[torch.Tensor, StreamState]] | None = None

    def __next__(self) -> T:
        batch, self.state = self._replay.popleft() if self._replay else next(self.source)
        if self._recording is not None:
            self._recording.append((batch, self.state))
        return self.split(batch)

    @contextmanager
    def replayed(self) -> Iterator[None]:
        """Batches handed out inside are handed out again, in order, afterwards, and the
        position moves back to where it was: a look at what comes next that trains on it all."""
        start, self._recording = self.state, []
        try:
            yield
        finally:
            recorded, self._recording = self._recording, None
            self._replay.extendleft(reversed(recorded))
            self.state = start

    def paused(self) -> AbstractContextManager[None]:
        """Stop a prefetching source while the model is used for something else (evals)."""
        pause = getattr(self.source, "paused", None)
        return pause() if pause is not None else nullcontext()
