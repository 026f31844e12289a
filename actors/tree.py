"""pairlane's supervision tree, as data.

Owns: which actors exist, how they are grouped and restarted:

    root (one_for_one)
      metrics                       first: everyone reports to it
      store (rest_for_one): writer, dlq
      ingest (rest_for_one): assembler, gateway, legacy
      pairs
      admin                         last: it answers once the tree is up

Never starts anything itself.
"""
from __future__ import annotations

from pairlane.supervision.spec import ChildSpec, Restart, Strategy


def build_tree(cfg: dict) -> ChildSpec:
    from pairlane.supervision.root import RootSupervisor
    from pairlane.supervision.supervisor import Supervisor

    from .admin import Admin
    from .assembler import Assembler
    from .dlq import DLQ
    from .gateway import Gateway
    from .legacy import Legacy
    from .metrics import MetricsActor
    from .pairs import PairsActor
    from .writer import Writer

    slow_hb = max(cfg["supervision"]["long_work_heartbeat_timeout_s"], cfg["supervision"]["heartbeat_timeout_s"])
    store = [ChildSpec("writer", Writer, Restart.PERMANENT, shutdown_s=10.0),
             ChildSpec("dlq", DLQ, Restart.PERMANENT, shutdown_s=10.0)]
    ingest = [ChildSpec("assembler", Assembler, Restart.PERMANENT, shutdown_s=5.0),
              ChildSpec("gateway", Gateway, Restart.PERMANENT, shutdown_s=5.0)]
    if cfg["gateway"]["legacy_endpoint"]:
        ingest.append(ChildSpec("legacy", Legacy, Restart.PERMANENT, shutdown_s=5.0))
    children = [
        ChildSpec("metrics", MetricsActor, Restart.PERMANENT, shutdown_s=5.0),
        ChildSpec("store", Supervisor, Restart.PERMANENT, shutdown_s=30.0, children=tuple(store),
                  strategy=Strategy.REST_FOR_ONE),
        ChildSpec("ingest", Supervisor, Restart.PERMANENT, shutdown_s=20.0, children=tuple(ingest),
                  strategy=Strategy.REST_FOR_ONE),
        # pair evaluation of thousands of strategies is legitimate long work: a longer deadline
        ChildSpec("pairs", PairsActor, Restart.PERMANENT, shutdown_s=5.0, heartbeat_timeout_s=slow_hb),
        ChildSpec("admin", Admin, Restart.PERMANENT, shutdown_s=2.0),
    ]
    return ChildSpec("root", RootSupervisor, children=tuple(children), strategy=Strategy.ONE_FOR_ONE)
