"""One module per chapter (`chNN.py`), each registering that chapter's exercises on import."""

import importlib
import pkgutil

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("ch")):
    importlib.import_module(f"{__name__}.{_mod}")
