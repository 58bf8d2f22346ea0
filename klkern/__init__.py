"""klkern: KL-Shampoo, KL-SOAP, SOAP and Shampoo for PyTorch.

    import klkern
    opt = klkern.KLShampoo(model.parameters(), lr=3e-3)

``klkern.reference`` is the literal transcription of the specification that
the tests compare against; ``klkern.linalg`` holds the QR and
eigendecomposition conventions; ``klkern.check()`` (or ``python -m
klkern.check``) runs every available path against the reference.
"""

from . import analysis, linalg, reference
from .optimizers import KLSOAP, SOAP, KLShampoo, Shampoo

__all__ = ["KLShampoo", "KLSOAP", "SOAP", "Shampoo", "analysis", "check", "linalg", "reference"]
__version__ = "0.1.0"


def __getattr__(name):
    # klkern.check is imported on first use, so that `python -m klkern.check` runs it fresh.
    if name == "check":
        import importlib

        return importlib.import_module(".check", __name__)
    raise AttributeError(f"module 'klkern' has no attribute {name!r}")
