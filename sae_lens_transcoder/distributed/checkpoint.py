"""What a checkpoint of an N-rank run holds per rank, and finding the last complete one.

Every rank's data position (shuffle buffer, token position, shuffle RNG) is its own, so each
rank writes its own stream-state file into the checkpoint directory being built, which must
therefore be on a filesystem all ranks share; the rest is written once, by rank 0. A
checkpoint resumes only with the number of ranks that wrote it: the data positions are the
ranks' shards of the stream, and they cannot be re-split exactly.
"""

import re
from pathlib import Path

from sae_lens_transcoder.distributed.world import World

SINGLE_STREAM_STATE = "stream_state.safetensors"
_RANK_FILE = re.compile(r"stream_state\.rank(\d+)-of-(\d+)\.safetensors")


def stream_state_name(world: World) -> str:
    """One process keeps the name of the single-process format; ranks get their own files."""
    if not world.is_distributed:
        return SINGLE_STREAM_STATE
    return f"stream_state.rank{world.rank}-of-{world.size}.safetensors"


def written_world_size(checkpoint: Path) -> int | None:
    """How many ranks wrote ``checkpoint`` (None: no stream state at all)."""
    if (checkpoint / SINGLE_STREAM_STATE).is_file():
        return 1
    sizes = {int(m.group(2)) for p in checkpoint.iterdir() if (m := _RANK_FILE.fullmatch(p.name))}
    return max(sizes) if sizes else None


def stream_state_to_read(checkpoint: Path, world: World) -> Path:
    """This rank's stream state in ``checkpoint``, refusing a checkpoint of another world size."""
    path = checkpoint / stream_state_name(world)
    if path.is_file():
        return path
    written = written_world_size(checkpoint)
    if written is None:
        raise FileNotFoundError(
            f"{checkpoint} holds no stream state: the checkpoint was not written by this plugin's runner, "
            "so its data position cannot be restored. Resume from a checkpoint of this run."
        )
    if written != world.size:
        raise ValueError(
            f"{checkpoint} was written by a run of {written} rank(s); this run has {world.size}. Each rank's "
            f"data position is its own shard of the stream, so resume with exactly {written} rank(s) "
            f"(torchrun --nnodes × --nproc_per_node = {written})."
        )
    raise FileNotFoundError(f"{path} is missing: the checkpoint lacks rank {world.rank}'s data position.")


def latest_complete_checkpoint(base: Path, marker: str, pattern: str = "*/*") -> Path | None:
    """The most recently completed checkpoint among the runs under ``base`` (SAELens puts
    each run's checkpoints in ``<checkpoint_path>/<run id>/<tokens trained>``; ``pattern="*"``
    looks in one run's directory). Newest, not furthest: after a restart the restarted run's
    checkpoints are the ones to go on from."""
    if not base.is_dir():
        return None
    found = [c for c in base.glob(pattern) if c.name.isdigit() and (c / marker).is_file()]
    return max(found, key=lambda c: ((c / marker).stat().st_mtime_ns, int(c.name)), default=None)
