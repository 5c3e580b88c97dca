"""pairlb: the application. The rooms: lb.control (the control process), lb.data (proxy
workers), lb.failoverd (the failover process), lb.admin (its admin edge); shared modules here."""

__version__ = "0.1.0"
