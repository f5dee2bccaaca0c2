"""``python -m neurofuse`` runs the command-line interface."""

from neurofuse.cli import app

if __name__ == "__main__":
    app(prog_name="neurofuse")
