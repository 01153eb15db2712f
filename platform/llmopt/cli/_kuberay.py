"""`llmopt kuberay ...`: the KubeRay tooling, found through its `llmopt.commands` entry point.

`kuberay` is a package of the same distribution built on the library, which never imports it (an
import-linter contract): it plugs its command line in through the `llmopt.commands` entry-point group, so
an installed `llmopt kuberay` works from any directory.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import typer

from llmopt.cli._app import _fail, app


def _plugin(name: str):
    """The command-line entry (`main(args, prog_name)`) a package registered under `llmopt.commands`."""
    found = list(entry_points(group="llmopt.commands", name=name))
    if not found:
        raise _fail(
            f"`llmopt {name}` is not installed here (no `llmopt.commands` entry point {name!r}); reinstall "
            "llmopt from the repository (`make install`, or `pip install -e .`)",
            2,
        )
    return found[0].load()


@app.command(
    "kuberay",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def kuberay_command(ctx: typer.Context) -> None:
    """KubeRay: render, validate, apply, wait for and delete RayJob / RayService / RayCluster."""
    _plugin("kuberay")(list(ctx.args), prog_name="llmopt kuberay")
