"""Run unmodified client code of the reference implementation on ndcls.

:func:`install_as_dcls` registers three modules in ``sys.modules`` -- ``DCLS``, ``DCLS.construct``
and ``DCLS.construct.modules`` (all the reference package ``dcls`` 0.1.1 has) -- so that
``import DCLS``, ``from DCLS.construct.modules import Dcls1d`` and the like give ndcls's classes.
Only imports that run afterwards are affected; :func:`uninstall_as_dcls` puts back what was there.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

_NAMES = ("DCLS", "DCLS.construct", "DCLS.construct.modules")
_MISSING = object()
_saved: dict = {}


def _package(name: str, doc: str) -> types.ModuleType:
    module = types.ModuleType(name, doc)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []  # a package: its submodules are the ones registered here
    return module


def _is_installed() -> bool:
    return getattr(sys.modules.get("DCLS"), "__ndcls__", False)


def install_as_dcls(*, force: bool = False) -> None:
    """Make the reference's import paths (``DCLS.construct.modules``) resolve to ndcls's layers.

    Call it before the client code imports ``DCLS``; calling it again does nothing. If the
    reference package is already imported, modules that imported it keep its classes, so this
    raises ``RuntimeError`` unless ``force=True`` (then later imports get ndcls's).

    Example::

        import ndcls.torch_bridge
        ndcls.torch_bridge.install_as_dcls()
        from DCLS.construct.modules import Dcls1d   # ndcls.torch_bridge.modules.Dcls1d
    """
    if _is_installed():
        return
    loaded = [n for n in _NAMES if n in sys.modules]
    if loaded and not force:
        raise RuntimeError(
            f"the reference package is already imported ({', '.join(loaded)}); call install_as_dcls() before "
            f"anything imports DCLS, or pass force=True to replace it for the imports that follow"
        )
    from ndcls.torch_bridge import modules

    top = _package("DCLS", "ndcls standing in for the reference DCLS package (ndcls.torch_bridge.install_as_dcls).")
    top.__ndcls__ = True
    construct = _package("DCLS.construct", "ndcls standing in for DCLS.construct.")
    top.construct = construct
    construct.modules = modules
    _saved.clear()
    _saved.update({n: sys.modules.get(n, _MISSING) for n in _NAMES})
    sys.modules.update({"DCLS": top, "DCLS.construct": construct, "DCLS.construct.modules": modules})


def uninstall_as_dcls() -> None:
    """Undo :func:`install_as_dcls`: the ``DCLS`` modules that were registered before come back."""
    if not _is_installed():
        return
    for name in _NAMES:
        previous = _saved.get(name, _MISSING)
        if previous is _MISSING:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
    _saved.clear()
