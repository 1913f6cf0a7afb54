"""A job driver for tests/cluster/test_node_types.py, run through the Ray Jobs API on the fake multi-node
cluster: it places a spec's workers exactly as trainer/fit.py asks Ray Train to (the bundle of
`trainer.placement.worker_resources` per worker, `placement_strategy` for the group; each GPU renamed to the
fake cluster's `fake_gpu`), starts one trivial actor per bundle, and prints where the driver and each worker
ran as one JSON line. No training: placement is what is under test, and a Train run would only add minutes.

    python tests/cluster/fake_driver.py '<scaling section JSON>'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray
from ray.util.placement_group import placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tests.cluster.fakecluster import FAKE_GPU
from trainer.fit import cluster_nodes
from trainer.placement import placement_strategy, resolve_placement, worker_resources
from trainer.spec import ScalingSpec


@ray.remote(num_cpus=0)
class Worker:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def main() -> None:
    scaling = ScalingSpec.model_validate_json(sys.argv[1])
    ray.init(log_to_driver=False)
    # The cluster as placement sees it, with fake GPUs shown as GPUs (only the resource's name differs).
    nodes = [{("GPU" if k == FAKE_GPU else k): v for k, v in n.items()} for n in cluster_nodes()]
    where = resolve_placement(scaling, batch_size=64, nodes=nodes)
    bundle = {(FAKE_GPU if k == "GPU" else k): v for k, v in worker_resources(scaling, where).items()}
    strategy = placement_strategy(scaling)
    group = placement_group([bundle] * where.num_workers, strategy=strategy)
    if not group.wait(timeout_seconds=240):
        raise SystemExit(f"the placement group {bundle} x {where.num_workers} ({strategy}) was never placed")
    workers = [
        Worker.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
        ).remote()
        for i in range(where.num_workers)
    ]
    print(
        "RESULT "
        + json.dumps(
            {
                "driver_node": ray.get_runtime_context().get_node_id(),
                "worker_nodes": ray.get([w.node.remote() for w in workers]),
                "bundle_nodes": list(placement_group_table(group)["bundles_to_node_id"].values()),
                "bundle": bundle,
                "strategy": strategy,
                "placement": where.reason,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
