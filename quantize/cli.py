"""The `quantize` command line: one Click group, a thin layer over library functions.

Exit codes: 0 done, 1 runtime failure, 2 bad input or usage. Errors are one line on stderr; the
traceback only with --debug.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from . import __version__, log
from .allocator import reexec_with_jemalloc
from .errors import EXIT_INPUT, EXIT_RUNTIME, QuantizeError

# name -> module under quantize.commands exposing `command`; None: not implemented yet (stub).
COMMANDS: dict[str, str | None] = {
    "merge": "merge",
    "sample": "sample",
    "gptq": "gptq",
    "rtn": "gptq",
    "awq": "awq",
    "exl2": "exl2",
    "fp8": "fp8",
    "gguf": "gguf",
    "eval": "eval",
    "plan": "plan",
    "run": "run",
    "inspect": "inspect",
    "verify": "inspect",
    "check": "check",
    "sweep": "sweep",
}


class LazyGroup(click.Group):
    """Imports a subcommand's module only when it is invoked (keeps --help and startup fast)."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = COMMANDS[name]
        if module is None:
            from .commands.stubs import make_stub

            return make_stub(name)
        mod = importlib.import_module(f"quantize.commands.{module}")
        return getattr(mod, f"{name}_command")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantize")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option("--json-logs", is_flag=True, help="One JSON object per line on stderr, for batch jobs.")
@click.pass_context
def cli(ctx, debug: bool, json_logs: bool):
    """Turn fine-tuned LLM checkpoints into deployable quantized models.

    Stages: merge -> sample -> gptq | awq | exl2 | rtn | fp8 | gguf -> eval; plan answers memory questions.
    Every stage writes manifest.json; `quantize verify DIR` re-hashes an output.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    log.configure(json_logs)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    process_entry = argv is None
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("QUANTIZE_DEBUG") == "1"
    try:
        if process_entry:  # the command itself (not a call from Python): jemalloc when installed
            reexec_with_jemalloc()
        cli.main(args=argv, prog_name="quantize", standalone_mode=False)
        return 0
    except QuantizeError as e:
        if debug:
            raise
        log.event("error", f"error: {_one_line(e)}", code=e.exit_code)
        return e.exit_code
    except click.exceptions.Exit as e:  # --help, --version
        return e.exit_code
    except click.exceptions.Abort:  # click's form of KeyboardInterrupt
        sys.stderr.write("interrupted; rerun the same command to carry on\n")
        return 130
    except click.ClickException as e:  # usage errors
        if debug:
            raise
        msg = e.format_message()
        ctx = getattr(e, "ctx", None)
        where = f" ({ctx.command_path} --help for usage)" if ctx is not None else ""
        log.event("error", f"error: {_one_line(msg)}{where}", code=EXIT_INPUT)
        return EXIT_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; rerun the same command to carry on\n")
        return 130
    except MemoryError:
        log.event("error", "error: out of host memory; use a smaller --batch or --offload-activations", code=1)
        return EXIT_RUNTIME
    except Exception as e:  # noqa: BLE001 - the contract: one line, no traceback unless --debug
        if debug:
            raise
        log.event("error", f"error: {type(e).__name__}: {_one_line(e)} (re-run with --debug for the traceback)", code=1)
        return EXIT_RUNTIME


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
