"""klkern: KL-Shampoo, KL-SOAP, SOAP and Shampoo for PyTorch.

    import klkern
    opt = klkern.KLShampoo(model.parameters(), lr=3e-3)

``klkern.reference`` is the literal transcription of the specification that
the tests compare against; ``klkern.linalg`` holds the QR and
eigendecomposition conventions.
"""

from . import analysis, linalg, reference
from .optimizers import KLSOAP, SOAP, KLShampoo, Shampoo

__all__ = ["KLShampoo", "KLSOAP", "SOAP", "Shampoo", "analysis", "linalg", "reference"]
__version__ = "0.1.0"
