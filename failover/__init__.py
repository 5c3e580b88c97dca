"""Failover: heartbeat codec, role machine, UDP transport, VIP adapter. Imports nothing from lb or healthcheck."""
