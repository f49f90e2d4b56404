"""Reading an EDM checkpoint's tensors without running its code.

EDM's snapshots (`network-snapshot-*.pkl`, the published `edm-imagenet-64x64-cond-adm.pkl`) are pickles of
`{'ema': EDMPrecond(...), ...}` whose classes are stored by `torch_utils.persistence`: each object is
rebuilt by a function that executes the module source embedded in the file. Unpickling such a file with
`pickle.load` therefore runs whatever code the file carries. Here it is read with a restricted unpickler:
EDM's persistent objects and torch's module containers become inert `PickledObject`s that only hold their
pickled state (parameters, buffers, submodules, plain attributes); tensors are rebuilt through
`torch.load(weights_only=True)`; any other global the file names is refused. Even so this reads a file
the user did not create, so the caller only uses it after an explicit --trust-pickle.
"""

from __future__ import annotations

import collections
import importlib
import io
import pickle
import warnings

import torch

from ..errors import UserError

# Namespaces whose classes become inert stand-ins: EDM's own code and torch's module containers.
_INERT_PREFIXES = ("torch_utils.", "dnnlib.", "training.", "torch.nn.modules.")


class PickledObject(dict):
    """An object of EDM's code, never constructed: its class name and pickled state (a dict subclass so
    that pickled dict subclasses such as dnnlib's EasyDict also fill it)."""

    class_name = "?"
    state: dict = {}  # replaced per instance by __init__ or by unpickling's __setstate__

    def __init__(self, class_name: str = "?", state: dict | None = None):
        super().__init__()
        self.class_name, self.state = class_name, state or {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}

    def __repr__(self):
        return f"PickledObject({self.class_name})"


def _persistent_object(meta: dict) -> PickledObject:
    """EDM's reconstruct hook, minus executing the embedded `module_src`."""
    return PickledObject(str(meta.get("class_name", "?")), dict(meta.get("state") or {}))


def _storage_from_bytes(data: bytes):
    """torch's storage pickling writes a small torch.save archive; read it with the weights-only loader."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation notices
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _numpy_global(name: str):
    numpy = importlib.import_module("numpy")
    multiarray = getattr(getattr(numpy, "_core", None), "multiarray", None) or numpy.core.multiarray
    return {"scalar": multiarray.scalar, "dtype": numpy.dtype}[name]


_ALLOWED = {
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): lambda: torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): lambda: torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): lambda: _storage_from_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): lambda: _persistent_object,
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_global("scalar"),
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_global("scalar"),
    ("numpy", "dtype"): lambda: _numpy_global("dtype"),
}


class _ForeignGlobal(pickle.UnpicklingError):
    """The file names a function or class outside what EDM's checkpoints hold."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]()
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith(_INERT_PREFIXES) or module in ("dnnlib", "training", "torch_utils"):
            return type(name, (PickledObject,), {"class_name": name})
        raise _ForeignGlobal(f"{module}.{name}")


def read_pickle(path: str):
    """The unpickled object tree, with EDM's classes as `PickledObject`s."""
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f).load()
    except _ForeignGlobal as err:
        raise UserError(
            f"{path} names {err}, which an EDM checkpoint does not contain, so it was not unpickled; convert it to a "
            "state dict (.safetensors or .pt) where its code is trusted."
        ) from None
    except (pickle.UnpicklingError, OSError, EOFError, AttributeError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"Cannot read {path} as an EDM pickle ({err.__class__.__name__}: {err}).") from None


def flatten_modules(obj: PickledObject, prefix: str = "") -> tuple[dict, dict]:
    """(state dict, {module path: (class name, plain attributes)}) of a tree of pickled torch modules."""
    tensors, modules = {}, {}
    state = obj.state
    attrs = {k: v for k, v in state.items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
    modules[prefix.rstrip(".")] = (obj.class_name, attrs)
    skipped = set(state.get("_non_persistent_buffers_set") or ())
    for kind in ("_parameters", "_buffers"):
        for name, value in (state.get(kind) or {}).items():
            if isinstance(value, torch.Tensor) and name not in skipped:
                tensors[prefix + name] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, PickledObject):
            child_tensors, child_modules = flatten_modules(child, f"{prefix}{name}.")
            tensors.update(child_tensors)
            modules.update(child_modules)
    return tensors, modules
