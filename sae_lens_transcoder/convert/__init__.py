"""Converters from other projects' released transcoder files to SAELens format."""

from sae_lens_transcoder.convert.pchlenski import (
    UnsafePickleError,
    convert_pchlenski_transcoder,
    load_pchlenski_transcoder,
)

__all__ = ["UnsafePickleError", "convert_pchlenski_transcoder", "load_pchlenski_transcoder"]
