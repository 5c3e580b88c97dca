"""The pure core of failover: the role machine (RFC 5798 timers), the heartbeat codec
(HMAC, replay guard, key files) and the ports the controller drives. No asyncio, sockets,
clocks or logging (tests/test_imports.py): callers pass ``now`` and act on what they return.
"""
