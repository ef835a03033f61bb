"""Keel's benchmarks: each Keel figure next to the machine ceiling it sits on, as a ratio.

Run `scripts/bench` (full, a few minutes) or `scripts/bench --quick` (CI's
proof that it still runs); docs/perf/README.md explains every workload.

Every measuring client runs in a process of its own (`python -m bench.child`),
separate from the server it measures, and everything binds 127.0.0.1.

- sizes.py      how big each workload is, full and quick
- procs.py      the processes: redis-server, Keel servers, raw servers, clients
- child.py      the client processes' entry point
- keel_load.py  the Keel workloads' client side (a-f); tasks_load.py workload g
- ceilings.py   the raw ceilings' client side (gRPC, Redis)
- raw_grpc.py   the raw grpc.aio server the gRPC ceilings measure
- runner.py     runs everything in order and computes ratios and targets
- report.py     JSON, Markdown and PNG output
"""
