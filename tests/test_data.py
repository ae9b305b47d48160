"""Feeds: reading folders / .npz / .npy / iterables, checking them, splitting and limiting."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.data import (
    InputSpec,
    feeds_from_iterable,
    feeds_from_path,
    input_specs,
    limit,
    random_feeds,
    split_holdout,
    validate_feed,
)
from qcompile.errors import InvalidDataError
from tests.helpers import parse_model

IMAGE = InputSpec("x", np.dtype("float32"), ("N", 3, 8, 8))
SEQ = [InputSpec("tokens", np.dtype("float32"), ("N", "T")), InputSpec("ids", np.dtype("int64"), ("N", None))]


def images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal((n, 3, 8, 8)).astype(np.float32)


def collect(source) -> list[dict[str, np.ndarray]]:
    return list(source)


# --- input specs -------------------------------------------------------------------------------


def test_input_specs_skip_initializers_and_keep_symbolic_dims():
    model = parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,8,8] x, int64[B,?] ids, float[4] w) => (float[N,3,8,8] y) { y = Relu(x) }""",
        {"w": np.zeros(4, np.float32)},
    )
    specs = input_specs(model)
    assert [s.name for s in specs] == ["x", "ids"]
    assert specs[0] == IMAGE
    assert specs[1].dtype == np.int64
    assert specs[1].shape == ("B", None)


# --- folders -----------------------------------------------------------------------------------


def test_folder_yields_files_sorted_by_name_with_varying_shapes(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for name, length in [("b.npz", 5), ("a.npz", 3), ("c.npz", 7)]:
        arrays = {
            "tokens": rng.standard_normal((2, length)).astype(np.float32),
            "ids": np.arange(2 * length).reshape(2, length),
        }
        np.savez(tmp_path / name, **arrays)
        expected[name] = arrays
    (tmp_path / "README.txt").write_text("not data")
    source = feeds_from_path(tmp_path, SEQ)
    assert len(source) == 3
    assert "3 .npz files" in source.describe()
    for _ in range(2):  # re-iterable
        feeds = collect(source)
        assert [f["tokens"].shape[1] for f in feeds] == [3, 5, 7]
        for feed, name in zip(feeds, ["a.npz", "b.npz", "c.npz"]):
            np.testing.assert_array_equal(feed["tokens"], expected[name]["tokens"])
            np.testing.assert_array_equal(feed["ids"], expected[name]["ids"])


def test_folder_loads_lazily_and_names_the_bad_file(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "a.npz", x=images(rng, 1))
    (tmp_path / "b.npz").write_bytes(b"PK\x03\x04 truncated")
    feeds = iter(feeds_from_path(tmp_path, [IMAGE]))
    assert next(feeds)["x"].shape == (1, 3, 8, 8)  # the bad file is not read yet
    with pytest.raises(InvalidDataError, match=r"calibration file b\.npz is not a valid \.npz file"):
        next(feeds)


# --- single files ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size, save", [(1, np.savez), (2, np.savez_compressed), (3, np.savez)])
def test_single_npz_is_cut_into_batches_keeping_the_batch_axis(tmp_path, batch_size, save):
    data = images(np.random.default_rng(2), 7)
    save(tmp_path / "calib.npz", x=data)
    source = feeds_from_path(tmp_path / "calib.npz", [IMAGE], batch_size=batch_size)
    feeds = collect(source)
    assert len(source) == len(feeds) == -(-7 // batch_size)
    assert all(f["x"].ndim == 4 and f["x"].shape[0] <= batch_size for f in feeds)
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), data)


def test_npy_for_a_single_input_model(tmp_path):
    data = images(np.random.default_rng(3), 4)
    np.save(tmp_path / "calib.npy", data)
    feeds = collect(feeds_from_path(tmp_path / "calib.npy", [IMAGE], batch_size=2))
    assert [type(f["x"]) for f in feeds] == [np.ndarray, np.ndarray]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), data)


def test_npy_refused_for_a_two_input_model(tmp_path):
    np.save(tmp_path / "calib.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(InvalidDataError, match=r"calib\.npy is a \.npy file.*2 inputs \('tokens', 'ids'\)"):
        feeds_from_path(tmp_path / "calib.npy", SEQ)


def test_single_npz_with_unequal_sample_counts(tmp_path):
    np.savez(tmp_path / "d.npz", tokens=np.zeros((3, 2), np.float32), ids=np.zeros((4, 2), np.int64))
    with pytest.raises(InvalidDataError, match=r"different numbers of samples.*tokens: 3, ids: 4"):
        feeds_from_path(tmp_path / "d.npz", SEQ)


# --- data errors -------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(InvalidDataError, match="calibration data not found"):
        feeds_from_path(tmp_path / "nowhere", [IMAGE])


def test_empty_folder(tmp_path):
    with pytest.raises(InvalidDataError, match="holds no .npz files"):
        feeds_from_path(tmp_path, [IMAGE])


def test_unsupported_file_type(tmp_path):
    (tmp_path / "calib.csv").write_text("1,2,3")
    with pytest.raises(InvalidDataError, match="not a folder of .npz files"):
        feeds_from_path(tmp_path / "calib.csv", [IMAGE])


@pytest.mark.parametrize("content", [b"just some text", b"PK\x03\x04broken zip", b""])
def test_corrupt_npz(tmp_path, content):
    (tmp_path / "x.npz").write_bytes(content)
    with pytest.raises(InvalidDataError, match=r"calibration file x\.npz is not a valid \.npz file"):
        feeds_from_path(tmp_path / "x.npz", [IMAGE])
    with pytest.raises(InvalidDataError, match=r"calibration file x\.npz is not a valid \.npz file"):
        collect(feeds_from_path(tmp_path, [IMAGE]))


def test_truncated_npz_in_a_folder(tmp_path):
    np.savez(tmp_path / "full.npz", x=images(np.random.default_rng(4), 4))
    (tmp_path / "t.npz").write_bytes((tmp_path / "full.npz").read_bytes()[:400])
    (tmp_path / "full.npz").unlink()
    with pytest.raises(InvalidDataError, match=r"t\.npz is not a valid \.npz file"):
        collect(feeds_from_path(tmp_path, [IMAGE]))


def test_pickled_arrays_are_refused(tmp_path):
    objects = np.array([{"a": 1}, None], dtype=object)
    np.savez(tmp_path / "p.npz", x=objects)
    np.save(tmp_path / "p.npy", objects)
    for path in ["p.npz", "p.npy"]:
        with pytest.raises(InvalidDataError, match="pickled Python objects"):
            feeds_from_path(tmp_path / path, [IMAGE])
    with pytest.raises(InvalidDataError, match=r"p\.npz holds pickled Python objects"):
        collect(feeds_from_path(tmp_path, [IMAGE]))


def feed_error(tmp_path, specs=(IMAGE,), **arrays) -> str:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InvalidDataError) as info:
        collect(feeds_from_path(tmp_path, list(specs)))
    return str(info.value)


def test_missing_input_is_named(tmp_path):
    message = feed_error(tmp_path, SEQ, tokens=np.zeros((1, 2), np.float32))
    assert message == "calibration file bad.npz lacks input 'ids'"


def test_unknown_input_is_named(tmp_path):
    message = feed_error(tmp_path, x=np.zeros((1, 3, 8, 8), np.float32), label=np.zeros(1))
    assert "bad.npz has an array 'label', which is not a model input" in message


def test_wrong_static_dim(tmp_path):
    message = feed_error(tmp_path, x=np.zeros((1, 3, 7, 7), np.float32))
    assert message == "calibration file bad.npz: input 'x' has shape (1, 3, 7, 7), the model expects (N, 3, 8, 8)"


def test_wrong_rank(tmp_path):
    message = feed_error(tmp_path, x=np.zeros((3, 8, 8), np.float32))
    assert "has shape (3, 8, 8), the model expects (N, 3, 8, 8)" in message


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_nan_and_inf(tmp_path, bad, word):
    x = np.zeros((2, 3, 8, 8), np.float32)
    x[1, 2, 3, 4] = bad
    assert feed_error(tmp_path, x=x) == f"calibration file bad.npz: input 'x' contains {word}"


def test_empty_array(tmp_path):
    assert "input 'x' is empty (shape (0, 3, 8, 8))" in feed_error(tmp_path, x=np.zeros((0, 3, 8, 8), np.float32))


@pytest.mark.parametrize(
    "array", [np.zeros((1, 3, 8, 8), np.int64), np.zeros((1, 3, 8, 8), bool), np.full((1, 3, 8, 8), "a")]
)
def test_dtype_of_another_kind(tmp_path, array):
    message = feed_error(tmp_path, x=array)
    assert f"input 'x' has dtype {array.dtype}, the model expects float32" in message


def test_same_kind_dtypes_are_cast():
    specs = [InputSpec("f", np.dtype("float32"), (2,)), InputSpec("i", np.dtype("int64"), (2,))]
    feed = validate_feed({"f": np.array([1.5, -2.0]), "i": np.array([3, 4], np.int32)}, specs, "feed")
    assert feed["f"].dtype == np.float32 and feed["i"].dtype == np.int64
    np.testing.assert_array_equal(feed["f"], [1.5, -2.0])
    np.testing.assert_array_equal(feed["i"], [3, 4])


def test_cast_that_would_not_fit_is_an_error():
    i32 = [InputSpec("i", np.dtype("int32"), (1,))]
    with pytest.raises(InvalidDataError, match="outside the range of int32"):
        validate_feed({"i": np.array([2**40])}, i32, "feed")
    f32 = [InputSpec("f", np.dtype("float32"), (1,))]
    with pytest.raises(InvalidDataError, match="outside the range of float32"):
        validate_feed({"f": np.array([1e300])}, f32, "feed")


# --- iterables ---------------------------------------------------------------------------------


def test_list_of_feeds_is_reiterable_and_checked():
    rng = np.random.default_rng(5)
    feeds = [{"x": images(rng, 2)} for _ in range(3)]
    source = feeds_from_iterable(feeds, [IMAGE])
    assert len(source) == 3
    for _ in range(2):
        got = collect(source)
        assert len(got) == 3
        np.testing.assert_array_equal(got[2]["x"], feeds[2]["x"])
    bad = feeds_from_iterable([feeds[0], {"x": np.zeros((1, 3, 4, 4), np.float32)}], [IMAGE])
    with pytest.raises(InvalidDataError, match=r"calibration batch 1: input 'x' has shape \(1, 3, 4, 4\)"):
        collect(bad)


def test_generator_is_read_on_demand_and_replayed():
    pulled = []

    def generate():
        for i in range(4):
            pulled.append(i)
            yield {"x": np.full((1, 3, 8, 8), i, np.float32)}

    source = feeds_from_iterable(generate(), [IMAGE])
    assert next(iter(source))["x"][0, 0, 0, 0] == 0
    assert pulled == [0]  # lazily: only what was asked for
    assert [f["x"][0, 0, 0, 0] for f in source] == [0, 1, 2, 3]
    assert [f["x"][0, 0, 0, 0] for f in source] == [0, 1, 2, 3]  # replayed, not exhausted
    assert len(source) == 4 and pulled == [0, 1, 2, 3]


def test_tuples_map_positionally_and_labels_are_refused():
    tokens, ids = np.ones((1, 4), np.float32), np.arange(4).reshape(1, 4)
    feed = next(iter(feeds_from_iterable([(tokens, ids)], SEQ)))
    assert set(feed) == {"tokens", "ids"} and feed["ids"] is ids
    single = next(iter(feeds_from_iterable([np.zeros((1, 3, 8, 8), np.float32)], [IMAGE])))
    assert single["x"].shape == (1, 3, 8, 8)
    with pytest.raises(InvalidDataError, match=r"batch 0 holds 2 arrays but the model has 1 inputs \('x'\)"):
        collect(feeds_from_iterable([(np.zeros((1, 3, 8, 8), np.float32), np.zeros(1))], [IMAGE]))


def test_a_single_feed_dict_is_not_an_iterable_of_feeds():
    with pytest.raises(InvalidDataError, match="pass a list of feeds"):
        feeds_from_iterable({"x": np.zeros((1, 3, 8, 8), np.float32)}, [IMAGE])


def test_torch_dataloader_of_dicts_tensors_and_tuples():
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    tuples = DataLoader(TensorDataset(x), batch_size=4)  # yields 1-tuples of tensors
    feeds = collect(feeds_from_iterable(tuples, [IMAGE]))
    assert [f["x"].shape[0] for f in feeds] == [4, 2]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x.numpy())
    dicts = DataLoader([{"x": x[i]} for i in range(6)], batch_size=3)
    source = feeds_from_iterable(dicts, [IMAGE])
    assert len(source) == 2 and len(collect(source)) == 2  # a DataLoader is re-iterable
    tensors = DataLoader(x, batch_size=6)
    assert collect(feeds_from_iterable(tensors, [IMAGE]))[0]["x"].dtype == np.float32


# --- random feeds ------------------------------------------------------------------------------


def test_random_feeds_are_seeded_and_symbolic_dims_become_one():
    specs = [InputSpec("tokens", np.dtype("float32"), ("N", "T", 4))]
    a, b, c = (collect(random_feeds(specs, 3, seed)) for seed in (7, 7, 8))
    assert [f["tokens"].shape for f in a] == [(1, 1, 4)] * 3
    assert a[0]["tokens"].dtype == np.float32
    np.testing.assert_array_equal(a[2]["tokens"], b[2]["tokens"])
    assert not np.array_equal(a[2]["tokens"], c[2]["tokens"])
    assert not np.array_equal(a[0]["tokens"], a[1]["tokens"])


def test_random_feeds_refuse_integer_inputs():
    with pytest.raises(InvalidDataError, match="input 'ids' is int64"):
        random_feeds(SEQ, 2, 0)


# --- split and limit ---------------------------------------------------------------------------


def values(source) -> list[float]:
    return [float(v) for f in source for v in f["x"][:, 0, 0, 0]]


def stacked(tmp_path, n: int, batch_size: int = 1):
    x = np.zeros((n, 3, 8, 8), np.float32)
    x[:, 0, 0, 0] = np.arange(n)
    np.savez(tmp_path / "s.npz", x=x)
    return feeds_from_path(tmp_path / "s.npz", [IMAGE], batch_size=batch_size)


@pytest.mark.parametrize("n, fraction, held", [(10, 0.2, 2), (25, 0.28, 7), (2, 0.2, 1), (5, 0.01, 1), (5, 0.99, 4)])
def test_split_holds_out_the_last_feeds(tmp_path, n, fraction, held):
    calib, holdout = split_holdout(stacked(tmp_path, n), fraction)
    assert (len(calib), len(holdout)) == (n - held, held)
    assert values(calib) == list(range(n - held)) and values(holdout) == list(range(n - held, n))


def test_split_of_a_single_batch_splits_samples(tmp_path):
    calib, holdout = split_holdout(stacked(tmp_path, 5, batch_size=8), 0.2)
    assert values(calib) == [0, 1, 2, 3] and values(holdout) == [4]
    assert "sample 4" in holdout.describe()


def test_split_of_a_single_sample_is_an_error(tmp_path):
    with pytest.raises(InvalidDataError, match="holds a single sample"):
        split_holdout(stacked(tmp_path, 1), 0.2)


def test_limit(tmp_path):
    source = stacked(tmp_path, 6)
    assert values(limit(source, 4)) == [0, 1, 2, 3]
    assert limit(source, 10) is source
    calib, _ = split_holdout(source, 0.5)
    assert values(limit(calib, 2)) == [0, 1]
