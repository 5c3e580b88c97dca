"""The control process: the daemon, its model of every pool, supervision of the workers and
of the failover process, pre-flight checks.

It owns health (healthcheck.HealthBook), admin state and ejections, and pushes a snapshot
per pool to the workers. It never imports the proxy engine (lb.data): the workers are
separate processes it talks to over lb.channel.
"""
