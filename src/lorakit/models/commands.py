"""``lorakit model pull`` and ``lorakit model list``.

Progress goes to stderr; stdout carries only results (the folder path, the table), so
``$(lorakit model pull smollm2-135m)`` is the folder. LorakitError propagates to the main CLI.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from . import registry

app = typer.Typer(help="Manage base models in the lorakit cache.", no_args_is_help=True)


@app.command()
def pull(
    name_or_gguf: str = typer.Argument(
        ...,
        metavar="NAME_OR_GGUF",
        help=f"A built-in alias ({', '.join(registry.ALIASES)}) or a path to a .gguf file.",
    ),
) -> None:
    """Download/convert a base model into the cache; print its local folder."""
    folder = registry.pull(name_or_gguf)
    typer.echo(str(folder))


@app.command("list")
def list_models() -> None:
    """List the models in the cache."""
    console = Console()
    models = registry.list_cached()
    if not models:
        console.print(f"no models cached under {registry.lorakit_home()}", markup=False, highlight=False)
        return
    table = Table(
        "name",
        Column("size MiB", justify="right"),
        Column("source", overflow="fold"),
        # fold, not crop: a path cut short with an ellipsis is of no use to copy.
        Column("path", overflow="fold"),
    )
    for model in models:
        # Text(): a [bracket] in a path is not rich markup.
        table.add_row(Text(model.name), f"{model.size_bytes / 2**20:.1f}", Text(model.source), Text(str(model.path)))
    console.print(table)
