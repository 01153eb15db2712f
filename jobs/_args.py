"""The command-line shape every job shares: `--config FILE` plus `a.b=value` overrides."""

from __future__ import annotations

import argparse
import sys

from llmopt.config import ConfigError, RunConfig, load_config


def parse_job_args(
    description: str, argv: list[str] | None = None, **extra: dict
) -> tuple[RunConfig, argparse.Namespace]:
    """Parse `--config FILE [a.b=value ...]` plus job-specific options and load the config.

    Args:
        description: The job's help text.
        argv: Arguments (default: sys.argv[1:]).
        **extra: Extra options, name -> `add_argument` keyword arguments.

    Returns:
        The validated config and the parsed namespace. A config error exits with status 2 after
        printing every problem.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", "-c", default=None, help="Run config YAML (defaults when omitted).")
    parser.add_argument("overrides", nargs="*", help="Config overrides a.b=value (values parsed as YAML).")
    for name, options in extra.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, **options)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return config, args
