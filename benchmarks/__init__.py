"""thodb's benchmark harness.

Each workload is measured beside a *floor*: the cheapest way the same machine can do the
same job (COPY of the same rows, a primary-key lookup, a join to a plain table), in the
same run, on PostgreSQL and on SQLite. Growth curves (import chains, fan-out, is-a
hierarchies) are drawn as PNG charts. Run it with::

    python -m benchmarks [--quick] [--engine sqlite|postgresql]... [--output DIR]

Modules: :mod:`benchmarks.harness` (timing, databases, results), :mod:`benchmarks.synth`
(seeded synthetic FHIR content), :mod:`benchmarks.child` (a load in its own process, for
its peak RSS), :mod:`benchmarks.charts`, and one module per workload (listed in
:data:`benchmarks.runner.WORKLOADS`).
"""
