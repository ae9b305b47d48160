"""The error hierarchy. Every error carries a one-line message and a process exit code.

The CLI prints ``error: <message>`` and exits with ``exit_code``; nothing below the CLI prints.
Exit codes (also in the README):

====  ===========================  ==============================================
code  class                        meaning
====  ===========================  ==============================================
2     UsageError                   bad options, an output path that exists, ...
3     InvalidModelError            missing / not ONNX / truncated / invalid model
4     InvalidDataError             calibration or verification data unusable
5     VerificationFailedError      a verification threshold was missed
70    InternalError                a bug in qcompile (please report it)
====  ===========================  ==============================================
"""

from __future__ import annotations


class QcompileError(Exception):
    """Base class: a failure with a message a user can act on."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # Keep messages to one line: the CLI prints exactly this.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class UsageError(QcompileError):
    exit_code = 2


class OutputExistsError(UsageError):
    """The output path exists and ``force`` was not given."""


class InvalidModelError(QcompileError):
    exit_code = 3


class InvalidDataError(QcompileError):
    exit_code = 4


class VerificationFailedError(QcompileError):
    exit_code = 5


class InternalError(QcompileError):
    exit_code = 70
