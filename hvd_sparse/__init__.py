"""hvd_sparse: data parallelism in training sparse neural networks, measured on real ranks."""
__version__ = "0.6.0"


def register_model(name: str):  # noqa: ANN201 - the decorator of hvd_sparse.registry.Registry.register
    """Decorator: ``@register_model("my-net")`` on a factory ``(input_shape, num_classes) -> nn.Module``."""
    from hvd_sparse.models import MODELS  # here, not at import: ``import hvd_sparse`` stays free of torch

    return MODELS.register(name)


def register_pruning(name: str):  # noqa: ANN201
    """Decorator: ``@register_pruning("my-score")`` on ``score(given: hvd_sparse.pruning.ScoreInput) ->
    {parameter name: scores of its shape}``; the highest-scored entries are kept."""
    from hvd_sparse.pruning import PRUNING

    return PRUNING.register(name)


def register_measurement(name: str):  # noqa: ANN201
    """Decorator: ``@register_measurement("my-quantity")`` on a subclass of ``hvd_sparse.measure.Measurement``
    (its ``wants(cfg)`` says which trials take it; see that module for when the engine calls it)."""
    from hvd_sparse.measure import MEASUREMENTS

    return MEASUREMENTS.register(name)


def register_dataset(name: str):  # noqa: ANN201
    """Decorator: ``@register_dataset("my-data")`` on a loader ``(data_dir) -> hvd_sparse.ArrayData`` (arrays in
    memory) or ``hvd_sparse.LazyData`` (map-style datasets read lazily)."""
    from hvd_sparse.data import DATASETS

    return DATASETS.register(name)


def __getattr__(name: str):  # noqa: ANN202 - ArrayData and LazyData, imported on first use (torch is heavy)
    if name in ("ArrayData", "LazyData"):
        from hvd_sparse import data

        return getattr(data, name)
    raise AttributeError(f"module 'hvd_sparse' has no attribute {name!r}")
