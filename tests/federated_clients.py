"""A ClientApp for the simulation tests: neurofuse's client, except that partition 1 fails
(Ray's worker processes import it by name, so it lives in a module of its own)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from neurofuse.federated.client import train_client

app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    if int(context.node_config["partition-id"]) == 1:
        raise RuntimeError("disk full on client 1")
    return train_client(message, context)
