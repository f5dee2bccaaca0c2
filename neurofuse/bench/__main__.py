"""``python -m neurofuse.bench SUITE ...``: the same command as ``neurofuse bench`` (and the
same error handling: a user error is one line on stderr and exit code 2)."""

import typer

from neurofuse.cli._bench import bench
from neurofuse.cli._errors import NeurofuseCommand


def main(argv: list[str] | None = None) -> None:
    app = typer.Typer(add_completion=False)
    app.command(cls=NeurofuseCommand)(bench)
    app(argv, standalone_mode=True)


if __name__ == "__main__":
    main()
