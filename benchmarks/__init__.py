"""Benchmarks of sqlalchemy-q4m against a raw-PyMySQL baseline issuing the same SQL.

Run ``python -m benchmarks [--url URL] [--quick]``; the report goes to
``benchmarks/RESULTS.md``.  Every scenario runs its library variant and its raw baseline in
the same process run, alternating, so the figure that matters is the ratio between them.
"""
