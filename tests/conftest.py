"""Shared test configuration: the suite never touches the network, and runs deterministically."""

from __future__ import annotations

import socket

import pytest
import torch


class _NetworkBlocked(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails loudly (data must ship offline)."""

    def guard(*args, **kwargs):
        raise _NetworkBlocked("network access attempted during tests")

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket.socket, "connect_ex", guard)
    monkeypatch.setattr(socket, "create_connection", guard)


# The suite's models are tiny: one thread is as fast as two for them, and it keeps timings stable
# when the two cores of the CI machine are shared.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
