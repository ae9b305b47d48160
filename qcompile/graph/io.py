"""The file edges of the core: loading a model into the IR and saving one atomically.

The input is never modified: a path is parsed into a fresh IR; an ``onnx.ModelProto`` is
serialized and parsed again, so edits to the IR never reach the caller's object.
"""

from __future__ import annotations

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
        target = (base / location).resolve()
        if os.path.isabs(location) or base not in target.parents:
            raise InvalidModelError(
                f"external data of tensor {tensor.name!r} points outside the model's folder: {location!r}"
            )
        if not target.is_file():
            raise InvalidModelError(f"external data file {location!r} of tensor {tensor.name!r} is missing")


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
    _check_external_data_paths(proto, path.parent)
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError) as exc:
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

    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise InvalidModelError(f"{name} is not a valid ONNX model: {first}") from None

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


def save_model_atomic(model: ir.Model | onnx.ModelProto, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``model`` to ``path`` via a temporary file in the same folder, fsync, then rename.

    A file at ``path`` is therefore either absent, the old file, or the complete new model.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"output {path} exists; pass --force to overwrite it")
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    data = proto.SerializeToString()
    write_bytes_atomic(path, data)
    return path


def write_bytes_atomic(path: Path, data: bytes) -> None:
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
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
