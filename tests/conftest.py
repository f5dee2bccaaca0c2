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


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
