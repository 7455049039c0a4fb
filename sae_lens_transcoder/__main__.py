"""``python -m sae_lens_transcoder ...``: the CLI, also as torchrun runs it (``torchrun ... -m sae_lens_transcoder train``)."""

from sae_lens_transcoder.cli import main

main()
