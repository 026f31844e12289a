"""pairlane's supervision tree, as data.

Owns: which actors exist, how they are grouped and restarted. Actors that
are not built yet are simply absent. Never starts anything itself.
"""
from __future__ import annotations

from supervision.spec import ChildSpec, Restart, Strategy

from .admin import Admin


def build_tree(cfg: dict) -> ChildSpec:
    from supervision.supervisor import Supervisor
    from supervision.root import RootSupervisor

    children: list[ChildSpec] = []
    children.append(ChildSpec("admin", Admin, Restart.PERMANENT, shutdown_s=2.0))
    return ChildSpec("root", RootSupervisor, children=tuple(children), strategy=Strategy.ONE_FOR_ONE)
