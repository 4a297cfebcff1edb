"""loraplex on Ray Serve: the same gRPC contract, many replicas, requests routed by adapter.

Only `loraplex serve-ray` (and a Serve config file naming `loraplex.runtime.cluster.app:app_builder`)
imports this package; it needs the `ray` extra (`pip install 'loraplex[ray]'`). The rest of the
runtime never imports ray. This `__init__` imports nothing, so listing the runtime's modules
stays ray-free.

- `config`: `ClusterConfig`, the per-replica `ServerConfig` plus replicas, autoscaling, ports;
- `app`: the Serve application (front, engine replicas, catalog) and `serve_cluster` (the CLI's loop);
- `front`: the gRPC front end behind Serve's proxy: forwards to engine replicas, maps errors to
  the single server's statuses, answers Adapters calls through the catalog, health and metrics;
- `replica`: one engine replica: the pieces `start_server` builds, without a port;
- `residency`: which adapters one replica holds, following the catalog;
- `catalog`: the cluster's adapter set (name -> version) and how changes reach every replica;
- `routing`: adapter-affinity request routing between replicas;
- `federation`: every replica's Prometheus metrics as one scrape, labelled by replica.
"""
