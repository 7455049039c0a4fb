"""The paper's pickled GPT-2 transcoders, converted without running code from the file.

Each test writes a file in the release's exact layout (``torch.save`` of ``{"cfg": <config
object>, "state_dict": <module state dict>}``) with a config class defined here, whose
``__setstate__`` raises: plain ``torch.load`` cannot even read these files, so a loader that
reads them has not rebuilt the class.
"""

import builtins
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.transcoder import Transcoder
from torch import nn

from sae_lens_transcoder.convert import UnsafePickleError, convert_pchlenski_transcoder, load_pchlenski_transcoder

D_IN, D_SAE, LAYER = 16, 48, 8


@dataclass
class LanguageModelSAERunnerConfig:
    """The fields the paper's ``sae_training.config`` class pickles (its values for GPT-2 layer 8)."""

    model_name: str = "gpt2-small"
    hook_point: str = f"blocks.{LAYER}.ln2.hook_normalized"
    hook_point_layer: int = LAYER
    hook_point_head_index: int | None = None
    dataset_path: str = "Skylion007/openwebtext"
    is_dataset_tokenized: bool = False
    context_size: int = 128
    d_in: int = D_IN
    expansion_factor: int = D_SAE // D_IN
    d_sae: int = D_SAE
    is_transcoder: bool = True
    out_hook_point: str | None = f"blocks.{LAYER}.hook_mlp_out"
    out_hook_point_layer: int | None = LAYER
    d_out: int | None = D_IN
    l1_coefficient: float = 1.4e-4
    lr: float = 4e-4
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    def __setstate__(self, state: dict[str, Any]) -> None:
        raise AssertionError("the config class was rebuilt: code from the file ran")


class PaperTranscoder(nn.Module):
    """The release's parameters, so the state dict is what ``nn.Module.state_dict()`` pickles."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5)
        self.b_enc = nn.Parameter(0.1 * torch.randn(D_SAE, generator=g))
        self.W_dec = nn.Parameter(torch.randn(D_SAE, D_IN, generator=g) / D_SAE**0.5)
        self.b_dec = nn.Parameter(torch.randn(D_IN, generator=g))
        self.b_dec_out = nn.Parameter(torch.randn(D_IN, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's forward pass: the pre-bias is subtracted from the input."""
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc) @ self.W_dec + self.b_dec_out


def release_file(tmp_path: Path, payload: dict[str, Any]) -> Path:
    path = tmp_path / f"final_sparse_autoencoder_gpt2-small_blocks.{LAYER}.ln2.hook_normalized_{D_SAE}.pt"
    torch.save(payload, path)
    return path


@pytest.fixture
def paper() -> PaperTranscoder:
    return PaperTranscoder(seed=0)


@pytest.fixture
def release(tmp_path: Path, paper: PaperTranscoder) -> Path:
    return release_file(tmp_path, {"cfg": LanguageModelSAERunnerConfig(), "state_dict": paper.state_dict()})


def inputs() -> torch.Tensor:
    return torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1))


def test_plain_torch_load_would_rebuild_the_config_class(release: Path) -> None:
    with pytest.raises(AssertionError, match="config class was rebuilt"):
        torch.load(release, weights_only=False)


def check_equal_to_paper(transcoder: SAE[Any], paper: PaperTranscoder) -> None:
    x = inputs()
    with torch.no_grad():
        expected_acts = torch.relu((x - paper.b_dec) @ paper.W_enc + paper.b_enc)
        assert (expected_acts > 0).float().mean() > 0.2  # the fold is exercised on active features
        torch.testing.assert_close(transcoder.encode(x), expected_acts, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(transcoder(x), paper(x), atol=1e-5, rtol=1e-5)


def test_loaded_transcoder_computes_the_papers_formula(release: Path, paper: PaperTranscoder) -> None:
    transcoder = load_pchlenski_transcoder(release)
    assert type(transcoder) is Transcoder
    meta = transcoder.cfg.metadata
    assert (meta.hook_name, meta.hook_name_out) == (f"blocks.{LAYER}.ln2.hook_normalized", f"blocks.{LAYER}.hook_mlp_out")
    assert meta.model_name == "gpt2"
    assert (meta.dataset_path, meta.context_size) == ("Skylion007/openwebtext", 128)
    assert (transcoder.cfg.d_in, transcoder.cfg.d_sae, transcoder.cfg.d_out) == (D_IN, D_SAE, D_IN)
    assert not transcoder.cfg.apply_b_dec_to_input
    check_equal_to_paper(transcoder, paper)


def test_converted_directory_loads_with_plain_sae_lens(release: Path, paper: PaperTranscoder, tmp_path: Path) -> None:
    out = convert_pchlenski_transcoder(release, tmp_path / "converted")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    loaded = SAE.load_from_disk(out)
    assert type(loaded) is Transcoder
    assert loaded.cfg.metadata.hook_name_out == f"blocks.{LAYER}.hook_mlp_out"
    assert loaded.cfg.metadata.model_from_pretrained_kwargs["center_writing_weights"] is True
    check_equal_to_paper(loaded, paper)


def test_legacy_torch_save_format_loads_too(tmp_path: Path, paper: PaperTranscoder) -> None:
    """Files saved by torch before 1.6 (or with the zip format turned off) use another layout."""
    path = tmp_path / "legacy.pt"
    payload = {"cfg": LanguageModelSAERunnerConfig(), "state_dict": paper.state_dict()}
    torch.save(payload, path, _use_new_zipfile_serialization=False)
    check_equal_to_paper(load_pchlenski_transcoder(path), paper)


def test_config_without_out_hook_point_gets_the_mlp_output(tmp_path: Path, paper: PaperTranscoder) -> None:
    path = release_file(tmp_path, {"cfg": LanguageModelSAERunnerConfig(out_hook_point=None), "state_dict": paper.state_dict()})
    assert load_pchlenski_transcoder(path).cfg.metadata.hook_name_out == f"blocks.{LAYER}.hook_mlp_out"


class RunsShellOnLoad:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class EvalsOnLoad:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').write('ran')",))


class ExecsOnLoad:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.parametrize(("payload_class", "callable_name"), [
    (RunsShellOnLoad, f"{os.system.__module__}.system"),
    (EvalsOnLoad, "builtins.eval"),
    (ExecsOnLoad, "builtins.exec"),
])
def test_file_that_runs_code_on_load_is_refused(tmp_path: Path, paper: PaperTranscoder, payload_class: type, callable_name: str) -> None:
    marker = tmp_path / "marker"
    path = release_file(tmp_path, {"cfg": payload_class(marker), "state_dict": paper.state_dict()})
    with pytest.raises(UnsafePickleError, match=f"asks to call {callable_name}"):
        load_pchlenski_transcoder(path)
    with pytest.raises(UnsafePickleError):
        convert_pchlenski_transcoder(path, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_the_crafted_payload_does_run_under_plain_torch_load(tmp_path: Path, paper: PaperTranscoder) -> None:
    """So the refusal above is the loader's doing, not a payload that never works."""
    marker = tmp_path / "marker"
    path = release_file(tmp_path, {"cfg": ExecsOnLoad(marker), "state_dict": paper.state_dict()})
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"


def test_malicious_tensor_entry_is_refused_too(tmp_path: Path, paper: PaperTranscoder) -> None:
    marker = tmp_path / "marker"
    state = {**paper.state_dict(), "W_enc": EvalsOnLoad(marker)}
    path = release_file(tmp_path, {"cfg": LanguageModelSAERunnerConfig(), "state_dict": state})
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_pchlenski_transcoder(path)
    assert not marker.exists()


def test_truncated_file_gives_a_clear_error(release: Path) -> None:
    data = release.read_bytes()
    release.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupt or of another format"):
        load_pchlenski_transcoder(release)


def test_garbage_file_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "not_a_checkpoint.pt"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match="cannot be read as a torch.save checkpoint"):
        load_pchlenski_transcoder(path)


def test_sae_without_output_bias_is_named(tmp_path: Path, paper: PaperTranscoder) -> None:
    state = {k: v for k, v in paper.state_dict().items() if k != "b_dec_out"}
    path = release_file(tmp_path, {"cfg": LanguageModelSAERunnerConfig(is_transcoder=False), "state_dict": state})
    with pytest.raises(ValueError, match="no 'b_dec_out': this is an SAE"):
        load_pchlenski_transcoder(path)


def test_config_disagreeing_with_weights_is_named(tmp_path: Path, paper: PaperTranscoder) -> None:
    path = release_file(tmp_path, {"cfg": LanguageModelSAERunnerConfig(d_sae=999), "state_dict": paper.state_dict()})
    with pytest.raises(ValueError, match="cfg.d_sae is 999 but the weights have d_sae 48"):
        load_pchlenski_transcoder(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pchlenski_transcoder(tmp_path / "nope.pt")


def test_convert_command_writes_a_sae_lens_directory_and_refuses_code(tmp_path: Path, release: Path, paper: PaperTranscoder, capsys: pytest.CaptureFixture[str]) -> None:
    from sae_lens_transcoder.cli import main

    main(["convert", "pchlenski", str(release), "--out", str(tmp_path / "cli-out")])
    assert str(tmp_path / "cli-out") in capsys.readouterr().out
    check_equal_to_paper(SAE.load_from_disk(tmp_path / "cli-out"), paper)
    marker = tmp_path / "marker"
    crafted = release_file(tmp_path, {"cfg": ExecsOnLoad(marker), "state_dict": paper.state_dict()})
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "pchlenski", str(crafted), "--out", str(tmp_path / "refused")])
    assert "sae-lens-transcoder convert:" in str(exit_info.value.code) and "Refused" in str(exit_info.value.code)
    assert not marker.exists() and not (tmp_path / "refused").exists()
