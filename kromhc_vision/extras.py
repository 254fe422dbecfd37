"""The optional dependencies (``pip install 'kromhc_vision[figures,digits]'``), imported where they are used."""
import importlib

EXTRAS = {"matplotlib": "figures", "sklearn": "digits"}
PURPOSES = {"matplotlib": "the figures (eval.py --diagnostics, compare.py)",
            "sklearn": "the embedded digits dataset (the default data of train.py and eval.py)"}


def pyplot():
    """``matplotlib.pyplot`` on the Agg (file-only) backend, or an ImportError naming the extra to install."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def require(module: str):
    """Import ``module`` (a key of :data:`EXTRAS`), or raise an ImportError that says which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{PURPOSES[module]} need {module!r}, which is not installed: "
                          f"pip install 'kromhc_vision[{EXTRAS[module]}]' ({e})") from e
