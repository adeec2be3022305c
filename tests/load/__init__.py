"""The load test (``make load``, ``python -m tests.load``): well-behaved and hostile agents
against a real ``quiver serve``; results in tests/bench/LOAD.md. See ``__main__``."""
