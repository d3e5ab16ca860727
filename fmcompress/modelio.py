"""Loading and saving ONNX models safely: clear errors on bad files, checked atomic writes.

Every output (a model, a JSON file, a plot, a report folder) goes through the same rules:

* `check_output_path` runs before any work: a device, FIFO, socket or (for a file) a folder
  is refused, so is an output that is one of the inputs (also through a symlink or a hard
  link), a parent that is not a folder, and a destination the user may not write to.
* a symlink is written through to its target; missing parent folders are created, only
  when the file is written (after everything passed);
* the bytes go to a temporary file beside the target, renamed over it: an existing file is
  replaced atomically and keeps its mode, a new one gets the mode of a plain new file under
  the umask (0o666 & ~umask);
* inside `output_transaction()` the renames wait until the block has finished without an
  exception, so that a failure leaves none of a command's outputs (and no folder it made).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import InputError
from .normalize import normalize_model

TWO_GB = 2**31


def load_model(source: str | os.PathLike | onnx.ModelProto, *, normalize: bool = True) -> onnx.ModelProto:
    """Load an ONNX model, turning every way a file can be wrong into an InputError, and
    normalise it (`fmcompress.normalize`: old IR, old opsets, computed weights); a current
    model, and a current ModelProto passed in, come back as they are. `normalize=False`
    (the torch executor, which runs the graph it is given) skips the normalisation."""
    if isinstance(source, onnx.ModelProto):
        return normalize_model(_checked(source)) if normalize else source
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an ONNX model")
    size = path.stat().st_size
    if size >= TWO_GB:
        raise InputError(f"{path}: {size} bytes is over the 2 GB protobuf limit; not supported")
    if size == 0:
        raise InputError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from exc
    if not model.graph.node or not model.opset_import:
        raise InputError(f"{path}: not an ONNX model (no graph nodes or no opset)")
    if any(_uses_external_data(t) for t in _all_initializers(model.graph)):
        raise InputError(f"{path}: models with external data are not supported; save the weights inside the .onnx file")
    return normalize_model(_checked(model)) if normalize else model


def _checked(model: onnx.ModelProto) -> onnx.ModelProto:
    """What every command needs of a model before normalising or analysing it (one-line
    InputErrors): a known opset, initializers and attributes of the declared types."""
    from .model_checks import check_attribute_types, check_initializers

    _known_opset(model)
    check_initializers(model.graph)
    check_attribute_types(model)
    return model


def _known_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """A default-domain opset newer than the installed onnx knows is refused in one line."""
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise InputError(f"the model imports ONNX opset {opset.version}; the installed onnx knows "
                             f"opsets up to {newest} (upgrade onnx, or export at opset {newest} or older)")
    return model


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _all_initializers(sub)


def _uses_external_data(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write to a temporary file beside `path`, then rename: no partial output, ever."""
    write_bytes_atomic(model.SerializeToString(), path)


OUTPUT_KINDS = ("file", "dir")


def check_output_path(path: str | os.PathLike, kind: str = "file", *,
                      inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Check, before any work, that `path` can be written as a `kind` ("file" or "dir").

    Raises a one-line InputError for: a device, FIFO or socket; a folder where a file is
    wanted (or a file where a folder is); a path that is one of `inputs` (compared with
    os.path.samefile, so symlinks and hard links count); a parent that is not a folder;
    no permission to write it. Returns `path` unchanged (writes follow symlinks themselves).
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    path = Path(path)
    if not str(path).strip():
        raise InputError("an output path is empty")
    target = Path(os.path.realpath(path))
    info = _stat(target, path)
    if info is not None:
        _check_existing(path, target, info, kind)
    for source in inputs:
        if source is not None and _same_file(target, info, Path(source)):
            raise InputError(f"{path} would overwrite the input {source}; choose another output")
    _check_parent(path, target.parent)
    return path


def _stat(target: Path, shown: Path) -> os.stat_result | None:
    try:
        return os.stat(target)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise InputError(f"cannot write {shown}: a parent of it is a file, not a folder") from None
    except OSError as exc:  # ELOOP, EACCES on a parent, ...
        raise InputError(f"cannot write {shown}: {exc.strerror or exc}") from exc


def _describe(mode: int) -> str | None:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None


def _check_existing(path: Path, target: Path, info: os.stat_result, kind: str) -> None:
    special = _describe(info.st_mode)
    if special:
        raise InputError(f"{path} is {special}, not a regular {'file' if kind == 'file' else 'folder'}; "
                         "fmcompress writes regular files only")
    if kind == "file" and stat.S_ISDIR(info.st_mode):
        raise InputError(f"{path} is a directory; give a file name")
    if kind == "dir" and not stat.S_ISDIR(info.st_mode):
        raise InputError(f"{path} is a file, not a folder")
    wanted = os.W_OK | (os.X_OK if kind == "dir" else 0)
    if not _access(target, wanted):
        raise InputError(f"cannot write {path}: permission denied")


def _same_file(target: Path, info: os.stat_result | None, source: Path) -> bool:
    if info is not None:
        try:
            return os.path.samefile(target, source)
        except OSError:  # the input does not exist (its own error comes later)
            return False
    return Path(os.path.realpath(source)) == target


def _check_parent(path: Path, parent: Path) -> None:
    """The nearest existing ancestor must be a folder we may create files in."""
    ancestor = parent
    while True:
        try:
            info = os.stat(ancestor)
            break
        except FileNotFoundError:
            if ancestor.parent == ancestor:
                raise InputError(f"cannot write {path}: no existing parent folder") from None
            ancestor = ancestor.parent
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise InputError(f"cannot write {path}: {ancestor} is a file, not a folder")
    if not _access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: permission denied in {ancestor}")


def _access(path: Path, mode: int) -> bool:
    if os.access in os.supports_effective_ids:
        return os.access(path, mode, effective_ids=True)
    return os.access(path, mode)


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the umask (read without changing it where possible)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


class _Transaction:
    def __init__(self) -> None:
        self.renames: list[tuple[str, Path]] = []
        self.created: list[Path] = []

    def commit(self) -> None:
        try:
            while self.renames:
                tmp, target = self.renames[0]
                os.replace(tmp, target)
                self.renames.pop(0)
        except OSError as exc:
            self.rollback()
            raise InputError(f"cannot write {target}: {exc.strerror or exc}") from exc

    def rollback(self) -> None:
        for tmp, _ in self.renames:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self.renames.clear()
        _remove_folders(self.created)


_TRANSACTION: contextvars.ContextVar[_Transaction | None] = contextvars.ContextVar("fmc_transaction", default=None)


@contextlib.contextmanager
def output_transaction() -> Iterator[None]:
    """Writes inside the block land together at its end, or, on any exception, not at all."""
    if _TRANSACTION.get() is not None:  # nested: the outer block decides
        yield
        return
    transaction = _Transaction()
    token = _TRANSACTION.set(transaction)
    try:
        yield
    except BaseException:
        transaction.rollback()
        raise
    finally:
        _TRANSACTION.reset(token)
    transaction.commit()


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    created = []
    try:
        for entry in reversed(missing):
            entry.mkdir()
            created.append(entry)
    except BaseException:
        _remove_folders(created)
        raise
    return created


def _remove_folders(created: list[Path]) -> None:
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when still empty
    created.clear()


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> None:
    """Write `data` to `path` atomically (see the module docstring); OSError becomes InputError."""
    path = Path(path)
    target = Path(os.path.realpath(path))  # write through a symlink to its target
    info = _stat(target, path)
    if info is not None:
        special = _describe(info.st_mode)
        if special or stat.S_ISDIR(info.st_mode):
            raise InputError(f"{path} is {special or 'a directory'}, not a regular file")
    mode = stat.S_IMODE(info.st_mode) if info is not None else _new_file_mode()
    transaction = _TRANSACTION.get()
    created: list[Path] = []
    tmp = None
    try:
        created = _make_parents(target.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if transaction is None:
            os.replace(tmp, target)
        else:
            transaction.renames.append((tmp, target))
            transaction.created.extend(created)
    except BaseException as exc:  # nothing was registered with a transaction yet
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        _remove_folders(created)
        if isinstance(exc, OSError):
            raise InputError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
