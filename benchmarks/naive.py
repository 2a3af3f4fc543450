"""Naive materialised-einsum sensing operator (the baseline of docs/theory.md §10).

This is how published research code applies the attention sensing operator: it materialises the
full sensing tensor, of shape ``(n, T, T, d, d)`` or ``(n, d, d, T, T)`` (``LAYOUTS``)::

    Z[mu, a, b] = (x_a x_b^T - delta_ab I) / sqrt(d)

and contracts it with einsum::

    forward   H = einsum('nabij,ij->nab', Z, S)
    adjoint   M = sym(einsum('nab,nabij->ij', G, Z))

Memory is ``8 n T^2 d^2`` bytes (1.6 GB at d = 100, T = 2, n = d^2 / 2; 8 GB at d = 150) - use
:func:`naive_bytes` / :func:`fits` before building.  ``optimize=True`` (the default here) lets
einsum dispatch the contractions to BLAS; with the (n, T, T, d, d) layout that needs no copy, the
strongest version of the baseline.  With the (n, d, d, T, T) layout of docs/theory.md §10 the
BLAS dispatch first copies the whole tensor into another order, so plain einsum (``optimize=False``,
NumPy's default) is the faster choice there.

Run ``python benchmarks/naive.py`` to check it against ``amp_attention`` and time it on small sizes.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as a script: apply --threads before numpy loads BLAS
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common  # noqa: F401

import numpy as np  # noqa: E402

DEFAULT_CAP_BYTES = 6 * 1024**3


def naive_bytes(n: int, T: int, d: int) -> int:
    """Bytes the naive operator needs: the sensing tensor plus (small) H, G, S, M."""
    return 8 * (n * T * T * d * d + 2 * n * T * T + 2 * d * d)


def available_bytes() -> int | None:
    """Memory available to this process (``amp_attention._validation.available_memory``)."""
    from amp_attention._validation import available_memory

    return available_memory()


def fits(n: int, T: int, d: int, cap_bytes: int = DEFAULT_CAP_BYTES) -> bool:
    """True if the sensing tensor fits under ``cap_bytes`` and under 80% of available memory."""
    need = naive_bytes(n, T, d)
    avail = available_bytes()
    return need <= cap_bytes and (avail is None or need <= 0.8 * avail)


def max_samples(T: int, d: int, cap_bytes: int = DEFAULT_CAP_BYTES) -> int:
    """Largest n whose sensing tensor fits (for sub-sampled, linearly extrapolated timings)."""
    per = 8 * (T * T * d * d + 2 * T * T)
    avail = available_bytes()
    cap = min(cap_bytes, 0.8 * avail) if avail is not None else cap_bytes
    return max(0, int((cap - 16 * d * d) // per))


#: Memory layouts of the sensing tensor: ``'nabij'`` = (n, T, T, d, d) (the d x d blocks contiguous,
#: so einsum's BLAS dispatch applies without copies: the strongest baseline) and ``'nijab'`` =
#: (n, d, d, T, T), the layout docs/theory.md §10 names (the T x T blocks contiguous).
LAYOUTS = ("nabij", "nijab")


def build_sensing(X: np.ndarray, layout: str = "nabij") -> np.ndarray:
    """``Z[mu, a, b] = (x_a x_b^T - delta_ab I) / sqrt(d)`` in the given layout (see LAYOUTS)."""
    n, T, d = X.shape
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    Z = np.einsum(f"nai,nbj->{layout}", X, X)
    idx = np.arange(d)
    for a in range(T):
        if layout == "nabij":
            Z[:, a, a, idx, idx] -= 1.0
        else:
            Z[:, idx, idx, a, a] -= 1.0
    Z *= 1.0 / np.sqrt(d)
    return Z


def forward(Z: np.ndarray, S: np.ndarray, optimize=True, layout: str = "nabij") -> np.ndarray:
    """``H = einsum('nabij,ij->nab', Z, S)`` (or its 'nijab' form), shape (n, T, T)."""
    return np.einsum(f"{layout},ij->nab", Z, S, optimize=optimize)


def adjoint(Z: np.ndarray, G: np.ndarray, optimize=True, layout: str = "nabij") -> np.ndarray:
    """``M = sym(einsum('nab,nabij->ij', G, Z))`` (or its 'nijab' form), shape (d, d)."""
    M = np.einsum(f"nab,{layout}->ij", G, Z, optimize=optimize)
    return 0.5 * (M + M.T)


def main(argv=None):
    import _common as C

    import amp_attention as aa

    p = C.make_parser("Naive materialised-einsum operator: correctness check and timings.")
    args = p.parse_args(argv)
    sizes = [(20, 2), (40, 2), (40, 3)] if args.quick else [(20, 2), (40, 2), (40, 3), (60, 2), (60, 3), (80, 2)]
    repeats = args.repeats or 3
    rng = np.random.default_rng(0)
    rows = []
    for d, T in sizes:
        n = int(round(0.5 * d * d))
        if not fits(n, T, d):
            continue
        X = rng.standard_normal((n, T, d))
        W = rng.standard_normal((d, d))
        S = (W + W.T) / 2
        G = rng.standard_normal((n, T, T))
        row = dict(d=d, T=T, n=n, mem=naive_bytes(n, T, d))
        H_ref, M_ref = aa.preactivations(X, S), aa.backproject(X, G)
        for layout in LAYOUTS:
            Z = build_sensing(X, layout)
            err_H = np.max(np.abs(forward(Z, S, layout=layout) - H_ref)) / np.max(np.abs(H_ref))
            err_M = np.max(np.abs(adjoint(Z, G, layout=layout) - M_ref)) / np.max(np.abs(M_ref))
            row[f"err_{layout}"] = max(err_H, err_M)
            for opt in (True, False):
                row[f"fwd_{layout}_{opt}"] = C.timeit(lambda: forward(Z, S, opt, layout), repeats, clock=args.clock)["median"]
                row[f"adj_{layout}_{opt}"] = C.timeit(lambda: adjoint(Z, G, opt, layout), repeats, clock=args.clock)["median"]
            Z = None  # free the tensor before the next one
        row["build"] = C.timeit(lambda: build_sensing(X), repeats, warmup=0, clock=args.clock)["median"]
        rows.append(row)
    cols = [("d", "d", "d"), ("T", "T", "d"), ("n", "n", "d"), ("mem", "tensor", C.fmt_bytes), ("build", "build[s]", ".4f")]
    for layout in LAYOUTS:
        for opt, tag in ((True, "opt"), (False, "plain")):
            cols += [(f"fwd_{layout}_{opt}", f"fwd {layout} {tag}", ".4f"), (f"adj_{layout}_{opt}", f"adj {layout} {tag}", ".4f")]
        cols.append((f"err_{layout}", f"relerr {layout}", ".1e"))
    C.print_table(rows, cols)
    path = C.write_json("naive", {"quick": args.quick, "rows": rows}, args.out)
    print(f"wrote {path}")
    bad = [r for r in rows if max(r[f"err_{layout}"] for layout in LAYOUTS) > 1e-10]
    if bad:
        raise SystemExit(f"naive operator disagrees with amp_attention: {bad}")


if __name__ == "__main__":
    main()
