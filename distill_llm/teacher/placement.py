"""Will the engines fit? Checked before any engine starts, so a job that can never run fails in seconds.

Ray leaves an actor that no node can hold pending forever, without a word. Before the engines start,
the resources one engine actor asks for (teacher/engine.py, ``engine_resources``) are compared with the
nodes the cluster has and, where the autoscaler publishes them, the node types it can add:

- no node and no node type can ever hold one engine (or ``teacher.replicas`` of them): an error naming
  the key to change;
- a local Ray (started by this job, it cannot grow) that cannot hold them now: the same error;
- a cluster that may still add nodes: a bounded wait for the resources (a placement group that reserves
  them, released before the engines start), then an error saying what is missing.

A GPU engine with pipeline stages (``teacher.pipeline_parallel_size`` > 1) runs on vLLM's Ray executor
instead, as ``ray.data.llm`` runs one: its replica reserves a placement group of one ``{GPU: 1, CPU: 1}``
bundle per worker (``ReplicaGroup``), the engine actor starts inside it (placement group scheduling with
child-task capture, so vLLM finds the group and puts its workers on the bundles), and the replica may span
nodes. Each tensor-parallel group must sit on one node (its all-reduce runs every layer); pipeline stages
exchange one activation per step and may sit on different nodes. Ray's strategies apply to a whole group,
so the group is STRICT_PACK when the replica fits on the largest node (every worker on one node) and PACK
when it does not (as few nodes as possible: whole free nodes take whole TP groups); never SPREAD, which
would scatter the ranks of a TP group over nodes. vLLM numbers its workers node by node, so a TP group
lands on one node whenever each node holds a multiple of TP workers (``split_tp_groups`` says when not).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

from ..config import ConfigError


class PlacementError(ConfigError):
    """The engines the config asks for cannot be placed on this Ray cluster."""


@dataclass(frozen=True)
class NodeType:
    """Nodes of one shape: what each advertises to Ray, and how many there can be (-1: no limit)."""

    name: str
    resources: dict[str, float]
    max_count: int


def per_node(need: dict[str, float], resources: dict[str, float]) -> int:
    """How many actors of ``need`` one node of ``resources`` holds."""
    return min((math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0), default=1 << 30)


def capacity(need: dict[str, float], nodes: list[dict[str, float]], types: list[NodeType]) -> float:
    """Actors of ``need`` the cluster can hold: on its nodes now, or on the nodes its types allow."""
    now = sum(per_node(need, n) for n in nodes)
    later = 0.0
    for t in types:
        fits = per_node(need, t.resources)
        if fits:
            later += math.inf if t.max_count < 0 else fits * t.max_count
    return max(now, later)


def describe(need: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(need.items())) + "}"


def missing(need: dict[str, float], shapes: list[dict[str, float]], keys: dict[str, str]) -> str:
    """Why no single node can hold ``need``: the first resource no shape offers enough of, with its key."""
    for resource, amount in sorted(need.items(), key=lambda kv: kv[0] not in ("GPU", "CPU")):
        best = max((s.get(resource, 0.0) for s in shapes), default=0.0)
        if best < amount:
            key = keys.get(resource, "teacher.resources")
            has = f"the largest node has {best:g}" if best else f"no node advertises {resource}"
            return f"{key}: each engine needs {resource}: {amount:g}, but {has}"
    return f"no node holds all of {describe(need)} at once"


def problem(need: dict[str, float], replicas: int, nodes: list[dict[str, float]], types: list[NodeType],
            keys: dict[str, str]) -> str | None:
    """Why ``replicas`` actors of ``need`` can never be placed on these nodes and node types (None: they can)."""
    shapes = nodes + [t.resources for t in types if t.max_count != 0]
    if not any(per_node(need, s) for s in shapes):
        return missing(need, shapes, keys)
    room = capacity(need, nodes, types)
    if room < replicas:
        return (f"teacher.replicas={replicas}: the cluster holds at most {int(room)} engine(s) of "
                f"{describe(need)}; lower teacher.replicas or add nodes")
    return None


@dataclass(frozen=True)
class ReplicaGroup:
    """One engine replica on vLLM's Ray executor: TP x PP workers, one placement-group bundle each."""

    tp: int
    pp: int
    resources: dict[str, float]  # teacher.resources of the replica, shared out evenly over its bundles

    @property
    def workers(self) -> int:
        return self.tp * self.pp

    @property
    def bundles(self) -> list[dict[str, float]]:
        """One ``{GPU: 1, CPU: 1}`` bundle per worker; the engine actor takes the CPU of bundle 0 (vLLM's
        workers ask for none). Custom resources are shared out so every bundle lands on a node that has them."""
        share = {k: math.floor(v / self.workers * 1e4) / 1e4 for k, v in self.resources.items()}
        return [{"GPU": 1.0, "CPU": 1.0, **share} for _ in range(self.workers)]

    @property
    def tp_group(self) -> dict[str, float]:
        """What one tensor-parallel group needs on a single node."""
        return {k: v * self.tp for k, v in self.bundles[0].items()}

    def strategy(self, node_gpus: float) -> str:
        """STRICT_PACK when the replica fits on a node of ``node_gpus`` GPUs (the largest), else PACK."""
        return "STRICT_PACK" if self.workers <= node_gpus else "PACK"


def largest_gpus(nodes: list[dict[str, float]], types: list[NodeType]) -> float:
    """GPUs of the largest node there is or the autoscaler can add."""
    return max([n.get("GPU", 0.0) for n in nodes] + [t.resources.get("GPU", 0.0) for t in types if t.max_count],
               default=0.0)


def group_problem(group: ReplicaGroup, replicas: int, nodes: list[dict[str, float]], types: list[NodeType],
                  keys: dict[str, str]) -> str | None:
    """Why ``replicas`` replica groups can never be placed (None: they can): a TP group wider than every
    node, or fewer node-sized TP groups than ``replicas`` x PP."""
    best = largest_gpus(nodes, types)
    if best < group.tp:
        return (f"teacher.tensor_parallel_size={group.tp}: a tensor-parallel group must sit on one node (it "
                f"all-reduces every layer), but the largest node has {best:g} GPUs; span nodes with "
                "teacher.pipeline_parallel_size instead (TP up to a node's GPUs x PP stages)")
    shapes = nodes + [t.resources for t in types if t.max_count != 0]
    if not any(per_node(group.tp_group, s) for s in shapes):
        return missing(group.tp_group, shapes, keys)
    room, need = capacity(group.tp_group, nodes, types), replicas * group.pp
    if room < need:
        return (f"teacher.replicas={replicas} x teacher.pipeline_parallel_size={group.pp}: each replica needs "
                f"{group.pp} tensor-parallel group(s) of {describe(group.tp_group)} on one node each, {need} in "
                f"all, but the cluster holds at most {int(room)}; lower teacher.replicas or add nodes")
    return None


def split_tp_groups(bundle_nodes: list[str], tp: int) -> list[str]:
    """Nodes holding a number of the group's workers that is not a multiple of TP: vLLM numbers workers node
    by node, so a TP group would straddle such a node and the next (it runs, with all-reduces between nodes)."""
    counts: dict[str, int] = {}
    for node in bundle_nodes:
        counts[node] = counts.get(node, 0) + 1
    return sorted(node for node, n in counts.items() if n % tp)


def replica_scheduling(group: ReplicaGroup) -> dict:
    """Ray remote args of one engine actor (Ray Data calls it per actor): a new placement group for its
    replica, the actor on bundle 0, child tasks captured so vLLM's engine finds the group and places its
    workers on its bundles. The group lives as long as the job."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = group.strategy(largest_gpus(cluster_nodes(), autoscaler_node_types() or []))
    pg = placement_group(group.bundles, strategy=strategy)
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each live node."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def autoscaler_node_types() -> list[NodeType] | None:
    """The node types the cluster's autoscaler may start, where it publishes them (None: not known).

    Read from the cluster config the autoscaler reports to Ray's GCS, as Ray Data's own autoscaling does
    (Ray has no public call for it yet); a cluster without an autoscaler has none.
    """
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # another Ray version: the check falls back to the bounded wait
        return None
    if config is None or not config.node_group_configs:
        return None
    return [NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
            for g in config.node_group_configs]


def wait_for(need: dict[str, float], replicas: int, timeout_s: float, what: str,
             bundles: list[dict[str, float]] | None = None) -> None:
    """Reserve ``replicas`` x ``need`` (so an autoscaler adds the nodes), release it, or fail after ``timeout_s``.

    ``bundles``: what one replica reserves when it is a placement group (ReplicaGroup.bundles); else ``need``.
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    print(f"generate: the cluster cannot hold {replicas} engine(s) of {describe(need)} now; waiting up to "
          f"{timeout_s:g}s for nodes (teacher.placement_timeout_s)", file=sys.stderr, flush=True)
    start = time.time()
    group = placement_group([dict(b) for _ in range(replicas) for b in (bundles or [need])], strategy="PACK")
    try:
        if not group.wait(timeout_seconds=timeout_s):
            raise PlacementError(
                f"{what}: {replicas} engine(s) of {describe(need)} could not be placed within {timeout_s:g}s "
                f"(teacher.placement_timeout_s); the cluster's nodes offer {_summary(cluster_nodes())}. Check "
                "the node groups (teacher.resources, GPUs per node) or raise the timeout for slow node starts")
    finally:
        remove_placement_group(group)
    print(f"generate: the cluster can hold the engines (after {time.time() - start:.0f}s)", file=sys.stderr,
          flush=True)


def _summary(nodes: list[dict[str, float]]) -> str:
    keep = [{k: v for k, v in n.items() if not k.startswith(("node:", "memory", "object_store_memory"))}
            for n in nodes]
    return "; ".join(describe(n) for n in keep) or "nothing"


def check_placement(need: dict[str, float], replicas: int, keys: dict[str, str], can_grow: bool,
                    timeout_s: float, what: str = "generate", group: ReplicaGroup | None = None) -> None:
    """Fail in seconds when the engines can never be placed; wait (bounded) when nodes may still come.

    ``can_grow``: False for a local Ray this job started (nothing will join it). ``keys`` names the config
    key behind each resource, so the error says what to change. ``group``: each replica is a placement
    group spanning nodes (vLLM's Ray executor), checked TP group by TP group instead of as one actor.
    """
    def why(types: list[NodeType]) -> str | None:
        return (problem(need, replicas, nodes, types, keys) if group is None
                else group_problem(group, replicas, nodes, types, keys))

    nodes = cluster_nodes()
    types = autoscaler_node_types()
    reason = why(types or [])
    if reason is not None and (types is not None or not can_grow):
        where = (f"nodes: {_summary(nodes)}; node types the autoscaler can add: "
                 + ", ".join(f"{t.name} {describe(t.resources)} x {t.max_count}" for t in types)
                 if types is not None else f"a local Ray started by this job, which cannot add nodes: {_summary(nodes)}")
        raise PlacementError(f"{what} cannot start its engines: {reason} ({where})")
    if why([]) is None:
        return  # the nodes there now hold every engine
    wait_for(need, replicas, timeout_s, what, group.bundles if group is not None else None)
