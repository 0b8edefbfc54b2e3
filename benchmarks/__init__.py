"""Benchmarks of sqlalchemy-q4m against a raw baseline issuing the same SQL.

Run ``python -m benchmarks [--url URL] [--quick]``; the report goes to
``benchmarks/RESULTS.md``.  Every scenario runs its library variant and its raw baseline in
the same process run, alternating, so the figure that matters is the ratio between them.

Modules: ``scenarios`` (the registry) over ``produce`` (enqueue), ``consume`` (every bind and
the worker, and statements per job), ``batched``, ``latency`` (pickup latency, idle cost,
memory) and ``asyncio_bench``; ``workers`` holds the consumer loops, ``report`` the settings,
rows and targets, ``common`` the table and raw connections.  ``python -m benchmarks.cpu``
prints each path's client CPU per job against its raw loop (``layers`` takes the consume path
apart for it), ``benchmarks.floors`` the throughput of each of those layers (and of
SQLAlchemy's own asyncio bridge and ``Session``) against the raw loop, ``benchmarks.rss``
measures a worker's memory and ``benchmarks.dashboard`` the dashboard's queries.
"""
