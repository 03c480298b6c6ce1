"""Whether trainval runs inside IPython (a Jupyter or Colab kernel, or the IPython console).

Two behaviours depend on it: the progress bar (``tqdm.auto``: a widget in a notebook, where stderr is not
a terminal) and a second Ctrl-C during ``fit``, which must not end the process when the process is the
user's kernel (it raises ``KeyboardInterrupt`` there instead).
"""

from __future__ import annotations

import sys
from typing import Any


def _shell() -> Any:
    ipython = sys.modules.get("IPython")  # never imported here: only a session that runs IPython has it
    if ipython is None:
        return None
    get_ipython = getattr(ipython, "get_ipython", None)
    return get_ipython() if callable(get_ipython) else None


def in_ipython() -> bool:
    """An IPython session (kernel or console) runs this process."""
    return _shell() is not None


def in_kernel() -> bool:
    """A Jupyter kernel (Jupyter, JupyterLab, VS Code, Colab) runs this process: its output is a notebook."""
    return getattr(_shell(), "kernel", None) is not None
