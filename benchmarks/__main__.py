"""``python -m benchmarks [--out DIR] [--quick] ...``: the ``bench`` command on its own."""

from __future__ import annotations

import typer

from benchmarks.cli import bench


def main() -> None:
    app = typer.Typer(add_completion=False)
    app.command()(bench)
    app()


# The guard matters: the benchmark spawns processes, and each re-imports this module.
if __name__ == "__main__":
    main()
