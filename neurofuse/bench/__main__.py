"""``python -m neurofuse.bench SUITE ...``: the same command as ``neurofuse bench``."""

import typer

from neurofuse.cli._bench import bench


def main(argv: list[str] | None = None) -> None:
    app = typer.Typer(add_completion=False)
    app.command()(bench)
    app(argv, standalone_mode=True)


if __name__ == "__main__":
    main()
