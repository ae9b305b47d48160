"""The command line: ``qcompile compile | verify | inspect | demo``.

Errors become one line on stderr (``error: ...``, or a JSON object with ``--json``) and the exit code
of their class (see ``qcompile.errors``); no traceback unless ``QCOMPILE_DEBUG=1``. Flags map onto
option fields in exactly one function, ``_options_from_flags``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from qcompile.errors import InternalError, QcompileError, UsageError, VerificationFailedError
from qcompile.options import (
    ActivationDType,
    CalibrationMethod,
    CalibrationOptions,
    CompileOptions,
    OutputOptions,
    PrecisionOptions,
    SchemeOptions,
    Target,
    SmoothQuantOptions,
    VerificationOptions,
    WeightGranularity,
    WeightMethod,
    WeightRounding,
)

# Flag defaults come from the dataclass, so a default lives in one place (options.py).
_CALIBRATION_DEFAULTS = CalibrationOptions()
_SMOOTH_QUANT_DEFAULTS = SmoothQuantOptions()


def _fail(error: QcompileError, as_json: bool) -> None:
    _fail_line(error.message, type(error).__name__, error.exit_code, as_json)


def _fail_line(message: str, kind: str, exit_code: int, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"error": message, "kind": kind, "exit_code": exit_code}))
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(exit_code)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that it unwinds as Ctrl-C does: temporary files are
    removed and nothing is left half-written at an output path (exit code 128 + 15)."""


# Signals received during this command. CPython drops an exception raised inside some callbacks
# (an import lock's weakref callback, __del__): a Ctrl-C landing there would vanish and the compile
# would finish and write its output. The record lets ``_raise_if_interrupted`` raise it again
# before anything is written.
_received_signals: list[int] = []


def _interrupt(signum: int) -> KeyboardInterrupt:
    return _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _raise_on_signal(signum: int, frame: Any) -> None:
    _received_signals.append(signum)
    raise _interrupt(signum)


def _raise_if_interrupted() -> None:
    """Raise the interrupt of a signal whose KeyboardInterrupt Python swallowed."""
    if _received_signals:
        raise _interrupt(_received_signals[-1])


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT raise (and are recorded) while a command runs."""
    _received_signals.clear()
    try:
        # A signal the parent set to be ignored (SIGINT of a background job) stays ignored.
        watched = [s for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) is not signal.SIG_IGN]
        previous = {s: signal.signal(s, _raise_on_signal) for s in watched}
    except ValueError:  # not the main thread (an embedding program): leave the signals alone
        yield
        return
    previous_hook = sys.unraisablehook

    def quiet_swallowed_interrupt(unraisable: Any) -> None:
        # The swallowed interrupt is raised again later (``_raise_if_interrupted``); CPython's
        # "Exception ignored in ..." traceback would break the one-line error.
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous_hook(unraisable)

    sys.unraisablehook = quiet_swallowed_interrupt
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Group(click.Group):
    """Turns qcompile errors (and unexpected ones) into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        tokens = list(getattr(ctx, "_protected_args", [])) + list(ctx.args)
        as_json = "--json" in tokens
        try:
            with _sigterm_as_interrupt():
                return super().invoke(ctx)
        except QcompileError as error:
            _fail(error, as_json)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt as interrupt:  # Ctrl-C (130) or SIGTERM (143); nothing is left half-written
            if isinstance(interrupt, _Terminated):
                _fail_line("terminated (SIGTERM)", "Terminated", 128 + signal.SIGTERM, as_json)
            _fail_line("interrupted", "Interrupted", 128 + signal.SIGINT, as_json)
        except Exception as exc:  # a bug: one line unless debugging
            if os.environ.get("QCOMPILE_DEBUG"):
                raise
            _fail(InternalError(f"internal error ({type(exc).__name__}): {exc}"), as_json)


@click.group(cls=_Group)
@click.version_option(package_name="qcompile")
def main() -> None:
    """qcompile: ahead-of-time int8 quantization for ONNX models."""


def _options_from_flags(flags: dict[str, Any]) -> CompileOptions:
    """The one mapping from CLI flags to option fields."""
    return CompileOptions(
        target=flags["target"],
        scheme=SchemeOptions(
            activation_dtype=flags["activation_dtype"],
            weight_granularity=flags["weight_granularity"],
            keep_float=tuple(flags["keep_float"]),
            dynamic_matmul=flags["dynamic_matmul"],
            fuse_sibling_matmuls=flags["fuse_sibling_matmuls"],
            quantize_activation_matmuls=not flags["no_quantize_activation_matmuls"],
        ),
        calibration=CalibrationOptions(
            method=flags["calibration_method"],
            percentile=flags["percentile"],
            weight_method=flags["weight_method"],
            cache=flags["calibration_cache"],
            max_samples=flags["calibration_max_samples"],
            random_samples=flags["random_samples"],
            seed=flags["seed"],
            bias_correction_batches=flags["bias_correction_batches"],
            equalize_cross_layer=flags["equalize_cross_layer"],
            weight_rounding=flags["weight_rounding"],
        ),
        smooth_quant=SmoothQuantOptions(
            enabled=not flags["no_smooth_quant"],
            alphas=_numbers(flags["smooth_quant_alphas"], "--smooth-quant-alphas"),
            min_gain=flags["smooth_quant_min_gain"],
            rows=flags["smooth_quant_rows"],
            fold_upstream=flags["smooth_quant_fold_upstream"],
        ),
        verification=VerificationOptions(
            enabled=not flags["no_verify"],
            min_sqnr=flags["min_sqnr"],
            per_layer=flags["per_layer"],
            strict_fusion=flags["strict_fusion"],
            latency=not flags["no_latency"],
        ),
        output=OutputOptions(
            max_opset=flags["max_opset"],
            allow_contrib_ops=not flags["no_contrib_ops"],
            keep_node_metadata=flags["keep_node_metadata"],
        ),
        precision=PrecisionOptions(
            precision=tuple(flags["precision"]), budget=flags["budget"], recipe=flags["recipe"]
        ),
        dump_ir_after=tuple(flags["dump_ir_after"]),
        show_progress=not flags["quiet"],
    )


def _numbers(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def _choice(enum_cls) -> click.Choice:
    return click.Choice([e.value for e in enum_cls])


@main.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), required=True, help="Output .onnx path.")
@click.option("--calib", "--calibration", "calibration", required=True,
              help="Calibration data: a folder of .npz files, a .npz/.npy file, or 'random'.")
@click.option("--verify-data", type=click.Path(path_type=Path), default=None,
              help="Verification data (same formats); default: a held-out part of the calibration data.")
@click.option("--target", type=_choice(Target), default=Target.CPU.value, show_default=True,
              help="What to compile for: cpu (onnxruntime CPU, int8), cuda (onnxruntime CUDA, fp16), "
                   "tensorrt (explicit-quantization int8 Q/DQ).")
@click.option("--activation-dtype", type=_choice(ActivationDType), default=ActivationDType.UINT8.value, show_default=True)
@click.option("--weight-granularity", type=_choice(WeightGranularity), default=WeightGranularity.PER_CHANNEL.value, show_default=True)
@click.option("--keep-float", multiple=True, help="Node name, name pattern (fnmatch) or op type to keep in float. Repeatable.")
@click.option("--dynamic-matmul/--no-dynamic-matmul", default=True, show_default=True,
              help="MatMuls reading a float op's output quantize it at run time (DynamicQuantizeLinear).")
@click.option("--fuse-sibling-matmuls/--no-fuse-sibling-matmuls", default=True, show_default=True,
              help="Dynamically quantized MatMuls sharing an input run as one MatMul on concatenated weights + Split.")
@click.option("--no-quantize-activation-matmuls", is_flag=True,
              help="Keep MatMuls of two activations (attention's Q·Kᵀ, softmax·V) float.")
@click.option("--precision", multiple=True, metavar="PATTERN=PRECISION",
              help="Per-layer precision (fp32|int8|int4|fp16|int16) by node name, fnmatch pattern or op type. Repeatable.")
@click.option("--budget", default=None, metavar="METRIC>=VALUE",
              help="Search the cheapest per-layer precisions meeting this: cosine>=0.999, sqnr>=35, top1-drop<=0.5. "
                   "Writes OUTPUT.recipe.json and OUTPUT.pareto.html.")
@click.option("--recipe", type=click.Path(path_type=Path), default=None,
              help="Replay a recipe JSON from a search: no search, no calibration, the same model bytes.")
@click.option("--calibration-method", type=_choice(CalibrationMethod), default=_CALIBRATION_DEFAULTS.method.value,
              show_default=True, help="How activation ranges are chosen from calibration (README: Calibration methods).")
@click.option("--percentile", type=float, default=_CALIBRATION_DEFAULTS.percentile, show_default=True,
              help="With --calibration-method percentile: the percentile of each tail kept unclipped.")
@click.option("--weight-method", type=_choice(WeightMethod), default=_CALIBRATION_DEFAULTS.weight_method.value,
              show_default=True, help="How weight ranges are chosen: max |w| or the MSE-optimal clipping.")
@click.option("--calibration-cache", type=click.Path(path_type=Path), default=None,
              help="JSON file of calibrated ranges and SmoothQuant choices: used if made for this model/data/settings, written if absent.")
@click.option("--calibration-max-samples", type=int, default=None, help="Use at most this many calibration batches.")
@click.option("--bias-correction-batches", type=int, default=_CALIBRATION_DEFAULTS.bias_correction_batches, show_default=True,
              help="Correct each layer's int32 bias for its mean output error, measured on this many calibration batches (0: off).")
@click.option("--equalize-cross-layer/--no-equalize-cross-layer", default=_CALIBRATION_DEFAULTS.equalize_cross_layer,
              show_default=True, help="Equalize the weight ranges of Conv→Relu→Conv (and Gemm) chains before calibration.")
@click.option("--weight-rounding", type=_choice(WeightRounding), default=_CALIBRATION_DEFAULTS.weight_rounding.value,
              show_default=True, help="Round weights to nearest, or up/down to minimize each layer's output error (slower).")
@click.option("--no-smooth-quant", is_flag=True, help="Do not move activation outlier channels into MatMul/Gemm weights.")
@click.option("--smooth-quant-alphas", default=",".join(f"{a:g}" for a in _SMOOTH_QUANT_DEFAULTS.alphas), show_default=True,
              help="SmoothQuant: comma-separated migration strengths α tried per MatMul group.")
@click.option("--smooth-quant-min-gain", type=float, default=_SMOOTH_QUANT_DEFAULTS.min_gain, show_default=True,
              help="SmoothQuant: smooth a group only when its simulated output error drops by this fraction.")
@click.option("--smooth-quant-rows", type=int, default=_SMOOTH_QUANT_DEFAULTS.rows, show_default=True,
              help="SmoothQuant: calibration rows sampled per tensor to choose α.")
@click.option("--smooth-quant-fold-upstream", is_flag=True,
              help="SmoothQuant: fold a remaining smoothing Mul into the weight that makes its channels (the attention context into V).")
@click.option("--random-samples", type=int, default=32, show_default=True, help="Samples drawn with --calib random.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--min-sqnr", type=float, default=None, help="Fail (exit 5) when an output's SQNR in dB is below this.")
@click.option("--per-layer", is_flag=True, help="Report SQNR of every quantized tensor.")
@click.option("--no-verify", is_flag=True, help="Skip verification.")
@click.option("--strict-fusion", is_flag=True, help="Fail (exit 5) when onnxruntime leaves a quantized op unfused.")
@click.option("--no-latency", is_flag=True, help="Skip timing float vs compiled for the report.")
@click.option("--max-opset", type=int, default=None, help="Highest opset the output may use.")
@click.option("--no-contrib-ops", is_flag=True, help="The output may use only the default ONNX domain.")
@click.option("--keep-node-metadata", is_flag=True, help="Keep the exporter's per-node metadata and doc strings.")
@click.option("--dump-ir-after", multiple=True, help="Print the IR after this pass ('all' for every pass).")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars or report on stdout.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (or the error) as JSON.")
def compile_command(model: Path, output: Path, calibration: str, verify_data: Path | None, force: bool, as_json: bool, **flags) -> None:
    """Quantize MODEL to an int8 QDQ model at OUTPUT, verified against the float model."""
    from qcompile.api import compile_model, report_path
    from qcompile.graph.io import write_bytes_atomic

    if output.exists() and not force:
        raise UsageError(f"output {output} exists; pass --force to overwrite it")
    if output.resolve() == model.resolve():
        raise UsageError("the output path is the input model; choose another path")
    options = _options_from_flags(flags)
    result = compile_model(model, calibration, options, verify_data=verify_data)
    _raise_if_interrupted()  # a Ctrl-C Python swallowed mid-compile still means: write nothing
    if not result.verification_passed:
        # The gate failed: the report says why; no model is written.
        result.report.output_path = None
        write_bytes_atomic(report_path(output), result.report.to_json_text().encode())
        _print_report(result.report, as_json, options.show_progress)
        raise VerificationFailedError(f"{result.failure} (report: {report_path(output)})")
    result.save(output, force=force)
    _print_report(result.report, as_json, options.show_progress)
    if not as_json and options.show_progress:
        click.echo(f"\nwrote {output} and {report_path(output)}")


def _print_report(report, as_json: bool, verbose: bool) -> None:
    if as_json:
        click.echo(report.to_json_text())
    elif verbose:
        click.echo(report.render_text())


@main.command("verify")
@click.argument("float_model", type=click.Path(path_type=Path))
@click.argument("quant_model", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="Verification data: a folder of .npz files or a .npz/.npy file.")
@click.option("--min-sqnr", type=float, default=None, help="Exit 5 when an output's SQNR in dB is below this.")
@click.option("--per-layer", is_flag=True, help="Also report SQNR of every tensor both models have.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime execution provider both models run on (cuda: checked to really run there).")
@click.option("--json", "as_json", is_flag=True)
def verify_command(
    float_model: Path, quant_model: Path, data: str, min_sqnr: float | None, per_layer: bool, provider: str, as_json: bool
) -> None:
    """Compare QUANT_MODEL with FLOAT_MODEL on DATA (onnxruntime)."""
    from qcompile.api import verify
    from qcompile.report.text import render_verification

    verdict = verify(float_model, quant_model, data, min_sqnr=min_sqnr, per_layer=per_layer, provider=provider)
    click.echo(json.dumps(verdict, indent=2) if as_json else render_verification(verdict))
    if not verdict["passed"]:
        raise VerificationFailedError(verdict["verdict"])


@main.command("analyze")
@click.argument("float_model", type=click.Path(path_type=Path))
@click.argument("quant_model", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="Data: a folder of .npz files or a .npz/.npy file.")
@click.option("--drop-db", type=float, default=6.0, show_default=True, help="A fall this large marks the first sharp drop.")
@click.option("--html", "html_path", type=click.Path(path_type=Path), default=None, help="Also write an HTML page with the SQNR plot.")
@click.option("--json", "as_json", is_flag=True)
def analyze_command(float_model: Path, quant_model: Path, data: str, drop_db: float, html_path: Path | None, as_json: bool) -> None:
    """Per-layer SQNR, clipping and weight/bias error of QUANT_MODEL against FLOAT_MODEL."""
    from qcompile.api import analyze
    from qcompile.graph.io import write_bytes_atomic

    result = analyze(float_model, quant_model, data, drop_db=drop_db)
    if html_path is not None:
        write_bytes_atomic(html_path, result.render_html().encode())
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else result.render_text())


@main.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def inspect_command(model: Path, as_json: bool) -> None:
    """Ops, parameters, size, opset, and what would be quantized."""
    from qcompile.inspect import inspect_model

    info = inspect_model(model)
    click.echo(json.dumps(info.to_json(), indent=2) if as_json else info.render_text())


@main.command("demo")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Folder for the models and report (default: a new temporary folder).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True)
def demo_command(out_dir: Path | None, seed: int, quiet: bool) -> None:
    """Train a small conv net on scikit-learn's digits, export, compile, verify, report."""
    from qcompile.demo import run_demo

    outcome = run_demo(out_dir, seed=seed, show_progress=not quiet)
    click.echo(outcome.render_text())


if __name__ == "__main__":  # python -m qcompile.cli
    main()
