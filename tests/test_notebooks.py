"""Execute the worked-example notebooks and check what they print.

``notebooks/quickstart.ipynb`` runs in its small configuration (``AMP_NOTEBOOK_SMALL=1``: d = 60),
headless (``MPLBACKEND=Agg``; matplotlib is optional: without it the notebook skips its figures).
Its last cell (tagged ``summary``) prints one JSON line; the checks below read it.  The kernel is
always the interpreter running the tests, so the notebook sees the package under test.
"""

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
QUICKSTART = NOTEBOOKS / "quickstart.ipynb"


def _use_this_interpreter(monkeypatch, tmp_path):
    """Make the ``python3`` kernel spec launch ``sys.executable``.

    jupyter_client finds ``python3`` in the Jupyter data dirs, or falls back to ipykernel's native
    spec (which is ``sys.executable``).  A spec whose ``argv[0]`` is a bare ``python``/``python3``
    is also run with ``sys.executable``.  A spec that points to another interpreter (e.g. a
    user-wide install) is shadowed by a temporary copy of ipykernel's native spec, put first on
    ``JUPYTER_PATH`` for this test only (nothing is installed).
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    except NoSuchKernel:
        argv0 = None
    bare = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    if argv0 in bare or (argv0 is not None and os.path.abspath(argv0) == os.path.abspath(sys.executable)):
        return
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(tmp_path / "kernels" / "python3")
    path = os.environ.get("JUPYTER_PATH")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path) + (os.pathsep + path if path else ""))


def _summary(nb):
    """The JSON object printed by the cell tagged ``summary``."""
    cells = [c for c in nb.cells if "summary" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "exactly one cell must be tagged 'summary'"
    text = "".join(o.get("text", "") for o in cells[0].outputs
                   if o.output_type == "stream" and o.get("name") == "stdout")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines, "the summary cell printed nothing"
    return json.loads(lines[-1])


def test_quickstart_is_stored_without_outputs():
    nb = nbformat.read(QUICKSTART, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "store the notebook without outputs"


def test_quickstart_runs_and_matches_its_predictions(monkeypatch, tmp_path):
    monkeypatch.setenv("AMP_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    _use_this_interpreter(monkeypatch, tmp_path)
    nb = nbformat.read(QUICKSTART, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError if a cell fails

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    s = _summary(nb)
    cfg = s["config"]
    assert cfg["small"] and cfg["d"] == 60 and cfg["n"] == round(cfg["alpha"] * cfg["d"] ** 2)

    # AMP tracks its state evolution from the same initialisation (docs/theory.md §8.4, loosened for d = 60)
    amp, se = s["trajectory"]["mse_amp"], s["trajectory"]["mse_se"]
    assert len(amp) == len(se) == cfg["n_iter"]
    assert abs(amp[-1] - se[-1]) < 0.05
    assert max(abs(a - b) for a, b in zip(amp, se)) < 0.05
    assert amp[-1] < 0.25 * cfg["Q_star"]  # it learned something: S = 0 has mse = Q*

    fp = s["fixed_point"]
    assert fp["se_converged"] and fp["amp_converged"]
    assert abs(fp["mse_amp"] - fp["mse_se"]) < 0.05

    # spectrum of S_hat: the predicted zero atom (low rank) and the whole distribution
    sp = s["spectrum"]
    assert 0.0 < sp["zero_mass_predicted"] < 1.0
    assert abs(sp["zero_mass_predicted"] - sp["zero_mass_empirical"]) < 0.1
    assert abs(sp["zero_mass_predicted"] + sp["continuous_mass_predicted"] - 1.0) < 1e-2
    assert abs(sp["q_predicted"] - sp["q_empirical"]) < 0.1
    assert sp["cdf_distance"] < 0.1

    # Bayes-optimal error is a lower bound for ERM (docs/theory.md §8.5); zero above perfect recovery
    bo = s["bayes"]
    for al, b, e in zip(bo["alpha"], bo["mse_bayes"], bo["mse_erm_se"]):
        assert b <= e + 1e-6
        if al > bo["alpha_perfect_recovery"] * 1.2:
            assert b < 1e-6
