"""Register the transcoder architectures with SAELens, safely on re-import and reload."""

import logging
from typing import Any

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from sae_lens_transcoder.saes.clt import CLT_CLASSES
from sae_lens_transcoder.saes.topk_transcoder import INFERENCE_CLASSES
from sae_lens_transcoder.saes.transcoder import TRAINING_CLASSES

logger = logging.getLogger(__name__)


def _is_ours(cls: type, ours: type) -> bool:
    # After importlib.reload the class object is new but its qualified name is the same.
    return (cls.__module__, cls.__qualname__) == (ours.__module__, ours.__qualname__)


def _register(registry: dict[str, Any], register: Any, name: str, classes: tuple[type, type]) -> None:
    """A stale entry from an earlier import of this package is replaced; one that SAELens (or
    another plugin) registered itself is kept, with a warning, instead of crashing."""
    existing = registry.get(name)
    if existing is None:
        register(name, *classes)
    elif _is_ours(existing[0], classes[0]):
        # SAELens has no unregister; the registry is its public dict of classes.
        registry[name] = classes
    else:
        logger.warning(
            "SAELens already has a class for %r (%s); keeping it. Use sae_lens_transcoder's "
            "%s directly to train with this plugin.",
            name,
            existing[0].__qualname__,
            classes[1].__qualname__,
        )


def register_training_transcoder() -> None:
    """Every training architecture (``TRAINING_CLASSES``, the CLTs) and the TopK inference classes."""
    for name, classes in INFERENCE_CLASSES.items():
        _register(SAE_CLASS_REGISTRY, register_sae_class, name, classes)
    for name, classes in {**TRAINING_CLASSES, **CLT_CLASSES}.items():
        _register(SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class, name, classes)
