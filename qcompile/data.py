"""Feeds: the model-input batches that calibration and verification run, read lazily and checked.

A *feed* is ``dict[str, np.ndarray]``: one batch for every model input. A ``FeedSource`` is a
re-iterable, sized sequence of feeds that loads one feed at a time, so no source holds all files:

- a folder of ``.npz`` files, sorted by name, one feed per file (a file holds one sample or a batch;
  shapes may differ between files, e.g. sequence length); other files in the folder are ignored;
- a single ``.npz`` whose arrays stack samples on axis 0, or a ``.npy`` (single-input models), cut
  into feeds of ``batch_size`` samples that keep the batch axis. A ``.npy`` is memory-mapped; a
  ``.npz`` is read whole once per pass over the source (use a folder for data larger than memory);
- in-memory feeds (``feeds_from_iterable``) and seeded random data (``random_feeds``).

Every source checks each feed as it yields it (``validate_feed``), so an error names the file (or
the batch index, counted from 0) that holds the bad data. Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import abc
import math
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompile.errors import InvalidDataError, InvalidModelError

Feed = dict[str, np.ndarray]

# What np.load raises on a damaged archive or array.
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True)
class InputSpec:
    """A model input: dims are ints (static), strs (named symbolic) or None (unnamed)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None  # None: the model does not say the rank

    def shape_text(self) -> str:
        if self.shape is None:
            return "(any shape)"
        return _shape_text(["?" if d is None else d for d in self.shape])


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The graph inputs that are not initializers, in graph order."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        if not isinstance(value.type, ir.TensorType) or value.dtype is None:
            raise InvalidModelError(f"model input {value.name!r} is not a tensor ({value.type})")
        try:
            dtype = np.dtype(value.dtype.numpy())
        except TypeError:  # UNDEFINED (which onnx's checker lets through) and types numpy lacks
            raise InvalidModelError(
                f"model input {value.name!r} has element type {value.dtype.name}, which has no numpy type"
            ) from None
        shape = None
        if value.shape is not None:
            shape = tuple(d if isinstance(d, int) else d.value for d in value.shape)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def _span(unit: str, lo: int, hi: int) -> str:
    """"sample 3" or "samples 3-7" for the half-open range [lo, hi)."""
    return f"{unit} {lo}" if hi - lo == 1 else f"{unit}s {lo}-{hi - 1}"


def _shape_text(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def validate_feed(feed: Mapping[str, Any], specs: Sequence[InputSpec], where: str) -> Feed:
    """Check one feed against the model's inputs; return it with dtypes matched to the model.

    ``where`` starts each message ("calibration file x.npz"). Errors (InvalidDataError): a missing
    or unknown input name, empty arrays, a rank or static-dim mismatch, NaN or Inf, a dtype of
    another kind. Within one kind (signed int, unsigned int, float) data is cast to the model's
    type, e.g. int32 → int64 or float64 → float32, when the values fit; bool, strings and objects
    are never cast, nor int ↔ float.
    """
    if not isinstance(feed, Mapping):
        raise InvalidDataError(f"{where} is a {type(feed).__name__}, not a mapping of input names to arrays")
    names = [spec.name for spec in specs]
    for name in names:
        if name not in feed:
            raise InvalidDataError(f"{where} lacks input {name!r}")
    for key in feed:
        if key not in names:
            raise InvalidDataError(
                f"{where} has an array {key!r}, which is not a model input (inputs: {', '.join(map(repr, names))})"
            )
    return {spec.name: _check_array(feed[spec.name], spec, where) for spec in specs}


def _check_array(value: Any, spec: InputSpec, where: str) -> np.ndarray:
    what = f"{where}: input {spec.name!r}"
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    if arr.dtype.hasobject:
        raise InvalidDataError(f"{what} holds Python objects, not numbers")
    if arr.size == 0:
        raise InvalidDataError(f"{what} is empty (shape {_shape_text(arr.shape)})")
    if spec.shape is not None and (
        arr.ndim != len(spec.shape)
        or any(isinstance(d, int) and d != n for d, n in zip(spec.shape, arr.shape))
    ):
        raise InvalidDataError(f"{what} has shape {_shape_text(arr.shape)}, the model expects {spec.shape_text()}")
    if arr.dtype.kind == "f":
        lo, hi = arr.min(), arr.max()  # NaN propagates through min/max: no mask array needed
        if np.isnan(lo) or np.isnan(hi):
            raise InvalidDataError(f"{what} contains NaN")
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise InvalidDataError(f"{what} contains Inf")
    if arr.dtype == spec.dtype:
        return arr
    if arr.dtype.kind != spec.dtype.kind or spec.dtype.kind not in "iuf":
        raise InvalidDataError(f"{what} has dtype {arr.dtype}, the model expects {spec.dtype}")
    if spec.dtype.kind in "iu":
        info = np.iinfo(spec.dtype)
        fits = info.min <= arr.min() and arr.max() <= info.max
        cast = arr.astype(spec.dtype)
    else:
        with np.errstate(over="ignore"):
            cast = arr.astype(spec.dtype)
        fits = bool(np.isfinite(cast.min()) and np.isfinite(cast.max()))
    if not fits:
        raise InvalidDataError(f"{what} has {arr.dtype} values outside the range of {spec.dtype}, the model's type")
    return cast


class FeedSource(abc.ABC):
    """A re-iterable, sized source of feeds; iterating loads and checks one feed at a time."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of feeds (not samples: a feed may be a batch)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the feeds come from, for the report."""

    @abc.abstractmethod
    def _iter_range(self, start: int, stop: int) -> Iterator[Feed]:
        """The checked feeds with index in [start, stop)."""

    def __iter__(self) -> Iterator[Feed]:
        return self._iter_range(0, len(self))


def feeds_from_path(
    path: str | Path, specs: Sequence[InputSpec], *, batch_size: int = 1, role: str = "calibration"
) -> FeedSource:
    """Feeds from a folder of .npz files, one .npz file or one .npy file (see the module docstring).

    ``batch_size`` (samples per feed) applies to single files; a folder yields one feed per file.
    ``role`` ("calibration", "verification") starts error messages.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    path = Path(path)
    if not path.exists():
        raise InvalidDataError(f"{role} data not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
        if not files:
            raise InvalidDataError(f"{role} folder {path} holds no .npz files")
        return _FolderSource(path, files, specs, role)
    if path.suffix not in (".npz", ".npy"):
        raise InvalidDataError(f"{role} data {path} is not a folder of .npz files, a .npz or a .npy file")
    if path.suffix == ".npy" and len(specs) != 1:
        names = ", ".join(repr(s.name) for s in specs)
        raise InvalidDataError(
            f"{role} file {path.name} is a .npy file, which holds one array, but the model has "
            f"{len(specs)} inputs ({names}); use a .npz file with one array per input name"
        )
    return _StackedFileSource(path, specs, batch_size, role)


def _check_zip(path: Path, where: str) -> None:
    with open(path, "rb") as f:
        if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise InvalidDataError(f"{where} is not a valid .npz file (not a zip archive)")


def _unreadable(where: str, kind: str, exc: Exception) -> InvalidDataError:
    if "allow_pickle" in str(exc):
        return InvalidDataError(f"{where} holds pickled Python objects, which qcompile does not load")
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InvalidDataError(f"{where} is not a valid {kind} file ({reason})")


def _read_npz(path: Path, where: str) -> dict[str, np.ndarray]:
    _check_zip(path, where)
    try:
        # Open the file here: np.load(path) leaks its handle when the zip turns out to be damaged.
        with open(path, "rb") as fp, np.load(fp, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except _READ_ERRORS as exc:
        raise _unreadable(where, ".npz", exc) from None


def _read_headers(path: Path, where: str) -> dict[str, tuple[int, ...]]:
    """The shape of each array in a .npz/.npy, from the headers alone (no data is read)."""
    fmt = np.lib.format

    def shape_of(fp: Any) -> tuple[int, ...]:
        version = fmt.read_magic(fp)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(fp)
        if dtype.hasobject:
            raise InvalidDataError(f"{where} holds pickled Python objects, which qcompile does not load")
        return shape

    try:
        if path.suffix == ".npy":
            with open(path, "rb") as fp:
                return {"": shape_of(fp)}
        _check_zip(path, where)
        shapes = {}
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if member.endswith(".npy"):
                    with zf.open(member) as fp:
                        shapes[member[: -len(".npy")]] = shape_of(fp)
        return shapes
    except _READ_ERRORS as exc:
        raise _unreadable(where, path.suffix, exc) from None


class _FolderSource(FeedSource):
    def __init__(self, folder: Path, files: list[Path], specs: Sequence[InputSpec], role: str) -> None:
        self._folder, self._files, self._specs, self._role = folder, files, list(specs), role

    def __len__(self) -> int:
        return len(self._files)

    def describe(self) -> str:
        return f"folder {self._folder}/ with {len(self._files)} .npz files"

    def _iter_range(self, start: int, stop: int) -> Iterator[Feed]:
        for file in self._files[start:stop]:
            where = f"{self._role} file {file.name}"
            yield validate_feed(_read_npz(file, where), self._specs, where)


class _StackedFileSource(FeedSource):
    """One .npz/.npy whose arrays stack samples on axis 0, cut into batches of ``batch_size``."""

    def __init__(self, path: Path, specs: Sequence[InputSpec], batch_size: int, role: str) -> None:
        self._path, self._specs, self._batch, self._role = path, list(specs), batch_size, role
        where = f"{role} file {path.name}"
        headers = _read_headers(path, where)
        if not headers:
            raise InvalidDataError(f"{where} holds no arrays")
        sizes = {}
        for key, shape in headers.items():
            if not shape:
                raise InvalidDataError(f"{where}: array {key or path.name!r} is a scalar; stack samples on axis 0")
            sizes[key] = shape[0]
        if len(set(sizes.values())) != 1:
            listed = ", ".join(f"{k}: {n}" for k, n in sizes.items())
            raise InvalidDataError(f"{where}: arrays hold different numbers of samples on axis 0 ({listed})")
        self._samples = next(iter(sizes.values()))
        if self._samples == 0:
            raise InvalidDataError(f"{where} holds no samples")

    def __len__(self) -> int:
        return math.ceil(self._samples / self._batch)

    def describe(self) -> str:
        return f"file {self._path} with {self._samples} samples, {self._batch} per feed"

    def _iter_range(self, start: int, stop: int) -> Iterator[Feed]:
        where = f"{self._role} file {self._path.name}"
        if self._path.suffix == ".npy":
            try:  # memory-mapped: each batch reads only its own rows
                arrays = {self._specs[0].name: np.load(self._path, mmap_mode="r", allow_pickle=False)}
            except _READ_ERRORS as exc:
                raise _unreadable(where, ".npy", exc) from None
        else:
            arrays = _read_npz(self._path, where)
        for index in range(start, stop):
            lo, hi = index * self._batch, min((index + 1) * self._batch, self._samples)
            feed = {key: np.array(arr[lo:hi]) for key, arr in arrays.items()}
            yield validate_feed(feed, self._specs, f"{where} ({_span('sample', lo, hi)})")


def feeds_from_iterable(
    iterable: Iterable[Any], specs: Sequence[InputSpec], *, role: str = "calibration"
) -> FeedSource:
    """Feeds from Python objects: each item is a dict of arrays, one array/tensor, or a tuple of them.

    Tuples map positionally onto the input names (a tuple with a label too many is an error, not
    dropped). Torch tensors become numpy through ``.detach().cpu().numpy()``; torch is not imported.
    A list, or a re-iterable such as a torch DataLoader, is iterated afresh on each pass (a DataLoader
    without ``len`` is counted by one pass). A one-shot iterator (a generator) is read on demand and
    its items are kept, so later passes replay them: its data is then held in memory.
    """
    if isinstance(iterable, (Mapping, np.ndarray)):
        raise InvalidDataError(
            f"{role} data is a single {type(iterable).__name__}; pass a list of feeds (dicts of arrays)"
        )
    return _IterableSource(iterable, specs, role)


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        return value.detach().cpu().numpy()
    return np.asarray(value)


class _IterableSource(FeedSource):
    def __init__(self, iterable: Iterable[Any], specs: Sequence[InputSpec], role: str) -> None:
        self._specs, self._role, self._name = list(specs), role, type(iterable).__name__
        # iter() on a DataLoader would start its workers, so test the type instead.
        self._one_shot = isinstance(iterable, Iterator)
        self._items = iterable
        self._cache: list[Any] = []
        self._len: int | None = len(iterable) if isinstance(iterable, Sequence) else None

    def _raw_items(self) -> Iterator[Any]:
        if not self._one_shot:
            yield from self._items
            return
        index = 0
        while True:  # replay what earlier passes read, then read on
            if index == len(self._cache):
                try:
                    self._cache.append(next(self._items))  # type: ignore[call-overload]
                except StopIteration:
                    return
            yield self._cache[index]
            index += 1

    def __len__(self) -> int:
        if self._len is None:
            try:
                self._len = len(self._items)  # type: ignore[arg-type]
            except TypeError:
                self._len = sum(1 for _ in self._raw_items())
        return self._len

    def describe(self) -> str:
        return f"{len(self)} in-memory batches ({self._name})"

    def _as_feed(self, item: Any, where: str) -> dict[str, Any]:
        if isinstance(item, Mapping):
            return {key: _to_numpy(value) for key, value in item.items()}
        values = list(item) if isinstance(item, (tuple, list)) else [item]
        if len(values) != len(self._specs):
            names = ", ".join(repr(s.name) for s in self._specs)
            raise InvalidDataError(
                f"{where} holds {len(values)} arrays but the model has {len(self._specs)} inputs ({names}); "
                "yield exactly one array per input, in order (no labels)"
            )
        return {spec.name: _to_numpy(value) for spec, value in zip(self._specs, values)}

    def __iter__(self) -> Iterator[Feed]:
        return self._iter_range(0, None)  # without len(), which would read a generator to its end

    def _iter_range(self, start: int, stop: int | None) -> Iterator[Feed]:
        for index, item in enumerate(islice(self._raw_items(), start, stop), start=start):
            where = f"{self._role} batch {index}"
            yield validate_feed(self._as_feed(item, where), self._specs, where)


def random_feeds(specs: Sequence[InputSpec], n: int, seed: int) -> FeedSource:
    """``n`` feeds of standard-normal data, one sample each: symbolic dims (batch, sequence) become 1.

    Feed ``i`` depends only on (seed, i). Only float inputs can be made up this way: random integers
    would be meaningless (and often out of range) as token ids or indices.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    for spec in specs:
        if spec.dtype.kind != "f":
            raise InvalidDataError(
                f"random calibration data needs float inputs, but input {spec.name!r} is {spec.dtype}; "
                "give calibration data"
            )
        if spec.shape is None:
            raise InvalidDataError(f"random calibration data needs a known rank; input {spec.name!r} has none")
    return _RandomSource(list(specs), n, seed)


class _RandomSource(FeedSource):
    def __init__(self, specs: list[InputSpec], n: int, seed: int) -> None:
        self._specs, self._n, self._seed = specs, n, seed

    def __len__(self) -> int:
        return self._n

    def describe(self) -> str:
        return f"{self._n} random feeds (standard normal, seed {self._seed})"

    def _iter_range(self, start: int, stop: int) -> Iterator[Feed]:
        for index in range(start, stop):
            rng = np.random.default_rng((self._seed, index))
            yield {
                spec.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in spec.shape]).astype(spec.dtype)
                for spec in self._specs
            }


class _Slice(FeedSource):
    """Feeds [start, stop) of another source."""

    def __init__(self, base: FeedSource, start: int, stop: int) -> None:
        self._base, self._start, self._stop = base, start, stop

    def __len__(self) -> int:
        return self._stop - self._start

    def describe(self) -> str:
        return f"{self._base.describe()}: {_span('feed', self._start, self._stop)}"

    def _iter_range(self, start: int, stop: int) -> Iterator[Feed]:
        return self._base._iter_range(self._start + start, self._start + stop)


class _SampleSlice(FeedSource):
    """Samples [start, stop) (axis 0 of every input) of a source holding a single feed."""

    def __init__(self, base: FeedSource, start: int, stop: int) -> None:
        self._base, self._start, self._stop = base, start, stop

    def __len__(self) -> int:
        return 1

    def describe(self) -> str:
        return f"{self._base.describe()}: {_span('sample', self._start, self._stop)}"

    def _iter_range(self, start: int, stop: int) -> Iterator[Feed]:
        if start < stop:
            feed = next(iter(self._base))
            yield {name: arr[self._start : self._stop] for name, arr in feed.items()}


def _holdout_count(fraction: float, n: int) -> int:
    # round() first: 0.28 * 25 is 7.000000000000001 in floating point, whose ceil would be 8.
    return min(max(math.ceil(round(fraction * n, 9)), 1), n - 1)


def split_holdout(source: FeedSource, fraction: float) -> tuple[FeedSource, FeedSource]:
    """(calibration, held-out) parts: the last ceil(fraction · n) feeds are held out, at least 1 each.

    The split is deterministic (no shuffling). A source of a single feed that is a batch of several
    samples is split on samples (axis 0) instead; a single sample cannot be split.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n = len(source)
    if n == 0:
        raise InvalidDataError(f"cannot hold out verification data: {source.describe()} is empty")
    if n >= 2:
        cut = n - _holdout_count(fraction, n)
        return _Slice(source, 0, cut), _Slice(source, cut, n)
    sizes = {arr.shape[0] if arr.ndim else 1 for feed in source for arr in feed.values()}
    samples = sizes.pop() if len(sizes) == 1 else 1
    if samples < 2:
        raise InvalidDataError(
            f"cannot hold out verification data: {source.describe()} holds a single sample; "
            "give more samples or separate verification data"
        )
    cut = samples - _holdout_count(fraction, samples)
    return _SampleSlice(source, 0, cut), _SampleSlice(source, cut, samples)


def limit(source: FeedSource, n: int) -> FeedSource:
    """At most the first ``n`` feeds of ``source``."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return source if n >= len(source) else _Slice(source, 0, n)


def fingerprint_feeds(feeds: Iterable[dict[str, np.ndarray]], digest) -> Iterable[dict[str, np.ndarray]]:
    """Pass feeds through while hashing names, dtypes, shapes and bytes (the calibration fingerprint)."""
    for feed in feeds:
        for name in sorted(feed):
            array = np.ascontiguousarray(feed[name])
            digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
            digest.update(array.tobytes())
        yield feed
