"""pairlb: the application (config, CLI, daemon, proxy workers, pool, admin, metrics)."""

__version__ = "0.1.0"
