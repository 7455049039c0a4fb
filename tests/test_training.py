"""End-to-end training through SAELens's runner on a real HookedTransformer."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, LanguageModelSAERunnerConfig, Transcoder
from transformer_lens import HookedTransformer

from sae_lens_transcoder import TrainingTranscoder, TrainingTranscoderConfig, TranscoderTrainingRunner
from sae_lens_transcoder.evals import evaluate_spliced
from sae_lens_transcoder.llm_transcoder_training_runner import CHECKPOINT_COMPLETE_FILENAME
from sae_lens_transcoder.splicing import Splice
from tests.conftest import CONTEXT, D_MODEL, D_VOCAB

MakeConfig = Callable[..., LanguageModelSAERunnerConfig[TrainingTranscoderConfig]]


def _eval_tokens() -> torch.Tensor:
    return torch.randint(1, D_VOCAB, (8, CONTEXT), generator=torch.Generator().manual_seed(7))


def test_training_lowers_mse_and_raises_ev_against_mlp_out(
    make_runner_config: MakeConfig, gpt2_model: HookedTransformer, token_dataset: Any
) -> None:
    cfg = make_runner_config()
    runner = TranscoderTrainingRunner(cfg, override_model=gpt2_model, override_dataset=token_dataset)
    assert runner.cfg.hook_name == "blocks.1.mlp.hook_in"
    before = evaluate_spliced(gpt2_model, [Splice(runner.sae, cfg.hook_name, "blocks.1.hook_mlp_out")], _eval_tokens())
    sae = runner.run()
    after = evaluate_spliced(gpt2_model, [sae], _eval_tokens())
    assert after["mse"] < 0.3 * before["mse"]
    assert before["explained_variance"] < 0.2 < 0.6 < after["explained_variance"]


LOAD_WITHOUT_PLUGIN = """
import sys, torch
from sae_lens import SAE, Transcoder
sae = SAE.load_from_disk(sys.argv[1])
assert "sae_lens_transcoder" not in sys.modules
assert type(sae) is Transcoder, type(sae)
x = torch.load(sys.argv[2])
torch.save({"y": sae(x), "acts": sae.encode(x), "hook_name": sae.cfg.metadata.hook_name,
            "hook_name_out": sae.cfg.metadata.hook_name_out, "d_out": sae.cfg.d_out}, sys.argv[3])
"""


@pytest.mark.parametrize("normalize", ["none", "expected_average_only_in"])
def test_saved_transcoder_loads_in_plain_sae_lens_with_identical_outputs(
    make_runner_config: MakeConfig, gpt2_model: HookedTransformer, token_dataset: Any, tmp_path: Path, normalize: str
) -> None:
    out = tmp_path / "tc"
    cfg = make_runner_config(output_path=str(out), training_tokens=CONTEXT * 40, sae={"normalize_activations": normalize})
    sae = TranscoderTrainingRunner(cfg, override_model=gpt2_model, override_dataset=token_dataset).run()
    saved = json.loads((out / "cfg.json").read_text())
    assert saved["architecture"] == "transcoder" and saved["normalize_activations"] == "none"
    assert saved["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
    assert not list(tmp_path.glob(".tc.*"))  # no partial or old copy left beside it
    x = torch.randn(16, D_MODEL) * 3
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PLUGIN, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    loaded = torch.load(tmp_path / "y.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded["y"], sae(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(loaded["acts"], sae.encode(x), rtol=1e-6, atol=1e-6)
    assert (loaded["hook_name"], loaded["hook_name_out"], loaded["d_out"]) == ("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out", D_MODEL)


def test_scaling_factor_folds_exactly_into_saved_weights(tmp_path: Path) -> None:
    cfg = TrainingTranscoderConfig(d_in=D_MODEL, d_sae=96, d_out=48, normalize_activations="expected_average_only_in")
    tc = TrainingTranscoder(cfg)
    with torch.no_grad():
        for p in tc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scale, x = 0.37, torch.randn(32, D_MODEL) * 4
    with torch.no_grad():
        scaled_out = tc(x * scale)
        tc.fold_activation_norm_scaling_factor(scale)
    tc.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, Transcoder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x) * scale, scaled_out, rtol=1e-5, atol=1e-5)


def test_half_written_checkpoint_is_refused(
    make_runner_config: MakeConfig, gpt2_model: HookedTransformer, token_dataset: Any, tmp_path: Path
) -> None:
    cfg = make_runner_config(training_tokens=CONTEXT * 40, n_checkpoints=1, checkpoint_path=str(tmp_path / "ck"))
    TranscoderTrainingRunner(cfg, override_model=gpt2_model, override_dataset=token_dataset).run()
    (checkpoint,) = Path(cfg.checkpoint_path).iterdir()  # type: ignore[arg-type]
    (checkpoint / CHECKPOINT_COMPLETE_FILENAME).unlink()  # as if killed while writing it
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        TranscoderTrainingRunner(
            make_runner_config(resume_from_checkpoint=str(checkpoint)), override_model=gpt2_model, override_dataset=token_dataset
        )


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_store_batches_are_token_aligned_mlp_input_output_pairs(
    make_runner_config: MakeConfig, token_dataset: Any, arch: str
) -> None:
    from tests.conftest import build_model

    model = build_model(arch)
    runner = TranscoderTrainingRunner(make_runner_config(), override_model=model, override_dataset=token_dataset)
    batch = next(runner.activations_store)
    assert batch.shape == (256, 2 * D_MODEL)
    x, y = batch[:, :D_MODEL], batch[:, D_MODEL:]
    with torch.no_grad():
        # Every shuffled row is still one token's MLP input next to that token's MLP output.
        torch.testing.assert_close(model.blocks[1].mlp(x[None])[0], y, rtol=1e-5, atol=1e-5)


def test_autocast_lm_gives_float32_batches_of_the_bf16_forward_and_trains(
    make_runner_config: MakeConfig, gpt2_model: HookedTransformer, token_dataset: Any
) -> None:
    cfg = make_runner_config(autocast_lm=True)
    runner = TranscoderTrainingRunner(cfg, override_model=gpt2_model, override_dataset=token_dataset)
    batch = next(runner.activations_store)
    assert batch.dtype == torch.float32
    x, y = batch[:, :D_MODEL], batch[:, D_MODEL:]
    with torch.no_grad():
        exact = gpt2_model.blocks[1].mlp(x[None])[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = gpt2_model.blocks[1].mlp(x[None])[0].float()
    # The bf16 forward's outputs: close to the float32 MLP of the same input, equal to its bf16 run.
    torch.testing.assert_close(y, rounded, rtol=0, atol=0)
    assert 0 < (y - exact).abs().max() < 0.05 * exact.abs().max()
    before = evaluate_spliced(gpt2_model, [Splice(runner.sae, cfg.hook_name, "blocks.1.hook_mlp_out")], _eval_tokens())
    after = evaluate_spliced(gpt2_model, [runner.run()], _eval_tokens())  # evaluated in float32
    assert after["mse"] < 0.3 * before["mse"]


def test_b_dec_starts_at_the_mean_output_unless_weights_are_loaded(tmp_path: Path) -> None:
    from sae_lens.saes.sae import TrainStepInput

    cfg = TrainingTranscoderConfig(d_in=8, d_sae=16, d_out=4)
    batch = torch.cat([torch.randn(32, 8), torch.randn(32, 4) + 5.0], dim=-1)
    step = TrainStepInput(batch, {"l1": 1.0}, None, 0, False)
    fresh = TrainingTranscoder(cfg)
    fresh.training_forward_pass(step)
    torch.testing.assert_close(fresh.b_dec.detach(), batch[:, 8:].mean(0))
    loaded = TrainingTranscoder(cfg)
    loaded.load_state_dict({**fresh.state_dict(), "b_dec": torch.full((4,), -1.0)})
    loaded.training_forward_pass(step)
    torch.testing.assert_close(loaded.b_dec.detach(), torch.full((4,), -1.0))
    zeros = TrainingTranscoder(TrainingTranscoderConfig(d_in=8, d_sae=16, d_out=4, b_dec_init="zeros"))
    zeros.training_forward_pass(step)
    assert zeros.b_dec.abs().sum() == 0


def test_decoder_norm_folding_keeps_outputs() -> None:
    tc = TrainingTranscoder(TrainingTranscoderConfig(d_in=D_MODEL, d_sae=96, d_out=40))
    with torch.no_grad():
        tc.W_dec.mul_(torch.rand(96, 1) * 3)
        tc.b_enc.add_(0.1 * torch.randn(96))
        x = torch.randn(16, D_MODEL)
        before = tc(x)
        tc.fold_W_dec_norm()
        torch.testing.assert_close(tc.W_dec.norm(dim=-1), torch.ones(96))
        torch.testing.assert_close(tc(x), before, rtol=1e-5, atol=1e-5)


def test_prefetch_and_periodic_checkpoints(
    make_runner_config: MakeConfig, gpt2_model: HookedTransformer, token_dataset: Any, tmp_path: Path
) -> None:
    cfg = make_runner_config(prefetch_llm_batches=True, n_checkpoints=2, checkpoint_path=str(tmp_path / "ck"),
                             output_path=str(tmp_path / "out"))
    TranscoderTrainingRunner(cfg, override_model=gpt2_model, override_dataset=token_dataset).run()
    checkpoints = sorted(Path(cfg.checkpoint_path).iterdir())  # type: ignore[arg-type]
    assert len(checkpoints) == 2
    for checkpoint in checkpoints:
        assert (checkpoint / CHECKPOINT_COMPLETE_FILENAME).is_file()
        assert isinstance(SAE.load_from_disk(checkpoint / "layer_1"), SAE)
    assert isinstance(SAE.load_from_disk(tmp_path / "out"), Transcoder)


def test_the_trainer_steps_adam_fused_to_sae_lens_trainers_weights(
    make_runner_config: MakeConfig, gpt2_model: HookedTransformer, token_dataset: Any
) -> None:
    import copy

    from sae_lens.training.sae_trainer import SAETrainer

    from sae_lens_transcoder.training.trainer import TranscoderTrainer

    runner = TranscoderTrainingRunner(make_runner_config(), override_model=gpt2_model, override_dataset=token_dataset)
    trainer_cfg = runner.cfg.to_sae_trainer_config()
    ours = TranscoderTrainer(cfg=trainer_cfg, sae=copy.deepcopy(runner.sae), data_provider=iter(()))
    theirs = SAETrainer(cfg=trainer_cfg, sae=copy.deepcopy(runner.sae), data_provider=iter(()))
    assert all(group["fused"] for group in ours.optimizer.param_groups)
    assert not any(group["fused"] for group in theirs.optimizer.param_groups)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        batch = torch.randn(64, 2 * D_MODEL, generator=generator)
        ours.step(batch)
        theirs.step(batch)
    moved = ours.sae.W_enc.detach() - runner.sae.W_enc.detach()
    assert moved.abs().max() > 1e-3  # the steps changed the weights
    for (name, ours_param), theirs_param in zip(ours.sae.named_parameters(), theirs.sae.parameters(), strict=True):
        torch.testing.assert_close(ours_param, theirs_param, rtol=1e-5, atol=1e-6, msg=name)
