"""N trainer ranks x K inference nodes, simulated on this machine with Ray's own multi-node harness
(ray.cluster_utils.Cluster): real raylets, one per "node", all on 127.0.0.1.

It mirrors README's multi-node steps: the head (the training node) offers no replica slots (`ray start --head
--num-gpus 0` there; 0 CPUs here, since CPU replicas take a CPU slot), each inference node brings one replica slot
(a GPU there, a CPU here), the app is deployed onto the cluster (`serve run --address auto`), and the trainer
reaches it through Ray and serves the weight-sync store on its own address (`--sync_host`). What a real cluster has
that this does not: separate machines and IPs (here every node is 127.0.0.1, so a wrong --sync_host or a closed
port cannot show), firewalls, and NCCL over a network (here gloo, CPU tensors).
"""
import json
import os
import signal
import sys

import pytest

from conftest import ROOT  # before train: it puts the repo root on sys.path (also when launched as a script)
import train
from system import config
from test_serve import free_port, replica_processes
from test_train import LAUNCH, cfg_for, digit_reward, launch

pytestmark = [pytest.mark.slow, pytest.mark.extended]  # a 4-node Ray cluster and its replicas


@pytest.fixture(scope="module")
def cluster(tiny_model):
    """(Cluster, app name, the replicas' node ids by replica): a head with no replica slots, 3 inference nodes of one
    slot each, and an app of 2 torch-engine replicas of the tiny model (the third node is a spare)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # bind 127.0.0.1 only
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    import infer_workers
    small = dict(node_ip_address="127.0.0.1", object_store_memory=80 * 2**20)
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False, **small))
    nodes = [c.add_node(num_cpus=1, **small) for _ in range(3)]
    ray.init(address=c.address, log_to_driver=False, runtime_env={"env_vars": infer_workers.ray_env()})
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    name = "multinode"
    serve.run(infer_workers.build_app({"model": tiny_model, "engine": "torch", "num_workers": 2, "dtype": "float32"}),
              name=name, route_prefix=f"/{name}")
    yield c, name, nodes
    serve.shutdown()
    ray.shutdown()
    c.shutdown()


def replica_nodes(name):
    """{replica id: Ray node id} of the app's replicas, once both answer (as each reports itself: sync_state)."""
    from ray import serve
    replica_processes(name)
    return {s["replica"]: s["node"] for s in serve.get_app_handle(name).broadcast("sync_state").results(timeout_s=60)}


def test_replicas_live_on_inference_nodes_only(cluster):
    """The head (the trainer's node) offers no replica slot: both replicas run on inference nodes, one per node."""
    c, name, _ = cluster
    replica_processes(name)  # both up
    where = replica_nodes(name)
    assert len(where) == 2 and len(set(where.values())) == 2, where
    assert c.head_node.node_id not in where.values(), where


def test_grpo_through_the_cluster_survives_losing_a_replica_node(cluster, tiny_model, tmp_path, monkeypatch):
    """train.py --inference serve against the cluster: every step samples through the app and pushes its weights to
    replicas on other nodes over gloo (the store on the head's address). During step 2 one replica's node is removed:
    that costs a retry (Serve starts its replacement on the spare node, the next push re-forms the group), not the
    run; every step's completions come from the weights the trainer pushed last."""
    import weight_sync
    c, name, nodes = cluster
    pids, where = dict(replica_processes(name)), replica_nodes(name)
    victim = min(where)
    victim_node = next(n for n in nodes if n.node_id == where[victim])
    calls, groups, connect = [], [], weight_sync.WeightSync.connect
    monkeypatch.setattr(weight_sync.WeightSync, "connect",  # the real one, watched: which groups the trainer formed
                        lambda self, states: (connect(self, states), groups.append(sorted(s["replica"] for s in states))))

    def reward_then_remove_a_node(completion, answer):
        calls.append(1)
        if len(calls) == cfg.prompts_per_step * cfg.group_size + 1:  # the first completion of step 2
            # a lost machine takes its raylet and the replica with it, at once. Here they are processes of one host:
            # the replica would outlive its raylet until it next talks to it (seen on CI: it took two more pushes)
            c.remove_node(victim_node, allow_graceful=False)
            os.kill(pids[victim], signal.SIGKILL)
        return digit_reward(completion, answer)

    cfg = config.replace(cfg_for(tiny_model, tmp_path / "run", max_steps=3), inference="serve", serve_app=name,
                              ray_address=c.address, sync_host="127.0.0.1", sync_timeout_s=180.0)
    train.main(cfg, reward_fn=reward_then_remove_a_node)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["version"] for r in rows] == [2, 3, 4], rows  # the initial push, then one per step
    assert len(groups) == 2 and groups[0] != groups[1], groups  # the lost replica's push re-formed the group
    where = replica_nodes(name)
    assert len(where) == 2 and victim_node.node_id not in where.values(), where  # replaced on the spare node
    assert c.head_node.node_id not in where.values()


def test_two_trainer_ranks_against_the_cluster(cluster, tiny_model, tmp_path):
    """accelerate launch, 2 gloo ranks, against the cluster: each rank samples its share of the step's prompts
    through the app; only rank 0 pushes (the replicas' versions follow its pushes, one per step)."""
    c, name, _ = cluster
    assert len(replica_processes(name)) == 2  # both up (a replica the last test lost may still be restarting)
    run = tmp_path / "ddp"
    p = launch(LAUNCH + [os.path.join(ROOT, "tests", "test_multinode.py"), "--model=" + tiny_model,
                         f"--run_dir={run}", f"--ray_address={c.address}", f"--serve_app={name}"], timeout=600)
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["version"] for r in rows] == [r["step"] + 1 for r in rows] == [2, 3], (rows, p.stdout[-2000:])
    from ray import serve
    states = serve.get_app_handle(name).broadcast("sync_state").results(timeout_s=60)
    assert len(states) == 2 and all(s["version"] == 3 for s in states), states


if __name__ == "__main__":  # the accelerate launch target of the two-rank test: train.py with the toy reward
    from conftest import GSM8K
    cfg = train.load_config([f"--data={GSM8K}", "--inference=serve", "--prompts_per_step=2", "--group_size=4",
                             "--max_new_tokens=12", "--micro_batch_size=3", "--lr=1e-3", "--max_steps=2",
                             "--sync_timeout_s=180"] + sys.argv[1:])
    train.main(cfg, reward_fn=digit_reward)
    from system.run import exit_gloo_rank
    exit_gloo_rank()  # as train.py's command line ends
