"""The failover process: runs failover.FailoverController on a loop of its own (main) and
speaks the typed, versioned link to the control process (link).
"""
