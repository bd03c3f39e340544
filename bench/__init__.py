"""`make bench` / `python -m bench`: throughput, CPU, rate-limit, memory and latency figures of `harvest`.

Every party runs in its own process on 127.0.0.1: the fake API (`python -m crawler.testing.fakeapi`, or
`python -m bench.server` where a per-response delay or server-side status counts are needed), the
real `harvest` console script, the hand-written baseline (`bench/baseline.py`) and the ceiling
client (`bench/ceiling.py`). Each measured child is reaped with os.wait4, so its CPU time and peak
RSS are its own. Results go to bench/results.json (gitignored).
"""
