"""Compiler passes on onnx-ir, one per module. The pipeline (``qcompile.pipeline``) orders them."""

from qcompile.passes.annotate import AnnotatePass
from qcompile.passes.annotate_ranges import AnnotateRangesPass
from qcompile.passes.assign_qparams import AssignQParamsPass
from qcompile.passes.clear_intermediate_shapes import ClearIntermediateShapesPass
from qcompile.passes.convert_fp16 import ConvertFloat16Pass
from qcompile.passes.correct_bias import CorrectBiasPass
from qcompile.passes.decompose_batchnorm import DecomposeBatchNormPass
from qcompile.passes.derive_bias import DeriveBiasPass
from qcompile.passes.equalize_cross_layer import EqualizeCrossLayerPass
from qcompile.passes.eliminate_identity import EliminateIdentityPass
from qcompile.passes.fold_batchnorm import FoldBatchNormPass
from qcompile.passes.fold_matmul_scale import FoldMatMulScalePass
from qcompile.passes.fold_smoothing_mul import FoldSmoothingMulPass
from qcompile.passes.fuse_sibling_matmuls import FuseSiblingMatMulsPass
from qcompile.passes.insert_observers import InsertObserversPass
from qcompile.passes.place_qdq import PlaceQDQPass
from qcompile.passes.quantize_dynamic_matmul import QuantizeDynamicMatMulPass
from qcompile.passes.quantize_int4_weights import QuantizeInt4WeightsPass
from qcompile.passes.reduce_mean_to_pool import ReduceMeanToGlobalPoolPass
from qcompile.passes.round_weights import RoundWeightsPass
from qcompile.passes.remove_dropout import RemoveDropoutPass
from qcompile.passes.smooth_quant import SmoothQuantPass

__all__ = [
    "AnnotatePass",
    "AnnotateRangesPass",
    "AssignQParamsPass",
    "ClearIntermediateShapesPass",
    "ConvertFloat16Pass",
    "CorrectBiasPass",
    "DecomposeBatchNormPass",
    "DeriveBiasPass",
    "EliminateIdentityPass",
    "EqualizeCrossLayerPass",
    "FoldBatchNormPass",
    "FoldMatMulScalePass",
    "FoldSmoothingMulPass",
    "FuseSiblingMatMulsPass",
    "InsertObserversPass",
    "PlaceQDQPass",
    "QuantizeDynamicMatMulPass",
    "QuantizeInt4WeightsPass",
    "ReduceMeanToGlobalPoolPass",
    "RemoveDropoutPass",
    "RoundWeightsPass",
    "SmoothQuantPass",
]
