"""The error contract shared by every stage.

Exit codes: 0 done, 1 runtime failure, 2 bad input or usage. Library code raises these; only the CLI
turns them into one line on stderr and an exit code. Messages name the file or tensor and the fix.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_INPUT = 2


class QuantizeError(Exception):
    """Base class: a failure with a one-line, user-facing message and an exit code."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split())


class InputError(QuantizeError):
    """Bad input or usage: a file, tensor, option or config the user has to fix (exit 2)."""

    exit_code = EXIT_INPUT


class NotImplementedStage(InputError):
    """A subcommand whose issue has not landed yet."""


class RuntimeFault(QuantizeError):
    """Something went wrong while running on valid input (numerics, device, disk) (exit 1)."""

    exit_code = EXIT_RUNTIME


class IntegrityError(RuntimeFault):
    """An output no longer matches the hash its manifest recorded (exit 1)."""


class GateFailed(RuntimeFault):
    """A quality gate (e.g. --max-ppl-increase) was exceeded; the results are still written (exit 1)."""


def invalid(source: object, what: str, e: Exception) -> InputError:
    """One-line InputError for a pydantic ValidationError: ``SOURCE: invalid WHAT at LOC: MSG``.

    Unknown keys read "unknown key (typo?)"; validator messages lose pydantic's "Value error, ".
    """
    err = e.errors()[0]  # type: ignore[attr-defined]
    where = ".".join(str(x) for x in err["loc"]) or "(top level)"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (typo?)"
    return InputError(f"{source}: invalid {what} at {where}: {msg}")
