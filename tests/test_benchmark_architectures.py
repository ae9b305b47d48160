"""benchmarks/architectures.py: its smallest model (the ViT, quick training, TorchScript export) end to end.

Checks what the table is built from and that the transformer passes apply to an attention written
unlike MiniLM's (separate q/k/v, q scaled before q·kᵀ), never a timing.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.architectures import main


@pytest.mark.slow
def test_vit_quick_run_applies_the_transformer_passes(tmp_path, capsys):
    out = tmp_path / "arch.json"
    assert main(["--quick", "--models", "vit", "--exporters", "torchscript", "--latency-s", "0.2", "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["model"] == "vit" and result["exporter"] == "torchscript" and result["opset"] == 17
    rows = result["configs"]
    assert set(rows) == {"default", "fold_upstream", "no_sibling_fusion"}
    for row in rows.values():
        assert row["fusion"]["fused"], row["fusion"]
        assert row["metrics"]["sqnr_db"] > 20 and row["metrics"]["agreement"] > 0.9
        assert row["latency_ms"] > 0
        # Both blocks' q scale (before q·kᵀ) goes into a quantization scale.
        assert row["passes"]["scales_folded"] == 2
    default = rows["default"]["passes"]
    # Each block's q/k/v projections run as one product.
    assert (default["fused_matmuls"], default["fused_groups"]) == (6, 2)
    # With q's scale folded first, each group quantizes q, k, v once before its Split.
    assert default["quantized_once"] == 2
    assert rows["no_sibling_fusion"]["passes"]["fused_groups"] == 0
    # Both attention contexts' SmoothQuant Muls go into their V projections, only when asked.
    assert default["muls_folded_upstream"] == 0 and rows["fold_upstream"]["passes"]["muls_folded_upstream"] == 2
    table = capsys.readouterr().out
    assert table.count("| vit | torchscript (opset 17) |") == 3
