"""Transformer-style models other than MiniLM, built and briefly trained in code, through qcompile's passes.

The transformer passes (``smooth_quant``, ``quantize_dynamic_matmul``, ``fuse_sibling_matmuls``,
``fold_matmul_scale``, opt-in ``fold_smoothing_mul``) were written against MiniLM's torch.onnx export.
This script checks whether they apply to other ways of writing attention, each trained for seconds
with fixed seeds so the activations are those of a trained model (no downloads):

- ``vit``: a pre-LayerNorm ViT on scikit-learn's 8x8 digits (2x2 patches, class token), separate
  q/k/v Linear, q scaled by 1/sqrt(d) *before* Q·Kᵀ, explicit softmax. Metric: test accuracy.
- ``gpt``: a GPT-style causal character model on Python standard-library docstrings (pre-LayerNorm,
  one packed qkv Linear split three ways, ``F.scaled_dot_product_attention(is_causal=True)``, whose
  export scales q and k by d^-1/4 each). Metric: next-character agreement with float (argmax).
- ``encoder``: ``nn.TransformerEncoder`` (post-LayerNorm, ``nn.MultiheadAttention`` with its packed
  ``in_proj``) classifying digits read as 8 rows of 8 pixels. Metric: test accuracy.

Each model is exported with the TorchScript exporter (``dynamo=False``, opset 17) and the dynamo
exporter (torch 2.13 writes opset 20; it fixes nn.MultiheadAttention's batch at the example's 1, so
that model is evaluated one sample at a time), and compiled three ways: qcompile's defaults,
``fold_upstream`` on, and sibling fusion off. Each row gives the metric and output SQNR on held-out
data, what the passes did (from the compile report's pass notes), the fusion check, and 1-thread
batch-1 latency against float (interleaved; rough on a shared machine).

    python benchmarks/architectures.py --out /tmp/architectures.json     # table on stdout, JSON to --out
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

Feed = dict[str, np.ndarray]
Outputs = list[np.ndarray]  # the first output of each evaluation feed

SEED = 0
D_MODEL = 64
HEADS = 4
EXPORTERS = ("torchscript", "dynamo")
CONFIGS = ("default", "fold_upstream", "no_sibling_fusion")


@dataclass
class Arch:
    name: str
    description: str
    module: object  # torch.nn.Module in eval mode
    example: Feed  # batch 1, for export and latency
    calibration: list[Feed]
    evaluation: list[Feed]
    metric: Callable[[Outputs, Outputs], dict[str, float]]
    data: dict = field(default_factory=dict)


# --- models --------------------------------------------------------------------------------------


def _torch():
    import torch

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    return torch


def _train(module, batches: Callable[[int], tuple], steps: int, lr: float = 3e-3) -> float:
    """Adam on cross-entropy over ``batches(step) -> (inputs, targets)``; returns the last loss."""
    torch = _torch()
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    module.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        inputs, targets = batches(step)
        logits = module(inputs)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()
    return float(loss.detach())


def _digits_split():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    order = np.random.default_rng(SEED).permutation(len(images))
    images, labels = images[order], digits.target[order].astype(np.int64)
    # train / calibration / test
    return (images[:1200], labels[:1200]), images[1200:1400], (images[1400:], labels[1400:])


def _accuracy(labels: np.ndarray) -> Callable[[Outputs, Outputs], dict[str, float]]:
    def metric(reference: Outputs, test: Outputs) -> dict[str, float]:
        ref = np.concatenate([np.argmax(o, axis=-1) for o in reference])
        got = np.concatenate([np.argmax(o, axis=-1) for o in test])
        return {"accuracy": float(np.mean(got == labels)), "float_accuracy": float(np.mean(ref == labels)),
                "agreement": float(np.mean(got == ref))}

    return metric


def _digit_arch(name: str, description: str, module, quick: bool) -> Arch:
    torch = _torch()
    (train_x, train_y), calib_x, (test_x, test_y) = _digits_split()
    tx, ty = torch.from_numpy(train_x), torch.from_numpy(train_y)
    rng = np.random.default_rng(SEED)

    def batches(step: int):
        idx = torch.from_numpy(rng.integers(0, len(tx), 64))
        return tx[idx], ty[idx]

    loss = _train(module, batches, steps=150 if quick else 600)
    calib = calib_x[:32] if quick else calib_x
    return Arch(
        name=name, description=description, module=module,
        example={"image": test_x[:1]},
        calibration=[{"image": calib[i : i + 1]} for i in range(len(calib))],
        evaluation=[{"image": test_x[i : i + 50]} for i in range(0, len(test_x), 50)],
        metric=_accuracy(test_y),
        data={"train": f"{len(train_x)} digits, {150 if quick else 600} Adam steps of 64 (final loss {loss:.3f})",
              "calibration": f"{len(calib)} digits, batch 1", "evaluation": f"{len(test_x)} digits, batches of 50"},
    )


def vit(quick: bool) -> Arch:
    torch = _torch()
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
            self.q, self.k, self.v = (nn.Linear(D_MODEL, D_MODEL) for _ in range(3))
            self.proj = nn.Linear(D_MODEL, D_MODEL)
            self.mlp = nn.Sequential(nn.Linear(D_MODEL, 4 * D_MODEL), nn.GELU(), nn.Linear(4 * D_MODEL, D_MODEL))
            # A Python constant, as timm writes it (from x.shape, the TorchScript exporter would
            # trace it as Shape→Gather→Div→Pow: a computed tensor no pass folds).
            self.scale = (D_MODEL // HEADS) ** -0.5

        def forward(self, x):
            b, t, c = x.shape
            h = self.ln1(x)
            heads = lambda y: y.reshape(b, t, HEADS, c // HEADS).transpose(1, 2)  # noqa: E731
            q = heads(self.q(h) * self.scale)  # scaled before Q·Kᵀ (timm's ViT)
            att = torch.softmax(q @ heads(self.k(h)).transpose(-2, -1), dim=-1)
            x = x + self.proj((att @ heads(self.v(h))).transpose(1, 2).reshape(b, t, c))
            return x + self.mlp(self.ln2(x))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, D_MODEL)  # 2x2 patches
            self.cls = nn.Parameter(torch.zeros(1, 1, D_MODEL))
            self.pos = nn.Parameter(torch.randn(1, 17, D_MODEL) * 0.02)
            self.blocks = nn.Sequential(Block(), Block())
            self.norm, self.head = nn.LayerNorm(D_MODEL), nn.Linear(D_MODEL, 10)

        def forward(self, image):
            b = image.shape[0]
            patches = image.reshape(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)
            x = torch.cat([self.cls.expand(b, -1, -1), self.embed(patches)], dim=1) + self.pos
            return self.head(self.norm(self.blocks(x))[:, 0])

    return _digit_arch("vit", "ViT, 2 pre-LN blocks, d=64, 4 heads, separate q/k/v, q scaled before Q·Kᵀ; "
                       "digits 8x8 as 16 2x2 patches + class token", ViT(), quick)


def encoder(quick: bool) -> Arch:
    torch = _torch()
    nn = torch.nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, D_MODEL)
            self.pos = nn.Parameter(torch.randn(1, 8, D_MODEL) * 0.02)
            layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, dim_feedforward=4 * D_MODEL, dropout=0.1, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
            self.head = nn.Linear(D_MODEL, 10)

        def forward(self, image):
            return self.head(self.encoder(self.embed(image) + self.pos).mean(dim=1))

    return _digit_arch("encoder", "nn.TransformerEncoder, 2 post-LN layers, d=64, 4 heads (packed in_proj), "
                       "ReLU FFN; digits as 8 rows of 8 pixels, mean-pooled", Encoder(), quick)


def stdlib_text() -> str:
    """Docstring summaries of the standard library (``corpus.py`` in an isolated child), joined by newlines."""
    with tempfile.TemporaryDirectory(prefix="qcompile-corpus-") as tmp:
        out = Path(tmp) / "corpus.json"
        script = Path(__file__).with_name("corpus.py")
        subprocess.run([sys.executable, "-I", str(script), str(out)], check=True, cwd=tmp, capture_output=True)
        texts = json.loads(out.read_text())["texts"]
    return "\n".join(t for t in texts if t.isascii())


def gpt(quick: bool) -> Arch:
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional
    block = 32
    text = stdlib_text()
    vocab = sorted(set(text))
    codes = np.searchsorted(np.array(vocab), np.array(list(text))).astype(np.int64)
    split = int(len(codes) * 0.9)
    train, held = codes[:split], codes[split:]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
            self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)  # packed, as GPT-2 (c_attn) and nanoGPT
            self.proj = nn.Linear(D_MODEL, D_MODEL)
            self.mlp = nn.Sequential(nn.Linear(D_MODEL, 4 * D_MODEL), nn.GELU(), nn.Linear(4 * D_MODEL, D_MODEL))

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
            q, k, v = (y.reshape(b, t, HEADS, c // HEADS).transpose(1, 2) for y in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(len(vocab), D_MODEL), nn.Embedding(block, D_MODEL)
            self.blocks = nn.Sequential(Block(), Block())
            self.norm, self.head = nn.LayerNorm(D_MODEL), nn.Linear(D_MODEL, len(vocab))

        def forward(self, tokens):
            x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
            return self.head(self.norm(self.blocks(x)))

    module = GPT()
    rng = np.random.default_rng(SEED)
    windows = lambda data, starts: np.stack([data[s : s + block + 1] for s in starts])  # noqa: E731

    def batches(step: int):
        w = torch.from_numpy(windows(train, rng.integers(0, len(train) - block - 1, 32)))
        return w[:, :-1], w[:, 1:]

    steps = 150 if quick else 800
    loss = _train(module, batches, steps=steps)
    starts = np.random.default_rng(SEED + 1).integers(0, len(held) - block - 1, 232 if not quick else 64)
    held_w = windows(held, starts)
    calib, test = held_w[:32, :-1] if quick else held_w[:132, :-1], held_w[-100:] if not quick else held_w[32:]

    def metric(reference: Outputs, got: Outputs) -> dict[str, float]:
        ref = np.concatenate([np.argmax(o, axis=-1) for o in reference])
        out = np.concatenate([np.argmax(o, axis=-1) for o in got])
        truth = test[:, 1:]
        return {"agreement": float(np.mean(out == ref)), "accuracy": float(np.mean(out == truth)),
                "float_accuracy": float(np.mean(ref == truth))}

    return Arch(
        name="gpt",
        description=f"GPT-style char model, 2 pre-LN blocks, d=64, 4 heads, packed qkv, SDPA causal; "
                    f"{len(vocab)} chars, context {block}",
        module=module, example={"tokens": test[:1, :-1]},
        calibration=[{"tokens": calib[i : i + 1]} for i in range(len(calib))],
        evaluation=[{"tokens": test[i : i + 25, :-1]} for i in range(0, len(test), 25)],
        metric=metric,
        data={"train": f"{len(train)} chars of stdlib docstrings, {steps} Adam steps of 32x{block} (final loss {loss:.3f})",
              "calibration": f"{len(calib)} held-out windows, batch 1",
              "evaluation": f"{len(test)} held-out windows of {block}, next-char argmax"},
    )


ARCHS = {"vit": vit, "gpt": gpt, "encoder": encoder}


# --- export, compile, measure --------------------------------------------------------------------


def export(arch: Arch, exporter: str) -> onnx.ModelProto:
    """The module as ONNX with a dynamic batch axis (``exporter``: torchscript at opset 17, or dynamo)."""
    torch = _torch()
    (name, array), = arch.example.items()
    example = (torch.from_numpy(array),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            buffer = io.BytesIO()
            torch.onnx.export(arch.module, example, buffer, input_names=[name], output_names=["logits"],
                              dynamic_axes={name: {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
            return onnx.load_from_string(buffer.getvalue())
        batch = torch.export.Dim("batch", min=1, max=1024)
        program = torch.onnx.export(arch.module, example, input_names=[name], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
        return program.model_proto


def options_for(config: str):
    from qcompile.options import CompileOptions, SchemeOptions, SmoothQuantOptions, VerificationOptions

    # Metrics and latency are measured here on the evaluation data (the compile's own verification off).
    verification = VerificationOptions(enabled=False)
    if config == "fold_upstream":
        return CompileOptions(smooth_quant=SmoothQuantOptions(fold_upstream=True), verification=verification, show_progress=False)
    if config == "no_sibling_fusion":
        return CompileOptions(scheme=SchemeOptions(fuse_sibling_matmuls=False), verification=verification, show_progress=False)
    return CompileOptions(verification=verification, show_progress=False)


_COUNTS = (
    ("smoothed", re.compile(r"^smooth_quant: '")),
    ("fused_matmuls", re.compile(r"^(\d+) MatMuls sharing a dynamically quantized input")),
    ("fused_groups", re.compile(r"MatMuls sharing a dynamically quantized input run as (\d+)")),
    ("quantized_once", re.compile(r"; (\d+) of the \d+ quantize their output once before the Split")),
    ("scales_folded", re.compile(r"^fold_matmul_scale: (\d+) constant")),
    ("muls_folded_upstream", re.compile(r"^fold_smoothing_mul: (\d+) SmoothQuant")),
)


def pass_summary(report) -> dict:
    """Counts of what the transformer passes did, and every decline note, from the report's pass records."""
    counts = {key: 0 for key, _ in _COUNTS}
    declined, modified = [], {}
    for record in report.passes:
        modified[record.name] = modified.get(record.name, False) or record.modified
        for note in record.notes:
            for key, pattern in _COUNTS:
                match = pattern.search(note)
                if match:
                    counts[key] += int(match.group(1)) if match.groups() else 1
            if "declined" in note or "keep their own product" in note:
                declined.append(note)
    interesting = ("smooth_quant", "fold_smoothing_mul", "quantize_dynamic_matmul", "fuse_sibling_matmuls", "fold_matmul_scale")
    return {**counts, "modified": {k: v for k, v in modified.items() if k in interesting}, "declined": declined}


def run_outputs(model: onnx.ModelProto, feeds: list[Feed]) -> Outputs:
    from qcompile.verify.sessions import make_session

    session = make_session(model, "cpu", intra_op_threads=1)
    return [session.run(None, feed)[0] for feed in feeds]


def sqnr_db(reference: Outputs, test: Outputs) -> float:
    ref = np.concatenate([r.ravel() for r in reference]).astype(np.float64)
    err = ref - np.concatenate([t.ravel() for t in test]).astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum(err**2), 1e-30)))


def measure_arch(arch: Arch, exporter: str, configs: tuple[str, ...], latency_s: float) -> dict:
    from qcompile import compile_model
    from qcompile.verify.latency import measure_latency

    result: dict = {"model": arch.name, "exporter": exporter}
    try:
        start = time.perf_counter()
        float_model = export(arch, exporter)
        result["export_seconds"] = round(time.perf_counter() - start, 2)
    except Exception as exc:  # an exporter that cannot take this module is a finding, not a crash
        result["error"] = f"export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        return result
    result["opset"] = next(o.version for o in float_model.opset_import if o.domain in ("", "ai.onnx"))
    evaluation = arch.evaluation
    first_dim = float_model.graph.input[0].type.tensor_type.shape.dim[0]
    if first_dim.HasField("dim_value"):
        # The exporter fixed the batch size (the dynamo exporter specializes nn.MultiheadAttention's
        # batch to the example's): evaluate one sample at a time.
        result["note"] = f"exported with a fixed batch of {first_dim.dim_value}; evaluated one sample at a time"
        evaluation = [{k: v[i : i + 1] for k, v in feed.items()} for feed in evaluation for i in range(len(next(iter(feed.values()))))]
    reference = run_outputs(float_model, evaluation)
    result["float"] = arch.metric(reference, reference)
    models, rows = {"float": float_model}, {}
    for config in configs:
        row: dict = {}
        try:
            start = time.perf_counter()
            compiled = compile_model(float_model, arch.calibration, options_for(config))
            row["compile_seconds"] = round(time.perf_counter() - start, 2)
        except Exception as exc:
            row["error"] = f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            rows[config] = row
            continue
        outputs = run_outputs(compiled.model, evaluation)
        row["metrics"] = {**arch.metric(reference, outputs), "sqnr_db": round(sqnr_db(reference, outputs), 2)}
        row["passes"] = pass_summary(compiled.report)
        fusion = compiled.report.fusion or {}
        row["fusion"] = {"fused": fusion.get("fused"), "summary": fusion.get("summary")}
        models[config] = compiled.model
        rows[config] = row
    if latency_s > 0 and len(models) > 1:
        timings = measure_latency(models, arch.example, threads=1, runs=10_000, time_budget_s=latency_s)
        result["float_ms"] = round(timings["float"].median_ms, 4)
        for config in rows:
            if config in timings:
                rows[config]["latency_ms"] = round(timings[config].median_ms, 4)
                rows[config]["speedup"] = round(timings["float"].median_ms / timings[config].median_ms, 3)
    result["configs"] = rows
    return result


def table(results: list[dict]) -> str:
    lines = ["| model | export | config | metric (float) | agree | SQNR dB | smoothed | fused | scales | upstream | fused check | ms float → int8 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        if "error" in res:
            lines.append(f"| {res['model']} | {res['exporter']} | — | {res['error']} |" + " |" * 8)
            continue
        for config, row in res["configs"].items():
            if "error" in row:
                lines.append(f"| {res['model']} | {res['exporter']} | {config} | {row['error']} |" + " |" * 8)
                continue
            m, p = row["metrics"], row["passes"]
            fused = f"{p['fused_matmuls']}→{p['fused_groups']} ({p['quantized_once']} Q once)" if p["fused_groups"] else "0"
            ms = f"{res.get('float_ms', 0):.3f} → {row.get('latency_ms', 0):.3f}" if "latency_ms" in row else "—"
            lines.append(
                f"| {res['model']} | {res['exporter']} (opset {res['opset']}) | {config} | "
                f"{m['accuracy']:.4f} ({res['float']['accuracy']:.4f}) | {m['agreement']:.4f} | {m['sqnr_db']:.2f} | "
                f"{p['smoothed']} | {fused} | {p['scales_folded']} | {p['muls_folded_upstream']} | "
                f"{'yes' if row['fusion']['fused'] else 'NO'} | {ms} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON results (write under /tmp, not into the repo)")
    parser.add_argument("--models", nargs="+", choices=sorted(ARCHS), default=list(ARCHS))
    parser.add_argument("--exporters", nargs="+", choices=EXPORTERS, default=list(EXPORTERS))
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--latency-s", type=float, default=3.0, help="seconds of interleaved timing per model (0: none)")
    parser.add_argument("--quick", action="store_true", help="shorter training and less data (smoke test)")
    args = parser.parse_args(argv)
    results = []
    for name in args.models:
        arch = ARCHS[name](args.quick)
        for exporter in args.exporters:
            print(f"{name} / {exporter} ...", file=sys.stderr, flush=True)
            res = measure_arch(arch, exporter, tuple(args.configs), args.latency_s)
            res.update(description=arch.description, data=arch.data)
            results.append(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": args.quick, "results": results}, indent=1))
    print(table(results))
    for res in results:
        for config, row in res.get("configs", {}).items():
            for note in row.get("passes", {}).get("declined", []):
                print(f"- {res['model']}/{res['exporter']}/{config}: {note[:400]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
