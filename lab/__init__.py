"""The lab: the live demo, the network-namespace topology, test backends, load and the
node/pair rigs that tests and benchmarks share.

Shipped beside the runtime but never imported by it (tests/test_imports.py): `pairlb demo`
starts `python -m lab.demo` as a process of its own.
"""
