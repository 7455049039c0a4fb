"""The checkpointable shuffle buffer: a restored buffer serves what the original would have."""

from collections.abc import Callable

import pytest
import torch

from sae_lens_transcoder.training.shuffle_buffer import ShuffleBuffer


def _counting_source(rows: int) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """A source of consecutive row numbers, ``rows`` a batch, and its skip (advance, no rows)."""
    position = [0]

    def source() -> torch.Tensor:
        out = torch.arange(position[0], position[0] + rows, dtype=torch.float32)[:, None]
        position[0] += rows
        return out

    def skip() -> None:
        position[0] += rows

    return source, skip


@pytest.mark.parametrize("mix_fraction", [0.0, 0.5], ids=["whole-batches", "mixed"])
def test_a_restored_buffer_continues_as_the_original(mix_fraction: float) -> None:
    """Also when the buffer split into whole batches and kept no remainder (mix_fraction 0):
    restoring that state used to fail at the first batch."""
    source, _ = _counting_source(4)
    original = iter(ShuffleBuffer(source, buffer_size=8, batch_size=4, mix_fraction=mix_fraction, seed=3))
    for _ in range(3):
        _, state = next(original)
    expected = [next(original)[0] for _ in range(5)]
    source, skip = _counting_source(4)
    restored = ShuffleBuffer(source, buffer_size=8, batch_size=4, mix_fraction=mix_fraction, seed=3)
    restored.restore(state, skip)
    served = iter(restored)
    for batch in expected:
        assert torch.equal(next(served)[0], batch)
