"""Flower app components for ``flwr run``: a real deployment of the simulated federation.

``examples/federated/pyproject.toml`` names them::

    [tool.flwr.app.components]
    serverapp = "neurofuse.federated.app:server"
    clientapp = "neurofuse.federated.app:client"

The server reads :class:`FederationConfig` from the run config (``[tool.flwr.app.config]``,
overridable with ``flwr run --run-config``) and runs :func:`neurofuse.federated.server.serve`,
exactly as ``neurofuse federate`` does in its simulation; with an ``out`` key it writes the same
``results.json``, ``report.md``, ``accuracy.png`` and global model on the server machine. Each
SuperNode is started with its ``partition-id`` and ``num-partitions`` (a part of the dataset)
or a ``data-path`` (its own ``.npz``/``.pt`` file); see the README.
"""

from __future__ import annotations

import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from neurofuse.federated.client import app as client
from neurofuse.federated.config import FederationConfig

server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    from pathlib import Path

    from neurofuse.federated.report import write_outputs
    from neurofuse.federated.server import serve
    from neurofuse.federated.simulation import summarise

    start = time.perf_counter()
    record = dict(context.run_config)
    out = record.pop("out", "")
    config = FederationConfig.from_record(record)
    outcome = serve(grid, config)
    if out:
        write_outputs(summarise(config, outcome, time.perf_counter() - start), Path(str(out)))


__all__ = ["client", "server"]
