"""Read tensors out of a pickled ``torch.save`` file without running code from it.

Checkpoints saved with a whole config object cannot be read with ``torch.load(weights_only=True)``:
its allow-list rejects the (unimportable, or untrusted) config class. Plain ``torch.load`` would
rebuild that class and call whatever the pickle names, so a crafted file runs code on load. Here
torch's own loader still handles the zip layout and the tensor storages, but every global the
pickle asks for goes through :class:`TensorOnlyUnpickler`: the few callables that rebuilding
tensors needs are real, any other name becomes an inert placeholder class whose instances only
hold their pickled state, and calling a placeholder (what ``__reduce__`` exploits do) is refused.
"""

import _compat_pickle
import codecs
import collections
import pickle
import types
from pathlib import Path
from typing import Any

import torch
import torch._utils

# What rebuilding tensors and their containers needs. Typed storages ("FloatStorage", ...) never
# reach find_class: torch.load's own wrapper resolves every name containing "Storage" first.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    # Config objects hold their device and dtype; a device is rebuilt by calling torch.device.
    ("torch", "device"): torch.device,
    # Protocol-2 pickles (torch.save's default) spell bytes as _codecs.encode(text, "latin1").
    ("_codecs", "encode"): codecs.encode,
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
}


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks to call something that reading tensors never needs: it is not loaded."""


class _InertClass(type):
    """Metaclass of placeholders: pickle may create instances and fill their state, never call them."""

    pickled_name: str

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(
            f"the file asks to call {cls.pickled_name}{_preview(args)} while loading. Refused: only tensors "
            "and plain config data are read from it, never code. The file is not a plain checkpoint; do not "
            "open it with torch.load either."
        )


class PickledObject(metaclass=_InertClass):
    """An object of a class the file names, rebuilt without importing or running that class.

    Its attributes are exactly the pickled state (a dataclass's fields), so a config's values
    can be read while its ``__init__``, ``__post_init__`` or ``__setstate__`` never run.
    """

    pickled_name = "<unknown>"

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_name} {vars(self)!r}>"


def _preview(args: tuple[Any, ...]) -> str:
    text = repr(args)
    return text if len(text) <= 120 else text[:117] + "...)"


class TensorOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves only what tensors need; every other global is a placeholder."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 (torch.save's default) writes Python 2 names such as __builtin__.eval; map
        # them as pickle's own find_class does, so the allow-list and error messages see real names.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        return _InertClass(name, (PickledObject,), {"pickled_name": f"{module}.{name}", "__module__": module})


def _load(file: Any, **kwargs: Any) -> Any:
    return TensorOnlyUnpickler(file, **kwargs).load()


# What torch.load takes as ``pickle_module``: it subclasses ``Unpickler`` (adding storages) and
# calls ``load`` for the legacy (pre-zip) format's header records.
tensor_only_pickle = types.ModuleType("tensor_only_pickle")
tensor_only_pickle.Unpickler = TensorOnlyUnpickler  # type: ignore[attr-defined]
tensor_only_pickle.load = _load  # type: ignore[attr-defined]


def load_tensors_only(path: str | Path) -> Any:
    """``torch.load(path)`` on the CPU with no code from the file run (see the module docstring).

    Raises :class:`UnsafePickleError` for a file that asks to call anything else, and
    ``ValueError`` naming the file for one that is truncated, corrupt or not a torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a torch.save checkpoint, e.g. *.pt).")
    try:
        return torch.load(path, map_location="cpu", pickle_module=tensor_only_pickle, weights_only=False)
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{path}: {error}") from None
    except Exception as error:  # torch and pickle raise many types for damaged files
        raise ValueError(
            f"{path}: cannot be read as a torch.save checkpoint ({type(error).__name__}: {error}). "
            "The file is truncated, corrupt or of another format: download it again."
        ) from error
