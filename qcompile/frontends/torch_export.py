"""Exporting a torch module to ONNX for qcompile, with BatchNormalization kept when asked.

torch is imported inside the functions that need it, never when this module is imported.

Which exporter (measured with torch 2.13.0+cpu, onnxscript 0.7.2, onnx 1.23)
=============================================================================

``torch.onnx.export(..., dynamo=True)`` (the default since torch 2.9) captures the module with
``torch.export`` and translates the captured program with onnxscript's torchlib. Its final
``optimize`` step (on by default) runs ``onnxscript.optimizer.optimize_ir``: constant folding, then
the rewriter's default rules, which include ``fuse_batchnorm`` (BatchNormalization folded into the
preceding Conv, ConvTranspose or Gemm), ``dropout_inference``/``no_op`` removals and
Pad-into-Conv fusion, then ``onnx_fusions.fuse``. A Conv-BN-ReLU net exported with the defaults
therefore has no BatchNormalization node. With ``optimize=False`` BatchNormalization is kept, but
the graph is raw: ReduceMean axes computed by Constant→Reshape, a zero bias materialised for
bias-free convolutions, an Identity for every ``aten.clone``, a Shape→Squeeze→Concat chain
feeding the Reshape of ``torch.flatten``.

The TorchScript exporter (``dynamo=False``) still exists in 2.13 but warns "You are using the legacy
TorchScript-based ONNX export ... The feature will be removed". In eval mode
(``training=TrainingMode.EVAL``) it fuses Conv+BatchNormalization when ``do_constant_folding=True``
(the default) and keeps BatchNormalization when ``do_constant_folding=False``. It also deduplicates
equal initializers into Identity nodes (a BatchNorm with fresh statistics came out as
``running_var = Identity(weight)``), and because it traces, a batch size that reaches Python as an
int is baked into the graph silently while ``dynamic_axes`` still labels the input dynamic.

We use the dynamo exporter with ``optimize=False`` and run our own short, visible clean-up
(``_cleanup_passes``) instead of the exporter's optimizer: constant folding, identity elimination,
removal of the all-zero optional Conv/Gemm biases and the flatten shape chain, and lifting constants
to initializers; BatchNormalization is folded into Conv/Gemm (onnxscript's rules) only when
``keep_batchnorm=False``. Reasons:

* dynamic batch is checked, not assumed: ``torch.export`` proves the batch dimension symbolic or
  fails ("You marked batch as dynamic but your code specialized it to be a constant"), which we
  turn into a UsageError. We call ``torch.export.export`` ourselves and hand the ExportedProgram to
  ``torch.onnx.export``, because ``torch.onnx.export``'s own capture retries with torch.export's
  "suggested fixes": a module doing ``x.reshape(4, -1)`` came out with its input labelled
  ``batch`` and a Reshape to (4, -1) that fails in onnxruntime at batch 5. The TorchScript tracer
  does the same silently for ``reshape(int(x.shape[0]), -1)`` (a constant Reshape shape).
* input and output names are applied to the ONNX graph as given; axis 0 of every input is named
  ``batch`` and the outputs derived from it carry the same symbol.
* it is the maintained path; the TorchScript exporter is deprecated and due for removal.

Its cost: the exporter writes opset 18 and no lower (torchlib is implemented at 18). Asking it for
17 runs a down-conversion that fails or produces an invalid model (the ONNX C++ converter leaves
``noop_with_empty_axes`` on ReduceMean-13, which the checker rejects), so ``opset`` must be >= 18.
QDQ needs 13, so this costs qcompile nothing. Exporting takes seconds (ResNet-18 about 4 s on two
cores, MobileNetV2 7 to 15 s, nearly all in torch.export and its decompositions), against a
fraction of a second for the TorchScript tracer.

Dropout
=======

Both exporters drop eval-mode Dropout: torch.export turns ``dropout(x, p, train=False)`` into
``aten.clone`` (an Identity in ONNX, removed by clean-up), and the TorchScript symbolic returns its
input. Neither writes the inference form ``Dropout(x, ratio)``: a Dropout module left in training
mode is exported as ``Dropout(x, ratio, training_mode=True)``, which onnxruntime runs as a random
mask, and putting modules in training mode changes what is traced. So no exporter path gives an
inference Dropout, and ``insert_dropout`` adds one where a model needs it (the demo does, so that
qcompile's dropout removal has something to remove), in the form ONNX exporters that keep Dropout
write: opset-13 Dropout with the ratio as an input and no ``training_mode`` (default false: the
output equals the input, ONNX Operators, Dropout-13).

Weights are inline in the returned ``onnx.ModelProto`` (no external data), which limits a model to
protobuf's 2 GB.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.errors import UsageError

if TYPE_CHECKING:
    import torch

# The lowest opset the dynamo exporter writes without a down-conversion (see the module docstring).
MIN_EXPORT_OPSET = 18
BATCH_DIM = "batch"

_TORCH_MISSING = "PyTorch is not installed: pip install torch==2.13.0 'qcompile[torch]'"


def import_torch() -> Any:
    """The torch module, or a UsageError saying how to install it."""
    try:
        import torch
    except ImportError:
        raise UsageError(_TORCH_MISSING) from None
    return torch


def export_torch(
    module: torch.nn.Module,
    example_inputs: tuple | torch.Tensor,
    *,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_batch: bool = True,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int = MIN_EXPORT_OPSET,
    keep_batchnorm: bool = True,
) -> onnx.ModelProto:
    """Export ``module`` in eval mode to an ONNX model with its weights inline.

    ``example_inputs`` are positional arguments of ``module.forward`` (one tensor or a tuple).
    With ``dynamic_batch`` axis 0 of every input is the symbol ``batch``. ``dynamic_axes`` makes
    more axes dynamic, by input name (from ``input_names``): ``{"ids": {1: "sequence"}}``; one
    symbol name used on several inputs is one dimension. With ``keep_batchnorm``
    BatchNormalization nodes stay (qcompile folds them itself); otherwise they are folded into
    the Conv or Gemm before them. The module's train/eval modes are restored afterwards.
    """
    torch = import_torch()
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    _check_arguments(module, args, input_names, output_names, opset, torch)

    axes = _dynamic_axes_by_position(args, input_names, dynamic_batch, dynamic_axes, torch)
    dynamic_shapes = None
    if any(axes):
        dims = {name: torch.export.Dim(name) for per_arg in axes for name in per_arg.values()}
        dynamic_shapes = tuple({axis: dims[name] for axis, name in per_arg.items()} or None for per_arg in axes)
        # torch.export specializes every size 0 or 1 to a constant, so a batch of one example cannot
        # be captured as a dynamic batch; two copies of it can.
        if dynamic_batch:
            args = tuple(torch.cat([a, a]) if _is_batched(a, torch) and a.shape[0] == 1 else a for a in args)

    with _eval_mode(module), _quiet_exporter():
        # Capture first, on our own, so that a failure is torch.export's own message rather than
        # the ONNX exporter's retry with strict=True and its report.
        try:
            program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:  # torch.export raises many unrelated types; all mean "cannot capture"
            raise UsageError(_capture_failure(module, exc, dynamic_batch)) from None
        try:
            onnx_program = torch.onnx.export(
                program,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                dynamo=True,
                optimize=False,  # its optimizer folds BatchNormalization; we clean up below
                verbose=False,
            )
        except Exception as exc:  # translation errors surface as several torch.onnx error types
            raise UsageError(f"torch.onnx could not translate {type(module).__name__}: {_first_lines(exc)}") from None

    model: ir.Model = onnx_program.model
    _name_dynamic_axes(model, axes)
    ir.passes.Sequential(*_cleanup_passes(keep_batchnorm=keep_batchnorm))(model)
    proto = ir.to_proto(model)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise UsageError(f"the exported model of {type(module).__name__} is not valid ONNX: {_first_lines(exc)}") from None
    return proto


def _cleanup_passes(*, keep_batchnorm: bool) -> list[ir.passes.PassBase]:
    """The clean-up after ``torch.onnx.export(optimize=False)``, in order.

    Constant folding comes first: the rewrite rules match constant shapes and zero biases only once
    the Constant→Reshape chains are folded. Identity elimination removes the ``aten.clone``
    Identities (eval-mode Dropout among them). Lifting constants last gives every weight-like tensor
    the initializer form the compiler's passes read.
    """
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import constant_folding
    from onnxscript.rewriter import RewritePass
    from onnxscript.rewriter.rules import common as rules

    rewrite_rules = [
        rules.remove_optional_bias_from_conv_rule,  # the all-zero bias torchlib writes for bias=False
        rules.remove_optional_bias_from_gemm_rule,
        rules.materialize_reshape_shape_rule,  # flatten's Shape→Squeeze→Concat becomes a constant
    ]
    if not keep_batchnorm:
        rewrite_rules += [
            rules.fuse_batchnorm_into_conv_rule,
            rules.fuse_batchnorm_into_conv_transpose_rule,
            rules.fuse_batchnorm_into_gemm_rule,
        ]
    return [
        constant_folding.FoldConstantsPass(
            shape_inference=True,
            input_size_limit=constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
            output_size_limit=constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
        ),
        common.IdentityEliminationPass(),
        RewritePass(rewrite_rules),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.RemoveUnusedOpsetsPass(),
    ]


def insert_dropout(model: onnx.ModelProto, after_output: str, ratio: float = 0.5) -> onnx.ModelProto:
    """A copy of ``model`` with an inference Dropout on the tensor ``after_output``.

    The node is ``Dropout(x, ratio)`` in its opset-13 form: ratio as an input, no
    ``training_mode`` input, so training_mode is false and the output equals ``x`` (ONNX
    Operators, Dropout-13). Every consumer of ``after_output``, a graph output included, reads the
    Dropout's output instead; the input model is not modified.
    """
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"dropout ratio must be in [0, 1), got {ratio}")
    opset = next((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise UsageError(f"insert_dropout writes Dropout-13 and needs opset >= 13; the model has opset {opset}")

    ir_model = ir.from_proto(model)
    graph = ir_model.graph
    target = _find_value(graph, after_output)
    if target is None:
        raise UsageError(f"insert_dropout: no tensor named {after_output!r} in the graph")

    output_positions = [i for i, out in enumerate(graph.outputs) if out is target]
    if output_positions and target.producer() is None:
        raise UsageError(f"insert_dropout: {after_output!r} is both a graph input and a graph output")

    taken = _value_names(graph)
    ratio_value = ir.Value(name=_fresh(f"{after_output}_dropout_ratio", taken))
    ratio_value.const_value = ir.tensor(np.array(ratio, dtype=np.float32), name=ratio_value.name)
    graph.register_initializer(ratio_value)
    dropped = ir.Value(name=_fresh(f"{after_output}_dropout", taken), shape=target.shape, type=target.type)
    consumers = list(target.uses())

    node = ir.Node("", "Dropout", inputs=[target, ratio_value], outputs=[dropped], name=_fresh(f"{after_output}_Dropout", taken))
    producer = target.producer()
    if producer is not None:
        graph.insert_after(producer, node)
    elif len(graph) > 0:
        graph.insert_before(graph[0], node)  # a graph input or initializer: available from the start
    else:
        graph.append(node)

    for use in consumers:
        use.node.replace_input_with(use.idx, dropped)
    if output_positions:
        # A graph output keeps its name: the Dropout's output takes it over.
        original = target.name
        target.name = _fresh(f"{original}_before_dropout", taken)
        dropped.name = original
        for i in output_positions:
            graph.outputs[i] = dropped
    return ir.to_proto(ir_model)


# ---------------------------------------------------------------------------------------------


def _check_arguments(
    module: Any, args: tuple, input_names: Sequence[str] | None, output_names: Sequence[str] | None, opset: int, torch: Any
) -> None:
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"export_torch needs a torch.nn.Module, got {type(module).__name__}")
    if not args:
        raise UsageError("export_torch needs at least one example input")
    if opset < MIN_EXPORT_OPSET:
        raise UsageError(
            f"opset {opset} is below {MIN_EXPORT_OPSET}, the lowest opset torch's ONNX exporter writes "
            "(its down-conversion produces invalid ReduceMean nodes); use opset >= 18"
        )
    if input_names is not None and len(input_names) != len(args):
        raise UsageError(f"{len(input_names)} input names for {len(args)} example inputs")
    for names, what in ((input_names, "input"), (output_names, "output")):
        if names is not None and len(set(names)) != len(names):
            raise UsageError(f"{what} names must be distinct, got {list(names)}")


@contextlib.contextmanager
def _eval_mode(module: Any) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own mode after (they may differ)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence exporter chatter that says nothing about the user's model.

    The registry warns once per torchvision op when torchvision is absent (it is, beside this torch
    build), and pytree raises a FutureWarning from inside torch.export.
    """
    registry_logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_logger.level
    registry_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registry_logger.setLevel(level)


def _is_batched(arg: Any, torch: Any) -> bool:
    return isinstance(arg, torch.Tensor) and arg.dim() > 0


def _dynamic_axes_by_position(args, input_names, dynamic_batch, dynamic_axes, torch) -> list[dict[int, str]]:
    """For each positional argument, its dynamic axes as {axis: symbol name}."""
    axes: list[dict[int, str]] = [
        {0: BATCH_DIM} if dynamic_batch and _is_batched(a, torch) else {} for a in args
    ]
    for name, per_input in (dynamic_axes or {}).items():
        if not input_names or name not in input_names:
            raise UsageError(f"dynamic_axes names input {name!r}, which is not in input_names {input_names}")
        index = input_names.index(name)
        arg = args[index]
        for axis, symbol in per_input.items():
            if not _is_batched(arg, torch) or not -arg.dim() <= axis < arg.dim():
                raise UsageError(f"dynamic_axes: input {name!r} has no axis {axis}")
            if arg.shape[axis] < 2 and axis % arg.dim() != 0:
                # torch.export fixes sizes 0 and 1; the example must show the axis can vary.
                raise UsageError(f"dynamic_axes: the example of input {name!r} has size {arg.shape[axis]} on axis {axis}; use 2 or more")
            axes[index][axis % arg.dim()] = symbol
    return axes


def _name_dynamic_axes(model: ir.Model, axes: list[dict[int, str]]) -> None:
    """Rename torch.export's symbols (``s77``, ...) to the names asked for, everywhere.

    ``torch.onnx.export`` given an ExportedProgram no longer knows the names of the ``Dim``s.
    """
    renames: dict[str, str] = {}
    for value, per_input in zip(model.graph.inputs, axes):
        for axis, name in per_input.items():
            if value.shape is not None and axis < len(value.shape):
                dim = value.shape[axis]
                if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                    renames[dim.value] = name
    if not renames:
        return
    values = [*model.graph.inputs, *model.graph.outputs, *(v for node in model.graph.all_nodes() for v in node.outputs)]
    for value in values:
        if value.shape is None or not any(isinstance(d, ir.SymbolicDim) and d.value in renames for d in value.shape):
            continue
        value.shape = ir.Shape(
            [renames[d.value] if isinstance(d, ir.SymbolicDim) and d.value in renames else d for d in value.shape]
        )


def _first_lines(exc: BaseException, count: int = 2, limit: int = 300) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:count]) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _capture_failure(module: Any, exc: BaseException, dynamic_batch: bool) -> str:
    message = f"torch.export could not capture {type(module).__name__}: {_first_lines(exc)}"
    if dynamic_batch and "specialized" in str(exc):
        message += " (the model fixes its batch size; export with dynamic_batch=False)"
    return message


def _find_value(graph: ir.Graph, name: str) -> ir.Value | None:
    for value in graph.inputs:
        if value.name == name:
            return value
    if name in graph.initializers:
        return graph.initializers[name]
    for node in graph:
        for value in node.outputs:
            if value.name == name:
                return value
    return None


def _value_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        names.add(node.name)
        names.update(v.name for v in node.outputs)
    return {n for n in names if n}


def _fresh(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name
