"""Build runner configs from files and SAELens's own command-line flags.

Flags are parsed by SAELens's parser (so every SAELens flag works unchanged);
with ``--config FILE`` only the flags the user actually typed override the file.
"""

import json
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig
from sae_lens.registry import get_sae_training_class

from sae_lens_transcoder._sae_lens_privates import parse_cfg_args
from sae_lens_transcoder.validation import check_number_fields


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A runner config dict (``LanguageModelSAERunnerConfig.from_dict`` format) from YAML/JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file.")
    text = path.read_text()
    is_json = path.suffix == ".json"
    try:
        data = json.loads(text) if is_json else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"--config {path}: not valid {'JSON' if is_json else 'YAML'} ({e}).") from e
    if not isinstance(data, dict) or not isinstance(data.get("sae"), dict):
        raise ValueError(f"{path}: expected a mapping with an 'sae' section (architecture, d_in, ...).")
    return data


def runner_config_from_dict(data: dict[str, Any]) -> LanguageModelSAERunnerConfig[Any]:
    """``from_dict`` that also accepts a missing or partial ``logger`` section.

    Numbers are checked first: SAELens's ``__post_init__`` does arithmetic on some of them,
    so a quoted YAML value would fail there as a bare TypeError.
    """
    check_number_fields(data)
    return LanguageModelSAERunnerConfig.from_dict({**data, "logger": dict(data.get("logger") or {})})


def _given_flag_names(args: Sequence[str]) -> list[str]:
    names = []
    for arg in args:
        if arg.startswith("--"):
            names.append(arg[2:].split("=", 1)[0])
    return names


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def _override(data: dict[str, Any], cfg: LanguageModelSAERunnerConfig[Any], flag: str) -> None:
    """Copy the parsed value of one typed flag into the file's dict."""
    runner_fields = _field_names(LanguageModelSAERunnerConfig)
    sae_fields = _field_names(type(cfg.sae))
    logger_fields = _field_names(LoggingConfig)
    name = flag
    if name not in runner_fields | sae_fields | logger_fields | {"sae.dtype", "sae.device"}:
        if name.startswith("no") and name[2:] in runner_fields | sae_fields | logger_fields:
            name = name[2:]  # simple_parsing's --noFLAG for booleans
        else:
            return
    if name.startswith("sae."):
        data["sae"][name[4:]] = getattr(cfg.sae, name[4:])
    elif name in runner_fields:
        data[name] = getattr(cfg, name)
    elif name in sae_fields:
        data["sae"][name] = getattr(cfg.sae, name)
    else:
        data.setdefault("logger", {})[name] = getattr(cfg.logger, name)


def runner_config_from_args(
    args: Sequence[str], config_file: str | Path | None = None
) -> LanguageModelSAERunnerConfig[Any]:
    """SAELens CLI flags, optionally on top of a config file."""
    if config_file is None:
        return parse_cfg_args(list(args))
    data = load_config_file(config_file)
    data["sae"] = dict(data["sae"])
    args = list(args)
    flags = _given_flag_names(args)
    if "architecture" not in flags and "sae" not in flags:
        args = ["--architecture", data["sae"].get("architecture", "transcoder"), *args]
    parsed = parse_cfg_args(args)
    if "architecture" in flags or "sae" in flags:
        data["sae"]["architecture"] = parsed.sae.architecture()
    get_sae_training_class(data["sae"]["architecture"])  # clear KeyError for unknown ones
    for flag in flags:
        _override(data, parsed, flag)
    return runner_config_from_dict(data)
