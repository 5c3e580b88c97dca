"""failover's adapters to the OS, behind the ports of failover.core.ports: the VIP
(pyroute2: addresses, GARP/NA, neighbours), the UDP heartbeat transport, notify hooks,
connection handover (nftables) and the partition guard's probes.
"""
