"""pfc: distributed large-scale Partial-FC training for face recognition."""

__version__ = "0.1.0"
