"""Package attributes imported on first use (PEP 562): `import jaxdpo` and `jaxdpo --help` load
neither JAX nor transformers until a name that needs them is touched."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for `package`, whose public names are `exports` ({module: names
    it defines}; a name that is the module's own last part is the submodule itself). A name is
    imported once, on first access, then kept in the package's namespace."""
    source = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> object:
        if name not in source:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(source[name])
        value = module if source[name] == f"{package}.{name}" else getattr(module, name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(source))

    return __getattr__, __dir__
