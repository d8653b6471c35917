"""hvd_sparse: data parallelism in training sparse neural networks, measured on real ranks."""
__version__ = "0.4.0"
