"""Job entry points run the `llmopt` command of the same name: one declaration of each option, one check.

`python -m jobs.finetune ARGS` is `llmopt finetune ARGS`, and so on; the jobs exist because `ray job submit`
users (and clusters without the console script on PATH) run modules.
"""

from __future__ import annotations

import sys
from typing import Any


def run_command(name: str, argv: list[str] | None, prog: str, *extra: str) -> Any:
    """Run `llmopt <name> [extra] argv` and return what the command returns.

    Args:
        name: The `llmopt` command.
        argv: Its arguments (default: sys.argv[1:]).
        prog: How usage and errors name the program (e.g. `python -m jobs.finetune`).
        *extra: Arguments put before `argv` (e.g. `--ray`).

    Raises:
        SystemExit: With the command's exit status when it fails (2 for a bad config or option, as the
            command line exits).
    """
    import click
    import typer

    from llmopt.cli import app

    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    args = [*extra, *(sys.argv[1:] if argv is None else argv)]
    try:
        result = command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as exc:
        if exc.exit_code:
            raise SystemExit(exc.exit_code) from None
        return None
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.Abort:
        raise SystemExit(1) from None
    if isinstance(result, int) and not isinstance(result, bool) and result:
        raise SystemExit(result)  # click returns a typer.Exit's status when standalone_mode is off
    return result
