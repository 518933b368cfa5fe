"""Run a patch right after a module executes: the one post-import mechanism of
both engine adapters (``vllm/hooks.py``, ``sglang/hooks.py``).

A patch registered for a module that is not imported yet runs as soon as the
module's code has executed, before anyone can ``from module import name`` the
unpatched attribute; for a module already imported it runs at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from collections.abc import Callable

_pending: dict[str, list[Callable]] = {}
_lock = threading.Lock()


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of a watched module so its patches run after it executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _pending:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module, _original=original_exec, _name=fullname):
            _original(module)
            with _lock:
                patches = _pending.pop(_name, [])
            for patch in patches:
                patch(module)

        spec.loader.exec_module = exec_module
        return spec


_finder = _PostImportFinder()


def when_imported(name: str, patch: Callable) -> None:
    """Call ``patch(module)`` for module ``name`` now if imported, else right after import."""
    module = sys.modules.get(name)
    if module is not None:
        patch(module)
        return
    with _lock:
        _pending.setdefault(name, []).append(patch)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
