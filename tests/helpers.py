"""Small references shared by the tests (not part of the package)."""

import numpy as np


def sym_basis(d):
    """Orthonormal basis of Sym_d under the Frobenius inner product: shape (d(d+1)/2, d, d)."""
    E = []
    for i in range(d):
        for j in range(i, d):
            B = np.zeros((d, d))
            if i == j:
                B[i, i] = 1.0
            else:
                B[i, j] = B[j, i] = 1.0 / np.sqrt(2.0)
            E.append(B)
    return np.array(E)
