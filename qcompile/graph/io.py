"""The file edges of the core: loading a model into the IR and saving one atomically.

The input is never modified: a path is parsed into a fresh IR; an ``onnx.ModelProto`` is
serialized and parsed again, so edits to the IR never reach the caller's object.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from qcompile.errors import InvalidModelError, OutputExistsError, UsageError
from qcompile.options import MIN_OPSET


@dataclass
class LoadedModel:
    model: ir.Model
    source: str
    notes: list[str] = field(default_factory=list)
    original_opset: int = 0


def _default_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _check_external_data_paths(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external data that points outside the model's folder (``..``, absolute, symlinks)."""
    base = base_dir.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):  # noqa: SLF001 - public in practice
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        try:
            target = (base / location).resolve()  # follows symlinks: one pointing out is refused
        except (OSError, ValueError, RuntimeError) as exc:  # NUL bytes, symlink loops
            raise InvalidModelError(
                f"external data location {location!r} of tensor {tensor.name!r} cannot be resolved: {exc}"
            ) from None
        if os.path.isabs(location) or base not in target.parents:
            raise InvalidModelError(
                f"external data of tensor {tensor.name!r} points outside the model's folder: {location!r}"
            )
        if not target.is_file():
            raise InvalidModelError(f"external data file {location!r} of tensor {tensor.name!r} is missing")


def _non_utf8_field(message) -> str | None:
    """The path of the first string field under ``message`` that is not valid UTF-8, or None.

    ONNX strings are UTF-8, but protobuf does not check proto2 strings when parsing; Python then
    returns the raw bytes, which break onnx's checker messages and onnx-ir's serializer later.
    Tensor data (bytes fields, numbers) is not visited.
    """
    for field in message.DESCRIPTOR.fields:
        if field.type not in (field.TYPE_MESSAGE, field.TYPE_STRING):
            continue  # not read at all: raw tensor bytes would be copied
        # protobuf >= 5.28 has is_repeated; 7 removed label.
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if not repeated and not message.HasField(field.name):
            continue
        value = getattr(message, field.name)
        items = value if repeated else (value,)
        if field.type == field.TYPE_MESSAGE:
            for item in items:
                inner = _non_utf8_field(item)
                if inner is not None:
                    return f"{field.name}.{inner}"
        elif any(isinstance(item, bytes) for item in items):
            return field.name
    return None


def _check_utf8(proto: onnx.ModelProto, name: str) -> None:
    where = _non_utf8_field(proto)
    if where is not None:
        raise InvalidModelError(f"{name} is not a valid ONNX model: a string in {where} is not UTF-8")


# Element types whose stored size follows from the shape alone (sub-byte types are left to onnx).
_SIZED_TYPES = tuple(
    getattr(onnx.TensorProto, name)
    for name in (
        "FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16", "INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32",
        "INT64", "UINT64", "BOOL", "COMPLEX64", "COMPLEX128", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2",
        "FLOAT8E5M2FNUZ",
    )
    if hasattr(onnx.TensorProto, name)
)


def _check_tensor_sizes(proto: onnx.ModelProto, name: str) -> None:
    """Every tensor holds as much data as its shape says (onnx's checker does not look).

    A damaged file can change a tensor's dims or cut its data; the IR would fail much later, deep in
    a pass. Tensors whose data was not loaded (external) and sub-byte types are not checked.
    """
    for tensor in onnx.external_data_helper._get_all_tensors(proto):  # noqa: SLF001
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type not in _SIZED_TYPES:
            continue
        count = math.prod(tensor.dims)
        if tensor.HasField("raw_data"):
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            held, needed, unit = len(tensor.raw_data), count * itemsize, "bytes"
        else:
            complex_ = tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
            field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
            held, needed, unit = len(getattr(tensor, field)), count * (2 if complex_ else 1), "values"
        if held != needed:
            raise InvalidModelError(
                f"{name} is not a valid ONNX model: tensor {tensor.name!r} of shape {list(tensor.dims)} "
                f"holds {held} {unit} of data, its shape needs {needed}"
            )


def _read_proto(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise InvalidModelError(f"model file not found: {path}")
    if path.is_dir():
        raise InvalidModelError(f"model path is a folder, not an ONNX file: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidModelError(f"{path} is not a readable ONNX model (truncated or not ONNX): {exc}") from None
    if not proto.HasField("graph") or len(proto.graph.node) == 0 and len(proto.graph.output) == 0:
        raise InvalidModelError(f"{path} is not an ONNX model (no graph found)")
    _check_utf8(proto, str(path))  # before anything reads a name or an external-data location
    _check_external_data_paths(proto, path.parent)
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:  # Validation: e.g. a symlink
        raise InvalidModelError(f"cannot read external data of {path}: {exc}") from None
    return proto


def load_model(source: str | os.PathLike | onnx.ModelProto | ir.Model) -> LoadedModel:
    """Load a model into a fresh IR, upgrading opsets below 13 (with a note)."""
    if isinstance(source, ir.Model):
        proto = ir.to_proto(source)
        name = "<ir.Model>"
    elif isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
        name = "<onnx.ModelProto>"
    elif isinstance(source, (str, os.PathLike)):
        proto = _read_proto(Path(source))
        name = str(source)
    else:
        raise UsageError(f"cannot load a model from a {type(source).__name__}")

    if isinstance(source, onnx.ModelProto):
        _check_utf8(proto, name)  # a file's proto was checked as it was read
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise InvalidModelError(f"{name} is not a valid ONNX model: {first}") from None
    _check_tensor_sizes(proto, name)

    notes: list[str] = []
    opset = _default_opset(proto)
    if opset < MIN_OPSET:
        try:
            proto = onnx.version_converter.convert_version(proto, MIN_OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors from C++
            raise InvalidModelError(
                f"{name} uses opset {opset}; upgrading it to {MIN_OPSET} failed: {exc}"
            ) from None
        notes.append(f"model opset {opset} was upgraded to {MIN_OPSET} (QDQ per channel needs 13)")
    try:
        model = ir.from_proto(proto)
    except Exception as exc:  # malformed protos surface as various errors inside the deserializer
        raise InvalidModelError(f"{name} could not be read into the IR: {exc}") from None
    return LoadedModel(model=model, source=name, notes=notes, original_opset=opset)


# Protobuf cannot serialize a message of 2 GiB or more. Above this many bytes of tensor data the
# tensors go to a data file beside the model; the margin leaves room for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 2**31 - 2**27
# Tensors smaller than this stay inside the model file (as onnx.save does by default).
_EXTERNAL_TENSOR_MIN_BYTES = 1024
_EXTERNAL_ALIGNMENT = 4096  # offsets on page boundaries, so a runtime can map the file


def external_data_path(path: str | os.PathLike) -> Path:
    """Where ``save_model_atomic`` puts the tensor data of a large model: ``<path>.data``."""
    return Path(f"{os.fspath(path)}.data")


def save_model_atomic(
    model: ir.Model | onnx.ModelProto,
    path: str | os.PathLike,
    *,
    force: bool = False,
    external_data_threshold_bytes: int | None = None,
) -> Path:
    """Write ``model`` to ``path`` via a temporary file in the same folder, fsync, then rename.

    A file at ``path`` is therefore either absent, the old file, or the complete new model.
    A model whose tensors hold more than ``external_data_threshold_bytes`` (default
    ``EXTERNAL_DATA_THRESHOLD_BYTES``, just under protobuf's 2 GiB limit) is written with its tensor
    data in ``<path>.data`` (see ``external_data_path``): the data file first, the model last, so the
    model file is the commit point and its data is present whenever it is.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"output {path} exists; pass --force to overwrite it")
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    if external_data_threshold_bytes is None:
        external_data_threshold_bytes = EXTERNAL_DATA_THRESHOLD_BYTES
    tensor_bytes = sum(t.ByteSize() for t in onnx.external_data_helper._get_all_tensors(proto))  # noqa: SLF001
    if tensor_bytes > external_data_threshold_bytes:
        _save_with_external_data(proto, path, force=force)
    else:
        write_bytes_atomic(path, proto.SerializeToString())
    return path


def _save_with_external_data(proto: onnx.ModelProto, path: Path, *, force: bool) -> None:
    """Tensor data to ``<path>.data``, then the model referring to it, each written atomically.

    The raw bytes of each large tensor are moved out of ``proto`` while the model is serialized and
    moved back afterwards (also on error), so the caller's proto is unchanged and no second copy of
    the model is held in memory.
    """
    data_path = external_data_path(path)
    if data_path.exists() and not force:
        raise OutputExistsError(f"output {data_path} exists; pass --force to overwrite it")
    if not path.parent.exists():
        raise UsageError(f"output folder does not exist: {path.parent}")
    if path.exists():
        # The old model must not meet the new data: absent is a state the output may be in.
        os.unlink(path)
    moved: list[tuple[onnx.TensorProto, bytes, bool]] = []
    try:
        chunks: list[bytes] = []
        offset = 0
        for tensor in onnx.external_data_helper._get_all_tensors(proto):  # noqa: SLF001
            if not tensor.HasField("raw_data") or tensor.ByteSize() < _EXTERNAL_TENSOR_MIN_BYTES:
                continue
            raw = tensor.raw_data
            padding = -offset % _EXTERNAL_ALIGNMENT
            chunks.append(b"\0" * padding)
            offset += padding
            moved.append((tensor, raw, tensor.HasField("data_location")))
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            chunks.append(raw)
            offset += len(raw)
        write_chunks_atomic(data_path, chunks)
        del chunks
        try:
            write_bytes_atomic(path, proto.SerializeToString())
        except BaseException:
            data_path.unlink(missing_ok=True)  # no model refers to it: the old one is gone too
            raise
    finally:
        for tensor, raw, had_location in moved:
            del tensor.external_data[:]
            tensor.ClearField("data_location")
            if had_location:
                tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = raw


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_chunks_atomic(path, [data])


def write_chunks_atomic(path: Path, chunks: list[bytes]) -> None:
    """Write the chunks to ``path`` as one file: a temporary file in the same folder, fsync, rename.

    On any error or interrupt (KeyboardInterrupt included) the temporary file is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    if not path.parent.exists():
        raise UsageError(f"output folder does not exist: {path.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would (0666 & ~umask).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
