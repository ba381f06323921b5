"""models: loading (with registered ``scheme:name`` resolvers), evaluation, the reference teachers."""

from .loading import register_resolver


def _reference(size: str) -> str:
    # Imported when a "reference:<size>" is first resolved: it trains (or reuses) the cached teacher.
    from .reference import reference_model

    return str(reference_model(size))


register_resolver("reference", _reference)
