"""The Ray the tests start (`start_local_ray`, as `loraplex serve-ray` without an address) is a node on
127.0.0.1: Ray's own servers (GCS, raylet, agents, workers) listen on loopback only."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.parametrize("cluster", ["batched"], indirect=True)

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def test_the_local_ray_is_a_node_on_127_0_0_1_and_listens_on_loopback_only(ray_serve, cluster):
    import psutil
    import ray

    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    assert ray_serve.gcs_address.startswith("127.0.0.1:")
    listening = []
    for process in psutil.Process().children(recursive=True):  # the GCS, the raylet, Serve's actors, the replicas
        try:
            sockets = process.net_connections("inet")
        except psutil.NoSuchProcess:
            continue
        listening += [(process.pid, process.name(), s.laddr.ip, s.laddr.port) for s in sockets
                      if s.status == psutil.CONN_LISTEN]
    assert {name for _, name, _, _ in listening} >= {"gcs_server", "raylet"} and len(listening) > 10
    # Ray 2.60 binds Serve's own gRPC servers to every address ("[::]", not configurable): the proxy's
    # port for clients, and each Serve replica's inter-deployment server. One per Serve actor, no more.
    exposed: dict[int, list] = {}
    for pid, name, ip, port in listening:
        if ip not in LOOPBACK:
            exposed.setdefault(pid, []).append((name, ip, port))
    for entries in exposed.values():
        assert len(entries) == 1 and entries[0][0].startswith(("ray::ServeReplica", "ray::ProxyActor")), entries
        if entries[0][0].startswith("ray::ProxyActor"):
            assert entries[0][2] == ray_serve.grpc, entries
