"""`llmopt` command line: thin commands that parse, load the config and call the library.

One module per command group; importing this package registers every command on `app`, in the order
`llmopt --help` lists them.
"""

# isort: off
from llmopt.cli._app import app
from llmopt.cli import _tune, _train, _serve, _monitor, _kuberay, _config, _data  # noqa: F401  (they register commands)
# isort: on

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()
