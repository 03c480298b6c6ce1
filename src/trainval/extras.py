"""Optional packages: which extra of ``pip install 'trainval[...]'`` brings each, and one clear error when
a feature needs one that is missing.

The library itself needs only torch, NumPy, PyYAML and tqdm. Everything else is an extra, imported where a
feature uses it (``make`` installs them all):

=============  =====================  ==================================================================
extra          packages               features
=============  =====================  ==================================================================
``digits``     scikit-learn           the default data set (scikit-learn's bundled 8x8 digits)
``plot``       matplotlib             ``curves.png`` at the end of a fit, ``trainval runs --plot``
``tabular``    pandas, pyarrow        DataFrames, the fast CSV reader
``images``     Pillow                 ``data.source=images``
``hf``         datasets               Hugging Face datasets passed to ``fit``
=============  =====================  ==================================================================
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from trainval.errors import ConfigError

# module imported -> (package to install, the extra that brings it)
EXTRAS: dict[str, tuple[str, str]] = {
    "sklearn": ("scikit-learn", "digits"),
    "matplotlib": ("matplotlib", "plot"),
    "pandas": ("pandas", "tabular"),
    "pyarrow": ("pyarrow", "tabular"),
    "PIL": ("Pillow", "images"),
    "datasets": ("datasets", "hf"),
    "tensorboard": ("tensorboard", "tensorboard"),
}


def available(module: str) -> bool:
    """Whether ``module`` (a top-level package name) can be imported, without importing it."""
    return importlib.util.find_spec(module) is not None


def missing_line(module: str, feature: str) -> str:
    """The sentence that says ``feature`` needs ``module``'s package, and how to install it."""
    package, extra = EXTRAS[module]
    return f"{feature} needs {package}, which is not installed: pip install 'trainval[{extra}]'"


def require(module: str, feature: str) -> ModuleType:
    """``module`` imported, or a ConfigError saying that ``feature`` needs it and which extra brings it."""
    top = module.partition(".")[0]
    if not available(top):
        raise ConfigError(missing_line(top, feature) + ".")
    return importlib.import_module(module)
