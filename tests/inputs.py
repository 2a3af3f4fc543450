"""Random inputs shared by the loss tests: targets and variance shapes (not references)."""

import numpy as np


def onehot_targets(rng, n, T):
    """One-hot rows ``(n, T, T)`` at uniformly random positions (hardmax-like targets)."""
    y = np.zeros((n, T, T))
    idx = rng.integers(0, T, size=(n, T))
    np.put_along_axis(y, idx[:, :, None], 1.0, axis=2)
    return y


def random_V(rng, n, K, kind, v=1.0):
    """V as 'scalar', shared '(K,K)', per-sample '(n,K,K)' SPD (any other kind), or per-sample 'diag'."""
    if kind == "scalar":
        return float(v)
    if kind == "shared":
        A = rng.standard_normal((K, K)) / np.sqrt(K)
        return v * (0.3 * np.eye(K) + A @ A.T)
    if kind == "diag":
        return v * np.einsum("ni,ij->nij", rng.uniform(0.2, 2.0, size=(n, K)), np.eye(K))
    A = rng.standard_normal((n, K, K)) / np.sqrt(K)
    return v * (0.3 * np.eye(K)[None] + A @ np.swapaxes(A, 1, 2))


def full_V(V, n, K):
    """Any of the V shapes above as an ``(n, K, K)`` (read-only broadcast) stack."""
    V = np.asarray(V, dtype=float)
    return np.broadcast_to(V * np.eye(K) if V.ndim == 0 else V, (n, K, K))
