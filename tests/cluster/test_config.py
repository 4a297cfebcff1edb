"""ClusterConfig and the Serve application it describes, without Ray running."""

from __future__ import annotations

import pytest
from loraplex.runtime.cluster.config import ClusterConfig
from loraplex.runtime.server import ServerConfig


def test_from_options_splits_server_and_cluster_fields_and_refuses_unknown_ones(tiny_package):
    config = ClusterConfig.from_options({"package": str(tiny_package), "max_batch": 4, "max_queue": 12,
                                         "max_slots": 3, "replicas": 2, "max_replicas": 5, "replica_cpus": 2})
    assert config.server.max_batch == 4 and config.slots == 3 and config.max_ongoing_requests == 16
    assert config.server.intra_op_threads == 2  # one onnxruntime thread per reserved CPU, not per core
    assert config.autoscaling() == {"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 4}
    with pytest.raises(ValueError, match="unknown cluster option"):
        ClusterConfig.from_options({"package": str(tiny_package), "replica": 2})
    with pytest.raises(ValueError, match="max_replicas"):
        ClusterConfig(server=ServerConfig(package=tiny_package), replicas=3, max_replicas=2)


def test_app_builder_binds_front_engine_and_catalog(tiny_package):
    from loraplex.runtime.cluster.app import CATALOG, ENGINE, FRONT, app_builder

    app = app_builder({"package": str(tiny_package), "replicas": 3})
    front = app._bound_deployment
    assert front.name == FRONT
    config, engine, catalog = front.init_args
    engine, catalog = engine._bound_deployment, catalog._bound_deployment
    assert isinstance(config, ClusterConfig)
    assert engine.name == ENGINE and engine.num_replicas == 3
    assert catalog.name == CATALOG and catalog.num_replicas == 1
    assert engine._deployment_config.request_router_config.request_router_kwargs == {"slots": 8, "spill_queue": 8}
