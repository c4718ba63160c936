"""Reproducible benchmark of the bridge (``make bench`` / ``python -m bench``); see docs/performance.md.

Every moving part runs in its own process so that CPU time and peak RSS can be read per process from /proc:
the embedded tansu broker, the server under test (bare aiohttp, raw aiokafka producer, or ``vod-bridge
serve``), and the load generator (:mod:`bench.loadgen`).
"""
