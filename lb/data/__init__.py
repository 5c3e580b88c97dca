"""The data plane: a proxy worker process and its engine (HTTP/1.1 and TCP proxying, header
rules, the worker's view of each pool).

A worker gets its config, listening sockets and pool snapshots from the control process
over lb.channel and sends back counters and passive ejections; it imports nothing of
lb.control or lb.admin.
"""
