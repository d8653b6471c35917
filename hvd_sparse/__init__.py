"""hvd_sparse."""
__version__ = "0.1.0"
