"""``sae-lens-transcoder``: train and evaluate transcoders from the shell.

SAELens's own CLI never imports plugins; this one registers the transcoder first and
then hands every training flag to SAELens's parser.
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import sae_lens_transcoder  # noqa: F401  (registers architecture="transcoder")
from sae_lens_transcoder.config_io import runner_config_from_args
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.llm_transcoder_training_runner import TranscoderTrainingRunner
from sae_lens_transcoder.report import format_table, heldout_tokens, load_heldout_split


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.tolist()
        elif isinstance(value, list):
            out[key] = [_jsonable(v) if isinstance(v, dict) else v for v in value]
        else:
            out[key] = value
    return out


def train(argv: Sequence[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="sae-lens-transcoder train",
        description="Train a transcoder. All SAELens training flags are accepted "
        "(see `sae-lens-transcoder train --help-sae-lens`); flags override --config.",
    )
    parser.add_argument("--config", help="YAML/JSON runner config (LanguageModelSAERunnerConfig.from_dict format)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens for the final table (0: skip)")
    parser.add_argument("--json", help="write the final metrics here")
    parser.add_argument("--help-sae-lens", action="store_true", help="list SAELens's flags")
    ours, sae_lens_args = parser.parse_known_args(argv)
    if ours.help_sae_lens:
        runner_config_from_args(["--architecture", "transcoder", "--help"])
    cfg = runner_config_from_args(sae_lens_args, config_file=ours.config)
    start = time.perf_counter()
    runner = TranscoderTrainingRunner(cfg)
    sae = runner.run()
    wall = time.perf_counter() - start
    summary: dict[str, Any] = {
        "name": f"{cfg.model_name}:{cfg.hook_name}",
        "wall_time_s": wall,
        "training_tokens": cfg.training_tokens,
        "tokens_per_s": cfg.training_tokens / wall,
        "output_path": cfg.output_path,
    }
    if ours.eval_tokens > 0:
        heldout = load_heldout_split(cfg.dataset_path)
        tokens = heldout_tokens(runner.model, heldout, cfg.context_size, ours.eval_tokens, cfg.prepend_bos)  # type: ignore[arg-type]
        metrics = evaluate_spliced(
            runner.model,  # type: ignore[arg-type]
            [sae],
            tokens,
            exclude_special_tokens=runner.activations_store.exclude_special_tokens,
        )
        summary.update({k: v for k, v in metrics.items() if k not in ("feature_density", "per_transcoder")})
        print(format_table([summary]))
    print(
        f"trained {cfg.training_tokens:,} tokens in {wall:.0f} s "
        f"({summary['tokens_per_s']:.0f} tokens/s); transcoder saved to {cfg.output_path}"
    )
    if ours.json:
        Path(ours.json).write_text(json.dumps(_jsonable(summary), indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train}
    if not argv or argv[0] not in commands:
        print(f"usage: sae-lens-transcoder {{{','.join(commands)}}} [options]", file=sys.stderr)
        raise SystemExit(2)
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
