"""Federated one-shot (or multi-round) fusion on Flower.

Clients train on their own data, compute importance scores on it, and send their weights to the
server; the server aggregates them with any neurofuse method instead of averaging them. One
round is the paper's setting (one-shot fusion); several rounds start every client from the
fused model of the round before, as FedAvg starts them from the averaged one.

- :class:`FusionStrategy`: a Flower ``FedAvg`` whose ``aggregate_train`` fuses with a neurofuse
  method (``kf_linear``, ``hf_linear``, ``kf_gradient``, ``otfusion``, ``git_rebasin``,
  ``fedavg``, ``auto``, ...); clients that fail or send another architecture are left out with a
  logged reason.
- :mod:`neurofuse.federated.client`: the ``ClientApp`` (``client.app``): trains a zoo
  architecture or the user's model class on its partition (or on its own ``data-path`` file),
  ships weights, sample and class counts, importance scores and, for the client chosen to, the
  fusion set.
- :mod:`neurofuse.federated.server`: the ``ServerApp`` logic shared by the simulation and a
  real deployment.
- :func:`simulate`: the whole federation on this machine (Flower's Ray simulation runtime),
  behind ``neurofuse federate``.
- :mod:`neurofuse.federated.app`: ``server`` and ``client`` objects for Flower's own
  ``flwr run`` (SuperLink and SuperNodes on several machines); see the README.

Where the fusion set comes from (``FederationConfig.fusion_source``): ``"client"`` (the
default, the paper's setting) has client ``fusion_client`` send ``fusion_size`` samples of its
own training data with its first reply: the server sees them, so that client must accept
sharing them. ``"server"`` uses a set the server holds (in the simulation, a class-balanced
draw from the whole training split, a stand-in for a public proxy set; in a deployment, the
``fusion-data`` file named in the run config). The report says which.

Flower is an optional dependency (``pip install "neurofuse[federated]"``); only this
sub-package imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from neurofuse.federated.config import FederationConfig

if TYPE_CHECKING:
    from neurofuse.federated.simulation import FederationResult

FLOWER_HINT = 'pip install "neurofuse[federated]"  (Flower 1.41 with its simulation runtime)'


def require_flower() -> None:
    """Raise an ImportError naming the install command when Flower is missing."""
    import importlib.util

    if importlib.util.find_spec("flwr") is None:
        raise ImportError(f"neurofuse.federated needs Flower: {FLOWER_HINT}")


def simulate(config: FederationConfig, out: Any = None, **kwargs: Any) -> FederationResult:
    """Run the federation described by ``config`` on this machine (see
    :func:`neurofuse.federated.simulation.simulate`)."""
    from neurofuse.federated.simulation import simulate as _simulate

    return _simulate(config, out, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "FusionStrategy":
        require_flower()
        from neurofuse.federated.strategy import FusionStrategy

        return FusionStrategy
    raise AttributeError(f"module 'neurofuse.federated' has no attribute {name!r}")


__all__ = ["FLOWER_HINT", "FederationConfig", "FusionStrategy", "require_flower", "simulate"]
