"""The generated subclasses patch() switches transformers modules to (`module.__class__ = ...`):
the same class with fastattn's forward, so the module keeps its submodules, Parameters and
state. One subclass per (class, purpose), made once."""

_made = {}


def has_hooks(m):
    """Whether hooks are registered on module m (a switched or replaced module would skip or
    lose them, so patch() leaves such modules alone)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def subclass_with_forward(cls, make_forward, doc, module):
    """`Fastattn<cls name>`: cls with forward = make_forward(cls), defined in `module` (the
    integration file that asks for it)."""
    key = (cls, module)
    sub = _made.get(key)
    if sub is None:
        sub = type(f"Fastattn{cls.__name__}", (cls,), {
            "forward": make_forward(cls), "__module__": module, "__doc__": doc})
        _made[key] = sub
    return sub
