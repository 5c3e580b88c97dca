"""Active health checks: probes, rise/fall state, scheduler. Imports nothing from lb or failover."""
