"""How a model becomes a file and back: :class:`ModelSerde` and its kinds.

A serde works on local files only; the engine writes to a local temp file and
uploads it through fsspec, and reading downloads first. That keeps every
serde free of storage concerns, and lets libraries that want a real path
(Keras, torch) have one.

.. warning::
   :class:`PickleSerde` and ``TorchSerde(weights_only=False)`` run code from
   the file when they read it. Load models only from storage you trust.
"""

from __future__ import annotations

import abc
import importlib
import io
import pickle
import re
import weakref
from collections.abc import Mapping
from typing import Any, Callable

import cloudpickle

from ._compat import import_optional

__all__ = [
    "ModelSerde",
    "PickleSerde",
    "TensorFlowSerde",
    "TorchSerde",
    "serde_from_manifest",
    "serde_to_manifest",
]


class ModelSerde(abc.ABC):
    """Base class of model serializers.

    Subclasses set :attr:`filename` and implement :meth:`write` and
    :meth:`read`. Both take a path on the local disk.

    Examples
    --------
    >>> import json
    >>> class JsonSerde(ModelSerde):
    ...     filename = "model.json"
    ...     def write(self, model, file_path):
    ...         with open(file_path, "w") as f:
    ...             json.dump(model, f)
    ...     def read(self, file_path):
    ...         with open(file_path) as f:
    ...             return json.load(f)
    """

    #: Name of the model file inside each group's folder.
    filename: str = "model"

    @abc.abstractmethod
    def write(self, model: Any, file_path: str) -> None:
        """Write ``model`` to the local file ``file_path``."""

    @abc.abstractmethod
    def read(self, file_path: str) -> Any:
        """Read a model back from the local file ``file_path``."""

    def to_bytes(self, model: Any) -> bytes | None:
        """Optional fast path: the bytes :meth:`write` would put in the file.

        A serde that can serialize in memory returns them here, and the
        engine then writes the small files of many groups in one go instead
        of one temp file per group. The default, None, means "use
        :meth:`write`". The bytes must be exactly what :meth:`read` accepts
        from a file.
        """
        return None

    def manifest_params(self) -> dict:
        """Constructor arguments recorded in ``_run.json`` to rebuild this serde."""
        return {"filename": self.filename}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.manifest_params().items())
        return f"{type(self).__name__}({params})"


class PickleSerde(ModelSerde):
    """Serialize any Python object with cloudpickle (the default serde).

    Objects the standard library can pickle by reference are pickled with
    its faster C pickler; the rest (lambdas, classes defined in a notebook)
    with cloudpickle. Either file loads with :meth:`read`.

    Reading a pickle runs code from the file: load only files you trust.

    Parameters
    ----------
    filename : str
        Name of the model file in each group's folder.
    """

    def __init__(self, filename: str = "model.pkl"):
        self.filename = filename

    def write(self, model: Any, file_path: str) -> None:
        with open(file_path, "wb") as f:
            self._dump(model, f)

    def to_bytes(self, model: Any) -> bytes:
        buffer = io.BytesIO()
        self._dump(model, buffer)
        return buffer.getvalue()  # (its own buffer, not a copy)

    def _dump(self, model: Any, file: Any) -> None:
        """Pickle ``model`` into ``file`` (seekable, empty), streaming: the
        pickle is never whole in memory beside the model. A model of 1 GB was
        pickled to bytes (1.5 GB as they grew) and only then written; one of
        a class of ``__main__`` then pickled again by cloudpickle while the
        first bytes were still held: over 3 GB at once for a 1 GB model."""
        # the standard library's C pickler is several times faster on small
        # models; it refuses what only cloudpickle can do (lambdas, classes
        # made in a notebook or shipped by value), which then goes to
        # cloudpickle. Both give a pickle that read() loads.
        if not getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", None):
            watched = _MainWatch(file)
            try:
                pickle.Pickler(watched, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(model)
            except (pickle.PicklingError, AttributeError, TypeError):
                pass
            else:
                # a class or function of a script or notebook (module
                # __main__) pickles by reference where the model was made
                # in that process itself (a threaded cluster, a local
                # run): the file would then load only in a process whose
                # __main__ defines it. cloudpickle saves those by value. The
                # check may also match a string that says "__main__"; that
                # only costs the slower pickler.
                if not watched.saw_main:
                    return
            file.seek(0)
            file.truncate()
        cloudpickle.Pickler(file, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(model)

    def read(self, file_path: str) -> Any:
        with open(file_path, "rb") as f:
            return cloudpickle.load(f)


class TorchSerde(ModelSerde):
    """Save PyTorch models with ``torch.save`` (through cloudpickle, so that a
    module class of the user's script or notebook saves on a worker too).

    Parameters
    ----------
    filename : str
        Name of the model file in each group's folder.
    weights_only : bool
        False (default): save the whole module; reading unpickles it, which
        runs code from the file. True: save only the ``state_dict`` and read
        it with torch's safe loader (``torch.load(weights_only=True)``); then
        :meth:`read` returns ``model_factory()`` with the weights loaded, or
        the state_dict itself when no ``model_factory`` is given.
    model_factory : callable, optional
        Builds an empty module to load the weights into; only with
        ``weights_only=True`` (without it, the whole module is saved and read
        back, and a factory is refused: it would never be called). For
        weights of 1 MiB or more it is called on torch's meta device (its
        module gets no memory and no random initialisation) and the weights
        are assigned to the module; where that cannot give the same module
        (tied weights, a tensor outside the state_dict, weights of another
        dtype or device), it is called again as usual. So it may be called
        twice a read: keep it free of side effects (a cache of tensors kept
        between calls would keep those made on the meta device).
    map_location : str
        Where tensors are loaded; ``"cpu"`` by default, so models trained on
        a GPU worker load anywhere.
    """

    #: modules every worker must have (checked when a run starts)
    _needs = ("torch",)

    def __init__(self, filename: str = "model.pt", weights_only: bool = False, model_factory=None,
                 map_location: str = "cpu"):
        from .exceptions import InvalidArgumentError
        from .options import check_flag

        # checked here, not when a model is read back after the run:
        # weights_only="no" (truthy) saved state_dicts only, and a module
        # given for its class (model_factory=Net() for Net) is callable,
        # so get_model died in its forward() ("missing 1 required argument").
        # numpy's bools are taken, as a plain bool (it goes to _run.json)
        weights_only = check_flag(weights_only, "TorchSerde weights_only")
        # (a module's class has load_state_dict too, as a function: taken)
        a_module = hasattr(model_factory, "load_state_dict") and not isinstance(model_factory, type)
        if model_factory is not None and (not callable(model_factory) or a_module):
            hint = f"; pass the class itself: model_factory={type(model_factory).__name__}" if a_module else ""
            raise InvalidArgumentError(
                f"TorchSerde model_factory must build an empty module when called with no arguments (a class "
                f"such as Net, or a function), got {_short_repr(model_factory)}{hint}"
            )
        if model_factory is not None and not weights_only:
            # the whole module was saved and unpickled (running code from the
            # file) and the factory never called: one who gives a factory
            # means the state_dict and the safe loader
            name = getattr(model_factory, "__qualname__", None) or _short_repr(model_factory)
            raise InvalidArgumentError(
                f"TorchSerde(model_factory={name}) needs weights_only=True: the factory builds the module that "
                f"the saved state_dict is loaded into, and with weights_only={weights_only!r} the whole module is "
                f"saved and unpickled instead, the factory never called; pass weights_only=True, or leave "
                f"model_factory out"
            )
        self.filename = filename
        self.weights_only = weights_only
        self.model_factory = model_factory
        self.map_location = map_location

    def manifest_params(self) -> dict:
        return {"filename": self.filename, "weights_only": self.weights_only}

    def write(self, model: Any, file_path: str) -> None:
        torch = import_optional("torch")
        if self.weights_only:
            state = model.state_dict() if hasattr(model, "state_dict") else model
            if not isinstance(state, Mapping):
                # torch.save would write it, and the safe loader would then
                # refuse the file: fail now, while the group can say why
                raise TypeError(
                    f"TorchSerde(weights_only=True) saves a module's state_dict (or a dict of tensors), "
                    f"and a {type(model).__module__}.{type(model).__qualname__} has no state_dict; "
                    f"return the torch module itself, or use TorchSerde(weights_only=False)"
                )
            torch.save(state, file_path)
        else:
            # cloudpickle: a module class of the user's script or notebook
            # (__main__) reaches a worker process by value, and the standard
            # pickler, saving classes by reference, refuses it there ("it's
            # not the same object as __main__.Net"); torch.load reads it back
            torch.save(model, file_path, pickle_module=cloudpickle)

    def read(self, file_path: str) -> Any:
        torch = import_optional("torch")
        if not self.weights_only:
            return torch.load(file_path, weights_only=False, map_location=self.map_location)
        state = torch.load(file_path, weights_only=True, map_location=self.map_location)
        if self.model_factory is None:
            return state
        model = _built_without_init(torch, self.model_factory, state)
        if model is None:
            model = self.model_factory()
            model.load_state_dict(state)
        return model


# Weights of fewer bytes are loaded into a module built as usual: their
# random initialisation costs less than a build on the meta device (whose
# initialisation runs through Python), about even at 0.5 MB
_META_BUILD_BYTES = 1 << 20


def _built_without_init(torch: Any, factory: Callable[[], Any], state: Mapping) -> Any:
    """``factory()``'s module with ``state``'s tensors as its own, built on
    torch's meta device: its parameters get neither memory nor their random
    initialisation, which ``load_state_dict`` would overwrite at once (for a
    6 MB model, half of a read). None where that would not give
    what ``factory()`` then ``load_state_dict(state)`` gives: a factory that
    cannot build on the meta device, keys, shapes, dtypes or devices that
    differ (the usual load converts or says why), weights tied together
    (assigned, each would get its own), or a tensor left on the meta device
    (a non-persistent buffer, a tensor the module keeps outside its state);
    and for small weights (``_META_BUILD_BYTES``)."""
    tensors = [value for value in state.values() if isinstance(value, torch.Tensor)]
    if sum(tensor.numel() * tensor.element_size() for tensor in tensors) < _META_BUILD_BYTES:
        return None
    try:  # any failure (a factory that reads a value out of a tensor, a lazy module): built as usual
        return _assigned(torch, factory, state)
    except Exception:
        return None


def _assigned(torch: Any, factory: Callable[[], Any], state: Mapping) -> Any:
    """:func:`_built_without_init`'s build, or None where it differs."""
    default_device = torch.empty(()).device  # where factory() builds its module
    made = _tensors_made(torch)
    with torch.device("meta"), made:
        model = factory()
    expected = model.state_dict(keep_vars=True)
    if set(expected) != set(state) or any(
        not isinstance(state[key], torch.Tensor) or state[key].shape != tensor.shape
        or state[key].dtype != tensor.dtype or state[key].device != default_device
        for key, tensor in expected.items()
    ):
        return None
    if len(list(model.named_parameters(remove_duplicate=False))) != len(list(model.parameters())) or len(
        list(model.named_buffers(remove_duplicate=False))
    ) != len(list(model.buffers())):
        return None
    del expected  # (it holds the meta parameters the assignment replaces)
    model.load_state_dict(state, assign=True)
    # a meta tensor the factory made that is still alive is held by the
    # module outside its state (an attribute, a non-persistent buffer, a
    # list or dict of tensors, a helper object): its forward would fail
    if any(tensor.is_meta for tensor in made.alive()):
        return None
    return model


def _tensors_made(torch: Any) -> Any:
    """A torch function mode that keeps a weak reference to every tensor
    made while it is on (see :func:`_assigned`)."""
    from torch.overrides import TorchFunctionMode

    class TensorsMade(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.refs: list[weakref.ref] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for value in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(value, torch.Tensor):
                    self.refs.append(weakref.ref(value))
            return out

        def alive(self) -> list:
            return [tensor for tensor in (ref() for ref in self.refs) if tensor is not None]

    return TensorsMade()


class TensorFlowSerde(ModelSerde):
    """Save Keras models in the native ``.keras`` format.

    Parameters
    ----------
    filename : str
        Must end with ``.keras`` (Keras chooses the format from it).
    """

    _needs = ("tensorflow",)

    def __init__(self, filename: str = "model.keras"):
        if not isinstance(filename, str) or not filename.endswith(".keras"):
            from .exceptions import InvalidArgumentError

            raise InvalidArgumentError(f"TensorFlowSerde filename must end with '.keras', got {filename!r}")
        self.filename = filename

    def write(self, model: Any, file_path: str) -> None:
        model.save(file_path)

    def read(self, file_path: str) -> Any:
        return import_optional("tensorflow").keras.models.load_model(file_path)


class _MainWatch:
    """A file's ``write`` that notes whether ``b"__main__"`` went through it
    (in one write or across two), without copying what is written (the
    pickler hands a big array's bytes over as they are)."""

    def __init__(self, file: Any):
        self._file = file
        self._tail = b""
        self.saw_main = False

    def write(self, data: Any) -> int:
        if not self.saw_main:
            view = memoryview(data).cast("B")
            self.saw_main = (
                _MAIN.search(view) is not None
                or _MAIN.search(self._tail + bytes(view[: len(_MAIN.pattern) - 1])) is not None
            )
            self._tail = (self._tail + bytes(view[-(len(_MAIN.pattern) - 1):]))[-(len(_MAIN.pattern) - 1):]
        return self._file.write(data)


_MAIN = re.compile(re.escape(b"__main__"))


def _short_repr(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters (a module's repr lists
    every layer)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def writes_in_memory(serde: ModelSerde) -> bool:
    """Whether ``serde.to_bytes`` can stand in for ``serde.write``: it must be
    defined as deep in the class tree as ``write`` (a subclass of
    :class:`PickleSerde` that overrides only ``write`` keeps its own write)."""
    return _class_writes_in_memory(type(serde))


def streams_pickle(serde: ModelSerde) -> bool:
    """Whether ``serde`` saves as :class:`PickleSerde` itself does (neither
    ``write`` nor ``to_bytes`` overridden): then the engine streams its pickle
    with ``_dump`` (a big model never whole in memory as bytes)."""
    cls = type(serde)
    return isinstance(serde, PickleSerde) and cls.write is PickleSerde.write and cls.to_bytes is PickleSerde.to_bytes


# Per serde class, the answer of _class_writes_in_memory: asked once per
# group, worked out once per class. Weakly: a serde class defined in a
# notebook is a new class each time its cell runs, and each run's workers
# unpickle it anew (by value); a cache that held its classes kept every one
# of them, and all their methods refer to, in every worker for good.
_writes_in_memory_by_class: "weakref.WeakKeyDictionary[type, bool]" = weakref.WeakKeyDictionary()


def _class_writes_in_memory(serde_class: type) -> bool:
    known = _writes_in_memory_by_class.get(serde_class)
    if known is None:

        def owner(name: str) -> type:
            return next(cls for cls in serde_class.__mro__ if name in vars(cls))

        to_bytes = owner("to_bytes")
        known = to_bytes is not ModelSerde and issubclass(to_bytes, owner("write"))
        _writes_in_memory_by_class[serde_class] = known
    return known


def serde_to_manifest(serde: ModelSerde) -> dict:
    """What ``_run.json`` records of a serde: its class, file name and the
    arguments that rebuild it (never a model factory or credentials)."""
    cls = type(serde)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "filename": serde.filename,
            "params": serde.manifest_params()}


def check_filename(serde: ModelSerde) -> None:
    """Refuse a ``filename`` that would not name one file inside each
    group's own folder (raises :class:`InvalidArgumentError`): every group
    would write the same file, or over the group's status."""
    from .exceptions import InvalidArgumentError

    name = serde.filename
    advice = "use a relative file name such as 'model.pkl' (a subfolder is fine: 'weights/model.pt')"
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgumentError(f"serde {type(serde).__name__} has filename {name!r}; {advice}")
    parts = name.split("/")
    if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise InvalidArgumentError(
            f"serde {type(serde).__name__} has filename {name!r}, which leaves the group's own folder "
            f"(or names it); {advice}"
        )
    if parts[0] == "_partition.json":
        raise InvalidArgumentError(
            f"serde {type(serde).__name__} has filename {name!r}, the name of each group's status file; "
            f"{advice}"
        )


def serde_from_manifest(entry: dict) -> ModelSerde | None:
    """Rebuild a serde recorded by :func:`serde_to_manifest`, if its class can
    be built without arguments besides ``filename``; otherwise None.

    Only a :class:`ModelSerde` is built: ``_run.json`` is a file of the store,
    which anyone who can write there may edit, and it named ``subprocess.run``
    with its arguments as well as a serde (called by ``get_model``)."""
    module_name, _, qualname = entry["class"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError, ValueError):  # ValueError: no module name
        return None
    if not (isinstance(cls, type) and issubclass(cls, ModelSerde)):
        return None  # (the caller says it cannot be rebuilt: pass serde=)
    try:
        return cls(**entry.get("params", {"filename": entry["filename"]}))
    except ValueError:  # params it now refuses (weights_only="yes", as an older version took): serde= decides
        return None
    except TypeError:
        try:
            serde = cls()
        except TypeError:
            return None
        if serde.filename != entry["filename"]:
            try:
                serde.filename = entry["filename"]
            except AttributeError:  # a read-only property naming another file
                return None
        return serde
