"""What a checkpoint file may hold, checked by reading its pickle before torch unpickles anything.

A ``.pth`` file is a zip (or, before torch 1.6, a sequence of pickles) whose pickle names the
Python objects to rebuild. :func:`scan_checkpoint` walks that pickle's opcodes on a symbolic stack
(nothing is imported, nothing is called) and refuses the file, naming what it found, when:

- it names a global outside the allowlist below: what fastunet and mmseg (0.x and 1.x) checkpoints
  contain: tensors and their storages, dtypes and devices, numpy arrays, scalars and dtypes, plain
  containers, and as inert data (never run) mmengine's ``HistoryBuffer``, the ``getattr`` calls its
  state pickles and an ``argparse.Namespace`` of training arguments;
- it calls something that is not a global (``getattr(...)(...)``: how pickled exploits chain
  calls), calls ``numpy.ndarray`` (an allocation of any size: real files pickle arrays with their
  data), or asks numpy for an array larger than the file;
- a zip member is compressed (``torch.save`` never compresses: a small file could inflate to
  gigabytes), or a storage declares more bytes than the file holds.

The names then allowed are handed to ``torch.load(weights_only=True)``; the inert ones are
replaced by :class:`fastunet.models.checkpoint.OpaqueObject` stand-ins.
"""
import functools
import io
import math
import os
import pickletools
import re
import warnings
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

__all__ = ["scan_checkpoint", "CheckpointRefused", "INERT", "ALLOWED_PLAIN", "numpy_dtype_classes",
           "summary"]


class CheckpointRefused(Exception):
    """The file holds something a weights file never needs; the message says what."""


# classes and functions of other packages that real checkpoints pickle: loaded as inert data
INERT = ("mmengine.logging.history_buffer.HistoryBuffer", "argparse.Namespace",
         "builtins.getattr")
# plain containers, bytes (protocol 2 pickles them as _codecs.encode) and torch's tensor rebuilders
ALLOWED_PLAIN = (
    "collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.complex",
    "_codecs.encode", "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2", "torch.nn.parameter.Parameter", "torch.Tensor",
    "torch.Size", "torch.device", "torch.storage.UntypedStorage", "torch.storage.TypedStorage")
_NUMPY_ARRAY = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
_NUMPY = _NUMPY_ARRAY + ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
                         "numpy.ndarray", "numpy.dtype")
_NOT_CALLABLE = ("numpy.ndarray",)  # only ever an argument of _reconstruct in real files
_IDENTIFIER = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+")


class _Global:
    def __init__(self, name):
        self.name = name


class _Call:
    def __init__(self, name, args):
        self.name, self.args = name, args


_MARK, _ANY = object(), object()


def _storage_itemsizes():
    """'torch.FloatStorage' -> 4, ... for every storage class torch pickles tensors with."""
    import torch

    out = {"torch.storage.UntypedStorage": 1, "torch.UntypedStorage": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage's deprecation warning
        for prefix, module in (("torch", torch), ("torch.cuda", getattr(torch, "cuda", None))):
            for name in dir(module):
                cls = getattr(module, name, None)
                if name.endswith("Storage") and isinstance(getattr(cls, "dtype", None),
                                                           torch.dtype):
                    out[f"{prefix}.{name}"] = cls.dtype.itemsize
    return out


def numpy_dtype_classes():
    """Name -> class of the numpy dtype classes a checkpoint may pickle (numpy >= 1.25 pickles
    dtypes by class); the scan allows these names and the loader maps them to the classes."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return {}
    out = {}
    for dt in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
               np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128,
               np.str_, np.bytes_, np.object_):
        cls = type(np.dtype(dt))
        out[f"{cls.__module__}.{cls.__name__}"] = cls
    return out


@functools.lru_cache(maxsize=None)
def _allowlist():
    import torch

    dtypes = {f"torch.{n}" for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)}
    storages = _storage_itemsizes()
    return (frozenset(ALLOWED_PLAIN) | set(_NUMPY) | set(numpy_dtype_classes()) | set(INERT)
            | dtypes | set(storages)), storages


def _full_name(module, name, proto):
    if proto < 3:  # as the unpickler: protocol 2 files name Python 2 modules
        if (module, name) in NAME_MAPPING:
            module, name = NAME_MAPPING[(module, name)]
        elif module in IMPORT_MAPPING:
            module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


class _Scan:
    """The result of walking one or more pickles: globals named, calls made, storages used."""

    def __init__(self):
        self.names, self.calls, self.storages, self.builds = set(), [], [], []
        self.complete = False


def _pop_args(stack, op):
    before = [s.name for s in op.stack_before]
    sliced = []
    if "mark" in before:
        while True:
            item = stack.pop()
            if item is _MARK:
                break
            sliced.append(item)
        sliced.reverse()
        before = before[:before.index("mark")]
    fixed = [stack.pop() for _ in before][::-1]
    return fixed, sliced


# The symbolic unpickler: one stack step per opcode, with the values that matter kept (strings,
# numbers, tuples, globals, calls) and everything else a placeholder. A long loop over opcode
# kinds, kept in one place so that every opcode is handled exactly once.
def _walk(stream, scan):
    stack, memo, proto = [], {}, 0
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name == "PROTO":
            proto = arg
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
            continue
        if name == "MARK":
            stack.append(_MARK)
            continue
        if name == "DUP":
            stack.append(stack[-1])
            continue
        if name == "STOP":
            scan.complete = True
            return
        fixed, sliced = _pop_args(stack, op)
        if name in ("GLOBAL", "INST"):
            module, attr = arg.split(" ", 1)
            g = _Global(_full_name(module, attr, proto))
            scan.names.add(g.name)
            if name == "GLOBAL":
                stack.append(g)
            else:
                scan.calls.append((g, tuple(sliced)))
                stack.append(_Call(g.name, tuple(sliced)))
        elif name == "STACK_GLOBAL":
            module, attr = fixed
            if not (isinstance(module, str) and isinstance(attr, str)):
                raise ValueError("STACK_GLOBAL of non-strings")
            g = _Global(_full_name(module, attr, proto))
            scan.names.add(g.name)
            stack.append(g)
        elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ"):
            func, args = (sliced[0], tuple(sliced[1:])) if name == "OBJ" else fixed[:2]
            scan.calls.append((func, args))
            stack.append(_Call(func.name if isinstance(func, _Global) else None, args))
        elif name == "BUILD":
            scan.builds.append(tuple(fixed))
            stack.append(fixed[0])
        elif name in ("BINPERSID", "PERSID"):
            scan.storages.append(fixed[0] if name == "BINPERSID" else arg)
            stack.append(_ANY)
        elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
            stack.append(tuple(sliced if name == "TUPLE" else fixed))
        elif name in ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"):
            stack.append(fixed[0])
        elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
            stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
        else:  # literals carry their value as arg; containers and the rest are placeholders
            stack.extend([arg if arg is not None else _ANY] * len(op.stack_after))
    raise ValueError("pickle ended without STOP")


def _walk_until_broken(stream, scan):
    """Walk one pickle; a broken or truncated one ends the walk with what it named so far
    (scan.complete False). Returns scan.complete."""
    scan.complete = False
    try:
        _walk(stream, scan)
    except Exception:
        scan.complete = False
    return scan.complete


def _human(n):
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def _int_shape(value):
    """A tuple of non-negative ints (a literal shape), else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool)
                                        and v >= 0 for v in value):
        return value
    return None


def _check_calls(scan, file_size):
    """Refuse calls of non-globals, of numpy.ndarray, and numpy arrays larger than the file."""
    for func, args in scan.calls:
        if not isinstance(func, _Global):
            raise CheckpointRefused("it calls the result of another call (how pickled exploits "
                                    "chain calls; weights files never do)")
        if func.name in _NOT_CALLABLE:
            raise CheckpointRefused(f"it calls {func.name}, which allocates an array of any size "
                                    f"(real files pickle arrays with their data)")
        if func.name in _NUMPY_ARRAY:
            shape = _int_shape(args[1]) if len(args) > 1 else None
            if shape is None or math.prod(shape) > file_size:
                raise CheckpointRefused(f"it asks numpy for an array of shape {args[1:2]} "
                                        f"(more than the {_human(file_size)} file holds)")
    for target, state in scan.builds:
        if isinstance(target, _Call) and target.name in _NUMPY_ARRAY:
            shape = _int_shape(state[1]) if isinstance(state, tuple) and len(state) > 1 else None
            if shape is None or math.prod(shape) > file_size:
                raise CheckpointRefused(f"it asks numpy for an array of shape "
                                        f"{state[1] if isinstance(state, tuple) else state} "
                                        f"(more than the {_human(file_size)} file holds)")


def _check_storages(scan, itemsizes, record_size):
    """Refuse storages that declare more bytes than their record (or the file) holds."""
    for pid in scan.storages:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            continue
        kind, key, numel = pid[1], pid[2], pid[4]
        itemsize = itemsizes.get(kind.name, 1) if isinstance(kind, _Global) else 1
        have = record_size(str(key))
        if not isinstance(numel, int) or numel < 0 or have is None or numel * itemsize > have:
            raise CheckpointRefused(
                f"its storage {key} declares {numel} elements of {itemsize} bytes, more than the "
                f"{_human(have or 0)} the file holds for it")


def _scan_zip(path):
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointRefused(
                    f"its member {info.filename} is compressed ({_human(info.file_size)} from "
                    f"{_human(info.compress_size)}; torch.save never compresses, so the file was "
                    f"repacked or crafted)")
        pickles = [i for i in infos if re.fullmatch(r"[^/]+/data\.pkl", i.filename)]
        if len(pickles) != 1:
            return None, None
        prefix = pickles[0].filename[:-len("data.pkl")]
        sizes = {i.filename: i.file_size for i in infos}
        scan = _Scan()
        _walk_until_broken(io.BytesIO(z.read(pickles[0])), scan)  # small; read whole, fast
    return scan, lambda key: sizes.get(f"{prefix}data/{key}")


def _scan_legacy(path, file_size):
    """The pickles at the start of a non-zip file: a legacy torch file holds four (magic number,
    protocol, system info, the object), a plain pickle one."""
    scan = _Scan()
    with open(path, "rb") as f:
        if f.read(1) != b"\x80":  # not a pickle of protocol 2+ (what torch and pickle write)
            return None, None
        f.seek(0)
        for _ in range(4):
            if not _walk_until_broken(f, scan) or f.read(1) == b"":
                break
            f.seek(-1, os.SEEK_CUR)
    return scan, lambda key: file_size


def scan_checkpoint(path):
    """(names the file's pickle uses, all allowed) after checking the file as the module
    docstring says; CheckpointRefused when it must be refused; (None) when it is no readable
    checkpoint at all (torch's loader then reports why)."""
    allowed, itemsizes = _allowlist()
    file_size = os.path.getsize(path)
    if file_size == 0:
        return None
    try:
        if zipfile.is_zipfile(path):
            scan, record_size = _scan_zip(path)
        else:
            with open(path, "rb") as f:
                if f.read(4) == b"PK\x03\x04":  # a zip without its directory: truncated
                    return None
            scan, record_size = _scan_legacy(path, file_size)
    except CheckpointRefused:
        raise
    except Exception:  # broken zip or pickle: nothing trustworthy to report
        return None
    if scan is None:
        return None
    foreign = sorted(n for n in scan.names if n not in allowed)
    if foreign and (scan.complete or all(_IDENTIFIER.fullmatch(n) for n in foreign)):
        raise CheckpointRefused(f"it pickles {summary(foreign)}, which "
                                f"{'is' if len(foreign) == 1 else 'are'} not among what weights "
                                f"files hold (tensors, numpy arrays, plain containers, mmengine's "
                                f"log buffers)")
    if not scan.complete:
        return None
    _check_calls(scan, file_size)
    _check_storages(scan, itemsizes, record_size)
    return scan.names


def summary(names, n=4):
    """The first ``n`` names, and how many more."""
    names = list(names)
    more = f", ... (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
