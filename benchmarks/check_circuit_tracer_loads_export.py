"""Does circuit-tracer itself load our export and compute what SAELens computes?

Two steps in two environments (circuit-tracer pins older transformers/transformer-lens
than this package, so it lives in its own venv and is not part of CI):

    # 1. in this package's venv: a small random GPT-2-style model, transcoders of every
    #    kind for its 2 layers, exported; inputs, expected outputs and the model saved
    PYTHONPATH=. python benchmarks/check_circuit_tracer_loads_export.py make /tmp/ct-check
    # 2. in a venv with only circuit-tracer (python3 -m venv /work/ct-venv;
    #    pip install torch==2.13.0; pip install circuit-tracer)
    /work/ct-venv/bin/python benchmarks/check_circuit_tracer_loads_export.py check /tmp/ct-check

``check`` imports nothing from this package. For each exported set it loads the files
with circuit-tracer's own loaders (its cache loader, and ``load_transcoder_set`` with
lazy weights), compares each layer's output with ours, builds circuit-tracer's
``ReplacementModel`` on the same model weights and compares its feature activations and
reconstructions on real tokens, then computes an attribution graph. Exit status 0: all
match to 1e-5.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

MODEL_CFG: dict[str, Any] = dict(
    n_layers=2, d_model=64, d_head=16, n_heads=4, d_mlp=128, n_ctx=32, d_vocab=300,
    act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
)
N_TOKENS = 24
TOL = 1e-5


def make(out: Path) -> None:
    from safetensors.torch import save_file
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes import transcoder as tc_mod
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from sae_lens_transcoder.export.circuit_tracer import export_circuit_tracer
    from sae_lens_transcoder.hooks import ensure_mlp_hook_in
    from sae_lens_transcoder.splicing import Splice

    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(**MODEL_CFG))
    with torch.no_grad():  # non-identity norms, so a wrong input hook shows
        for name, p in model.named_parameters():
            if ".ln" in name or name.startswith("ln_final"):
                p.add_(0.2 * torch.randn_like(p))
    model.eval()
    state = {f"model.{k}": v.detach().contiguous() for k, v in model.named_parameters()}
    folded = HookedTransformer(HookedTransformerConfig(**MODEL_CFG))
    folded.load_state_dict(model.state_dict())
    folded.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False)
    folded.eval()
    ensure_mlp_hook_in(model)
    ensure_mlp_hook_in(folded)
    tokens = torch.randint(1, MODEL_CFG["d_vocab"], (N_TOKENS,), generator=torch.Generator().manual_seed(1))
    tokens[0] = 0  # the stub tokenizer's BOS in `check`

    def transcoder(arch: str, layer: int, seed: int, d_sae: int = 256, fold_ln: bool = False) -> Any:
        cls = {"transcoder": tc_mod.Transcoder, "skip": tc_mod.SkipTranscoder,
               "jumprelu": tc_mod.JumpReLUTranscoder, "jumprelu_skip": tc_mod.JumpReLUSkipTranscoder}[arch]
        cfg_cls = {"transcoder": tc_mod.TranscoderConfig, "skip": tc_mod.SkipTranscoderConfig,
                   "jumprelu": tc_mod.JumpReLUTranscoderConfig, "jumprelu_skip": tc_mod.JumpReLUSkipTranscoderConfig}[arch]
        d = MODEL_CFG["d_model"]
        cfg = cfg_cls(d_in=d, d_sae=d_sae, d_out=d, apply_b_dec_to_input=False)
        cfg.metadata = SAEMetadata(hook_name=f"blocks.{layer}.mlp.hook_in", hook_name_out=f"blocks.{layer}.hook_mlp_out",
                                   model_from_pretrained_kwargs={"fold_ln": True} if fold_ln else None)
        sae = cls(cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sae.named_parameters():
                if name == "threshold":
                    p.copy_(0.4 * torch.rand(p.shape, generator=g))
                else:
                    p.copy_({"W_enc": 0.15, "W_skip": 0.05}.get(name, 0.1) * torch.randn(p.shape, generator=g))
        return sae.eval()

    sets = {
        # JumpReLU + skip, a JumpReLU without skip (gets a zero W_skip), a folded input_scale
        "jumprelu_skip": [Splice.from_sae(transcoder("jumprelu_skip", 0, 10)),
                          Splice.from_sae(transcoder("jumprelu", 1, 11), input_scale=2.5)],
        # plain ReLU transcoders, one with a folded input_scale
        "relu": [Splice.from_sae(transcoder("transcoder", 0, 20), input_scale=0.7),
                 Splice.from_sae(transcoder("transcoder", 1, 21))],
        # trained on a fold_ln model's mlp.hook_in: circuit-tracer's unfolded model must feed
        # it ln2.hook_normalized
        "fold_ln": [Splice.from_sae(transcoder("skip", layer, 30 + layer, fold_ln=True)) for layer in range(2)],
    }
    names = [f"blocks.{layer}.mlp.hook_in" for layer in range(2)] + [f"blocks.{layer}.hook_mlp_out" for layer in range(2)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None], names_filter=names)
        _, folded_cache = folded.run_with_cache(tokens[None], names_filter=names)
    tensors: dict[str, torch.Tensor] = {"tokens": tokens, **state}
    for layer in range(2):
        tensors[f"mlp_out.{layer}"] = cache[f"blocks.{layer}.hook_mlp_out"][0]
        for set_name in sets:
            source = folded_cache if set_name == "fold_ln" else cache
            tensors[f"{set_name}.mlp_in.{layer}"] = source[f"blocks.{layer}.mlp.hook_in"][0].clone()
    for set_name, splices in sets.items():
        export_circuit_tracer(splices, out / set_name, "random-gpt2-style", overwrite=True)
        with torch.no_grad():
            for splice in splices:
                x = tensors[f"{set_name}.mlp_in.{splice.layer}"]
                tensors[f"{set_name}.out.{splice.layer}"] = splice(x).contiguous()
                tensors[f"{set_name}.acts.{splice.layer}"] = splice.last_feature_acts.contiguous()  # type: ignore[union-attr]
    save_file(tensors, str(out / "reference.safetensors"))
    (out / "reference.json").write_text(json.dumps({"model_cfg": MODEL_CFG, "sets": list(sets)}, indent=2))
    print(f"wrote {', '.join(sets)} and reference.safetensors to {out}")


class _StubTokenizer:
    """The little of a tokenizer that circuit-tracer's attribution touches; id 0 is BOS."""

    all_special_ids = [0]
    bos_token_id, pad_token_id, eos_token_id = 0, None, None
    padding_side = "right"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def decode(self, ids: Any) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return " ".join(f"t{i}" for i in (ids if isinstance(ids, list) else [ids]))


def check(out: Path) -> int:
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformerConfig

    from circuit_tracer import attribute
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.transcoder import load_transcoder_set
    from circuit_tracer.utils.caching import load_transcoders_from_cache

    info = json.loads((out / "reference.json").read_text())
    ref = load_file(str(out / "reference.safetensors"))
    failures = 0

    def report(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        nonlocal failures
        diff = (got.float() - want.float()).abs().max().item()
        ok = diff <= TOL
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}: max |diff| = {diff:.2e}")

    device = torch.device("cpu")
    for set_name in info["sets"]:
        cached, config = load_transcoders_from_cache(set_name, cache_dir=out, device=device)
        print(f"[{set_name}] cache loader: {type(cached).__name__} of {len(cached)} layers, "
              f"hooks {config['feature_input_hook']} -> {config['feature_output_hook']}, "
              f"skip={cached.skip_connection}, activations "
              f"{[type(t.activation_function).__name__ if hasattr(t.activation_function, 'threshold') else 'relu' for t in cached]}")
        lazy = load_transcoder_set(
            {i: str(out / set_name / f"layer_{i}.safetensors") for i in range(len(cached))},
            scan=config["scan"], feature_input_hook=config["feature_input_hook"],
            feature_output_hook=config["feature_output_hook"], device=device,
            lazy_encoder=True, lazy_decoder=True,
        )
        with torch.no_grad():
            for layer in range(len(cached)):
                x = ref[f"{set_name}.mlp_in.{layer}"]
                want = ref[f"{set_name}.out.{layer}"]
                report(f"[{set_name}] layer {layer} cache-loaded forward", cached[layer](x), want)
                report(f"[{set_name}] layer {layer} lazy-loaded forward", lazy[layer](x), want)
                report(f"[{set_name}] layer {layer} features", cached[layer].encode(x), ref[f"{set_name}.acts.{layer}"])

        model = TransformerLensReplacementModel(HookedTransformerConfig(**info["model_cfg"], device="cpu"))
        state = {k.removeprefix("model."): v for k, v in ref.items() if k.startswith("model.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        weights_missing = [k for k in missing if not k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos"))]
        if weights_missing or unexpected:
            print(f"FAIL model weights: missing {weights_missing}, unexpected {unexpected}")
            failures += 1
        model._configure_replacement_model(cached)
        model.tokenizer = _StubTokenizer(info["model_cfg"]["d_vocab"])  # type: ignore[assignment]
        tokens = ref["tokens"]
        ctx = model.setup_attribution(tokens)
        # circuit-tracer zeroes position 0 (BOS) in its activations and error vectors
        acts = ctx.activation_matrix.to_dense()
        for layer in range(len(cached)):
            report(f"[{set_name}] layer {layer} ReplacementModel MLP input", model.run_with_cache(
                tokens[None], names_filter=f"blocks.{layer}.{config['feature_input_hook']}")[1][
                f"blocks.{layer}.{config['feature_input_hook']}"][0], ref[f"{set_name}.mlp_in.{layer}"])
            report(f"[{set_name}] layer {layer} ReplacementModel features (pos 1:)", acts[layer, 1:], ref[f"{set_name}.acts.{layer}"][1:])
            reconstruction = ref[f"mlp_out.{layer}"] - ctx.error_vectors[layer]
            report(f"[{set_name}] layer {layer} ReplacementModel reconstruction (pos 1:)", reconstruction[1:], ref[f"{set_name}.out.{layer}"][1:])
        graph = attribute(tokens, model, max_n_logits=3, batch_size=64)
        print(f"[{set_name}] attribution graph: {graph.active_features.shape[0]} active features, "
              f"adjacency {tuple(graph.adjacency_matrix.shape)}")
    print("ALL MATCH" if failures == 0 else f"{failures} MISMATCHES")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["make", "check"])
    parser.add_argument("dir", type=Path)
    args = parser.parse_args()
    if args.step == "make":
        args.dir.mkdir(parents=True, exist_ok=True)
        make(args.dir)
    else:
        sys.exit(check(args.dir))


if __name__ == "__main__":
    main()
