"""A local Ray cluster for the cluster tests: started once per session, in-process, on 127.0.0.1.

- `ray_serve`: a single-node Ray on 127.0.0.1 (2 CPUs, no dashboard; `start_local_ray`) and Serve's
  proxies on free ports, with the loraplex services registered on the gRPC proxy;
- `cluster`: the loraplex application on `tiny_package` with 2 engine replicas of half a CPU
  each (max_batch 4, 2 adapter slots each: 4 slots for 3 adapters), through Serve's gRPC proxy,
  on each engine (session scope, parametrized over ENGINES; a module that needs one engine
  parametrizes `cluster` indirectly): a test that changes its adapters puts them back;
- `cluster.brake`: holds requests in front of the replicas' engines (`tests.cluster.brake`), so a
  test keeps them in flight for as long as it needs.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.fixtures.serving import ENGINES

if TYPE_CHECKING:
    from tests.cluster.brake import ClusterBrake

APP = "loraplex"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServePorts:
    grpc: int
    http: int
    gcs_address: str


@dataclass
class ClusterHandle:
    config: object  # ClusterConfig
    ports: ServePorts
    brake: ClusterBrake

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    def client(self, **kwargs):
        from loraplex.runtime.client import Client

        kwargs.setdefault("timeout", 60)
        return Client(self.target, **kwargs)

    def catalog(self):
        """The catalog deployment's handle (test-side view of the replicas' reports)."""
        from loraplex.runtime.cluster.app import CATALOG
        from ray import serve

        return serve.get_deployment_handle(CATALOG, self.config.app_name)

    def replicas(self) -> list:
        return self.catalog().reports.remote().result(timeout_s=30)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.ports.http}/{self.config.app_name}/metrics"
        return urllib.request.urlopen(url, timeout=30).read().decode()


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (any replica)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_for(condition, timeout: float = 60.0, what: str = "condition", every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="session")
def ray_serve():
    import ray
    from loraplex.runtime.cluster.app import start_local_ray
    from loraplex.runtime.cluster.config import GRPC_SERVICERS
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    context = start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ports = ServePorts(free_port(), free_port(), context.address_info["gcs_address"])
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=ports.http),
                grpc_options=gRPCOptions(port=ports.grpc, grpc_servicer_functions=list(GRPC_SERVICERS)))
    yield ports
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def cluster_adapter_root(tmp_path_factory, tiny_package: Path) -> Path:
    """The runtime tests' adapter root (good, bad and escaping files), for the session's cluster."""
    from tests.fixtures.serving import make_adapter_root

    return make_adapter_root(tmp_path_factory.mktemp("cluster_adapter_root"), tiny_package)


@pytest.fixture(scope="session", params=ENGINES)
def cluster(request, ray_serve: ServePorts, tiny_package: Path, cluster_adapter_root: Path, tmp_path_factory):
    from loraplex.runtime.cluster.app import deploy, undeploy
    from loraplex.runtime.cluster.config import ClusterConfig
    from loraplex.runtime.server import ServerConfig

    from tests.cluster.brake import BrakedReplica, ClusterBrake

    brake = ClusterBrake(tmp_path_factory.mktemp(f"brake_{request.param}") / "held")
    server = ServerConfig(package=tiny_package, engine=request.param, max_batch=4, max_queue=32, max_slots=2,
                          adapter_root=cluster_adapter_root)
    config = ClusterConfig(server=server, app_name=APP, grpc_port=ray_serve.grpc, http_port=ray_serve.http,
                           replicas=2, replica_cpus=0.5, drain_grace=10.0, ray_options=brake.runtime_env())
    deploy(config, replica_class=BrakedReplica)
    handle = ClusterHandle(config, ray_serve, brake)
    wait_for(lambda: len(handle.replicas()) == 2, what="both replicas following the catalog")
    yield handle
    undeploy(config)
