"""amp_attention.sweep: executors give bit-identical frames, cache and resume, I/O, CLI, validation."""

import importlib
import json
import warnings

import numpy as np
import pandas as pd
import pytest

from amp_attention.cli import main

# the module (``amp_attention.sweep`` may be shadowed by the function once exported at top level)
sw = importlib.import_module("amp_attention.sweep")
# tiny settings: square loss + linear channel (closed-form output side), few steps
SE_GRID = {"alpha": [0.1, 0.2, 0.3], "lam": [0.05, 0.1], "T": [2], "loss": ["square"], "channel": ["linear"],
           "n_mc": [2000], "max_iter": [15]}
# softmax channel: quasi-Monte Carlo averages; at n_mc = 20000 the parallel reduction of the test error
# rounds differently with 1 and 2 Numba threads (this grid fails without sweep's single-threaded points)
SE_SOFTMAX_GRID = {"alpha": [0.1, 0.3], "lam": [0.1], "T": [2], "loss": ["square", "cross_entropy"],
                   "channel": ["softmax"], "n_mc": [20000], "max_iter": [10]}
AMP_GRID = {"alpha": [0.3, 0.5], "d": [16], "T": [2], "loss": ["square"], "reg": ["frobenius"],
            "channel": ["linear"], "noise": [0.1], "max_iter": [8], "n_test": [200]}
VOLATILE = ["wall_time", "cached"]


def _same(a, b):
    pd.testing.assert_frame_equal(a.drop(columns=VOLATILE), b.drop(columns=VOLATILE), check_exact=True)


@pytest.fixture(scope="module")
def se_serial():
    return sw.sweep("se", SE_GRID, seeds=1, progress=False)


@pytest.fixture(scope="module")
def se_softmax_serial():
    return sw.sweep("se", SE_SOFTMAX_GRID, progress=False)


@pytest.fixture(scope="module")
def amp_serial():
    return sw.sweep("amp", AMP_GRID, seeds=2, progress=False)


def test_frame_layout(se_serial):
    df = se_serial
    assert len(df) == 6
    assert list(df.columns) == list(sw.PARAMETERS["se"]) + ["seed"] + sw.OUTPUT_COLUMNS + ["cached"]
    # grid order: the product in the grid's order, seeds innermost
    assert df["alpha"].tolist() == [0.1, 0.1, 0.2, 0.2, 0.3, 0.3]
    assert df["lam"].tolist() == [0.05, 0.1] * 3
    assert np.all(np.isfinite(df[["m", "q", "mse", "V", "A_hat", "m_hat", "q_hat", "test_error"]].to_numpy()))
    assert not df["cached"].any()


def test_se_chain_is_warm_started(se_serial):
    """A chain point equals state_evolution(..., init=previous converged fixed point), not a cold start."""
    import amp_attention as aa

    df = se_serial[se_serial["lam"] == 0.05].reset_index(drop=True)
    p = {**sw.PARAMETERS["se"], **{k: v[0] for k, v in SE_GRID.items()}, "alpha": 0.3}
    prev = df.iloc[1]
    init = (prev["m"], prev["q"], prev["V"]) if prev["converged"] else None
    seed = int(sw.point_seed("se", p, 0).generate_state(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter=15: not converged
        r = aa.state_evolution(0.3, 2, aa.SpectralLaw.wishart(0.5), aa.LinearChannel(0.0), "square", "nuclear",
                               0.05, n_mc=2000, max_iter=15, seed=seed, init=init)
    assert r.m == df.iloc[2]["m"] and r.mse == df.iloc[2]["mse"]


def test_processes_equal_serial(se_serial, se_softmax_serial, amp_serial):
    _same(se_serial, sw.sweep("se", SE_GRID, executor=2, progress=False))
    _same(se_softmax_serial, sw.sweep("se", SE_SOFTMAX_GRID, executor=2, progress=False))
    _same(amp_serial, sw.sweep("amp", AMP_GRID, seeds=2, executor="processes", jobs=2, progress=False))


def test_dask_local_cluster_equals_serial(se_serial, se_softmax_serial, amp_serial):
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        _same(se_serial, sw.sweep("se", SE_GRID, executor=client, progress=False))
        _same(se_softmax_serial, sw.sweep("se", SE_SOFTMAX_GRID, executor=client, progress=False))
        _same(amp_serial, sw.sweep("amp", AMP_GRID, seeds=2, executor=client, progress=False))
        # a scheduler address (a client is opened and closed by the sweep)
        _same(se_serial, sw.sweep("se", SE_GRID, executor=cluster.scheduler_address, progress=False))


def test_seeds_differ_and_depend_on_point_only(amp_serial):
    df = amp_serial
    a, b = df[df["seed"] == 0], df[df["seed"] == 1]
    assert not np.array_equal(a["mse"].to_numpy(), b["mse"].to_numpy())
    # a point's result does not depend on the other points of the grid
    one = sw.sweep("amp", {**AMP_GRID, "alpha": [0.5]}, seeds=2, progress=False)
    _same(df[df["alpha"] == 0.5].reset_index(drop=True), one)


def test_cache_resume_computes_only_missing(tmp_path, se_serial):
    cache = tmp_path / "cache"
    part = sw.sweep("se", {**SE_GRID, "lam": [0.05]}, cache=cache, progress=False)
    assert len(list(cache.glob("*.json"))) == 3 and not part["cached"].any()
    full = sw.sweep("se", SE_GRID, cache=cache, progress=False)
    assert len(list(cache.glob("*.json"))) == 6
    assert full["cached"].tolist() == [lam == 0.05 for lam in full["lam"]]
    _same(se_serial, full)
    again = sw.sweep("se", SE_GRID, cache=cache, progress=False)
    assert again["cached"].all()
    _same(se_serial, again)
    pd.testing.assert_series_equal(full["wall_time"], again["wall_time"])  # stored, not recomputed


def test_cache_resume_inside_a_chain(tmp_path, se_serial):
    """A chain with a missing middle point recomputes it from the cached warm start, bit for bit."""
    cache = tmp_path / "cache"
    sw.sweep("se", SE_GRID, cache=cache, progress=False)
    p = {**sw.PARAMETERS["se"], **{k: v[0] for k, v in SE_GRID.items()}, "alpha": 0.2}
    (cache / f"{sw._cache_key('se', p, 0, [0.1])}.json").unlink()
    df = sw.sweep("se", SE_GRID, cache=cache, progress=False)
    assert (~df["cached"]).sum() == 1
    _same(se_serial, df)


def test_cache_key_includes_the_warm_start(tmp_path):
    """A chain with a new smaller alpha recomputes the points above it (their warm start changed)."""
    cache = tmp_path / "cache"
    sw.sweep("se", {**SE_GRID, "alpha": [0.2, 0.3]}, cache=cache, progress=False)
    df = sw.sweep("se", {**SE_GRID, "alpha": [0.1, 0.2, 0.3]}, cache=cache, progress=False)
    assert not df["cached"].any()
    df = sw.sweep("se", {**SE_GRID, "alpha": [0.1, 0.2]}, cache=cache, progress=False)
    assert df["cached"].all()


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_file_round_trip(tmp_path, amp_serial, suffix):
    path = tmp_path / f"out{suffix}"
    sw.write_sweep(amp_serial, path)
    back = sw.read_sweep(path)
    pd.testing.assert_frame_equal(amp_serial, back, check_exact=True)


def test_cli_writes_the_file_it_is_asked_for(tmp_path, capsys):
    out = tmp_path / "se.csv"
    main(["sweep", "--kind", "se", "--alpha", "0.1:0.3:3", "--lam", "0.05,0.1", "--loss", "square",
          "--channel", "linear", "--n-mc", "2000", "--iters", "15", "--out", str(out), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert res["rows"] == 6 and out.exists()
    df = sw.read_sweep(out)
    assert df["alpha"].tolist() == [0.1, 0.1, 0.2, 0.2, 0.3, 0.3]
    assert df["lam"].tolist() == [0.05, 0.1] * 3


def test_cli_bad_input_exits_2(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--kind", "bayes_se", "--loss", "square", "--out", str(tmp_path / "x.csv")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--alpha", "0.1", "--out", str(tmp_path / "x.txt")])
    assert e.value.code == 2


def test_validation():
    with pytest.raises(ValueError, match="unknown kind 'nope'"):
        sw.sweep("nope", {"alpha": [0.1]})
    with pytest.raises(ValueError, match="alfa"):
        sw.sweep("se", {"alfa": [0.1]})
    with pytest.raises(ValueError, match="empty list of values for parameter 'lam'"):
        sw.sweep("se", {"alpha": [0.1], "lam": []})
    with pytest.raises(ValueError, match="channel"):
        sw.sweep("se", {"channel": ["cubic"]})
    with pytest.raises(ValueError, match="executor"):
        sw.sweep("se", {"alpha": [0.1], "n_mc": [2000], "max_iter": [2]}, executor="nonsense", progress=False)


def test_se_acceleration_parameter(tmp_path):
    """The SE kinds' ``acceleration`` ('anderson', the default, or 'none': the keyword None) reaches
    the state evolution, keeps its fixed point, and survives a CSV round trip."""
    import amp_attention as aa

    grid = {"alpha": [0.3], "lam": [0.1], "loss": ["square"], "reg": ["frobenius"], "channel": ["linear"],
            "noise": [0.1], "max_iter": [2000], "tol": [1e-12], "acceleration": ["anderson", "none"]}
    df = sw.sweep("se", grid, progress=False)
    assert sw.PARAMETERS["se"]["acceleration"] == sw.PARAMETERS["bayes_se"]["acceleration"] == "anderson"
    assert df["acceleration"].tolist() == ["anderson", "none"] and df["converged"].all()
    for _, row in df.iterrows():
        r = aa.state_evolution(0.3, 2, aa.SpectralLaw.wishart(0.5), aa.LinearChannel(0.1), "square", "frobenius",
                               0.1, max_iter=2000, tol=1e-12, acceleration=None if row["acceleration"] == "none"
                               else "anderson")
        assert row["n_iter"] == r.n_iter and row["m"] == r.m
    assert df["n_iter"][0] < df["n_iter"][1] and abs(df["mse"][0] - df["mse"][1]) < 1e-10
    sw.write_sweep(df, tmp_path / "a.csv")
    pd.testing.assert_frame_equal(df, sw.read_sweep(tmp_path / "a.csv"), check_exact=True)
    bayes = sw.sweep("bayes_se", {"alpha": [0.25], "acceleration": ["anderson", "none"], "n_mc": [2000]},
                     progress=False)
    assert bayes["n_iter"][0] < bayes["n_iter"][1] and abs(bayes["mse"][0] - bayes["mse"][1]) < 1e-8
    for bad in (None, "fast"):
        with pytest.raises(ValueError, match="acceleration"):
            sw.sweep("se", {"acceleration": [bad]})
    with pytest.raises(ValueError, match="acceleration"):
        sw.sweep("amp", {"acceleration": ["none"]})


def test_se_precision_parameter_and_stderr_columns(tmp_path, amp_serial):
    """``precision`` (0: none) reaches the SE; ``stderr_*`` are the SE's error estimate of its fixed
    point (NaN for kinds without one); both survive a CSV round trip."""
    import amp_attention as aa

    r = aa.state_evolution(0.5, 2, aa.SpectralLaw.wishart(0.5), aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear",
                           0.01, n_mc=65_536)
    target = float(f"{r.stderr['V'] / 3:.3g}")
    df = sw.sweep("se", {"alpha": [0.5], "lam": [0.01], "n_mc": [65_536], "precision": [0.0, target]}, progress=False)
    assert sw.PARAMETERS["se"]["precision"] == 0.0 and df["converged"].all()
    for k in ("m", "q", "V", "mse"):
        assert df[f"stderr_{k}"][0] == pytest.approx(r.stderr[k], rel=1e-6)
        assert df[f"stderr_{k}"][1] <= target
    assert "precision" not in df["message"][0] and f"precision {target:g} reached" in df["message"][1]
    assert amp_serial[["stderr_m", "stderr_q", "stderr_V", "stderr_mse"]].isna().all().all()
    sw.write_sweep(df, tmp_path / "p.csv")
    pd.testing.assert_frame_equal(df, sw.read_sweep(tmp_path / "p.csv"), check_exact=True)
    with pytest.raises(ValueError, match="precision"):
        sw.sweep("se", {"precision": [-1e-4]}, progress=False)


def test_point_seed_depends_on_point_not_order():
    p = dict(sw.PARAMETERS["se"])
    a = sw.point_seed("se", p, 0).generate_state(2)
    b = sw.point_seed("se", dict(reversed(list(p.items()))), 0).generate_state(2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, sw.point_seed("se", p, 1).generate_state(2))
    assert not np.array_equal(a, sw.point_seed("se", {**p, "alpha": 0.31}, 0).generate_state(2))


def test_progress_is_plain_lines_off_a_terminal():
    import io

    buf = io.StringIO()
    bar = sw.progress_bar(total=3, desc="x", file=buf)
    for _ in range(3):
        bar.update(1)
    bar.close()
    text = buf.getvalue()
    assert "\r" not in text and "3/3" in text and text.endswith("\n")


def test_cli_version(capsys):
    import amp_attention

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert amp_attention.__version__ in capsys.readouterr().out


def test_cli_spectrum_json(capsys):
    """Predicted spectrum (zero atom + one interval for a low-rank teacher) next to AMP's eigenvalues."""
    main(["spectrum", "--alpha", "0.3", "--teacher", "lowrank", "--rank", "2", "--loss", "square",
          "--channel", "linear", "--n-mc", "2000", "--d", "40", "--iters", "60", "--json"])
    out = json.loads(capsys.readouterr().out)
    pred, emp = out["predicted"], out["empirical"]
    assert pred["zero_atom_mass"] == pytest.approx(38 / 40, abs=1e-6)  # the exact spectrum at d = 40
    assert len(pred["bulk"]) == 1 and pred["bulk"][0]["mass"] == pytest.approx(2 / 40, rel=0.01)
    assert len(emp["eigenvalues"]) == 40 and emp["ks_distance"] < 0.1


def test_cli_thresholds_json(capsys):
    import amp_attention as aa

    main(["thresholds", "--which", "bayes", "--T", "2", "--channel", "softmax", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["bayes"]["found"]
    assert out["bayes"]["alpha"] == pytest.approx(aa.perfect_recovery_threshold(0.5, 2), rel=1e-3)
    assert out["counting_bound"] == aa.perfect_recovery_threshold(0.5, 2)
    assert "bayes" not in capsys.readouterr().err  # --json: no progress


def test_cli_thresholds_reports_progress_per_se_run(capsys):
    """Without --json, every threshold search shows a progress line on stderr (a search of many SE
    runs can take minutes), ending with the number of SE runs it made."""
    main(["thresholds", "--which", "bayes", "--T", "2", "--channel", "softmax"])
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if "bayes" in ln and "SE run" in ln]
    assert lines, captured.err
    assert "alpha=" in lines[-1] and "criterion=" in lines[-1]
    assert "bayes" in captured.out
