"""Drop-in modules (placeholders until the modules issue lands: they refuse to construct)."""


class _NotYet:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"fastattn.{type(self).__name__} is not implemented yet")


class MultiHeadAttention(_NotYet):
    pass


class LayerNorm(_NotYet):
    pass


class RMSNorm(_NotYet):
    pass


class RotaryEmbedding(_NotYet):
    pass


def patch(model, *, attention=True, norms=True):
    raise NotImplementedError("fastattn.patch is not implemented yet")
