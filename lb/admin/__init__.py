"""The admin edge of the control process: the HTTP server (/status, the status page,
actions), /metrics, and the command-line client of that API.
"""
