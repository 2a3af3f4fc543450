"""Fuzz campaign of issue 12 for the ``amp-attention`` command (amp_attention/cli.py).

Hypothesis draws argument lists for every subcommand (run, se, bench, sweep, spectrum, thresholds):
valid small runs, bad values (NaN, inf, negative, zero, huge, words, empty comma items, malformed
``start:stop:num``), unknown options and unwritable ``--out`` paths.  Every one must end, through
:func:`fuzz.cli_outcome`, in exit 0 (with exactly one parseable JSON object on stdout when ``--json``
is given) or in a non-zero exit with one line ``amp-attention CMD: error: ...`` on stderr, never a
traceback.  Real computations stay tiny (d <= 6, at most 5 iterations, n_mc <= 400).

Iteration counts (``--iters``, ``--repeats``) are not drawn huge: a huge count is a valid request
for a long run, not a bad input.  ``--scheduler`` is not drawn (it would connect to an address).
"""

from __future__ import annotations

import collections
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz import cli_outcome, examples

#: outcome counts of this module's draws: (subcommand, "ok" | "error")
OUTCOMES = collections.Counter()

TINY = {"run": ["--d", "4", "--iters", "3", "--n-mc", "200"],
        "se": ["--alpha", "0.2", "--iters", "3", "--n-mc", "200"],
        "bench": ["--d", "4", "--T", "2", "--repeats", "1"],
        "sweep": ["--kind", "se", "--alpha", "0.2", "--iters", "3", "--n-mc", "200"],
        "spectrum": ["--iters", "3", "--n-mc", "200"],
        "thresholds": ["--which", "bayes", "--n-mc", "200"]}

#: the numeric options of each subcommand
NUMERIC = {
    "run": ["--d", "--T", "--alpha", "--rho", "--gamma", "--rank", "--beta", "--noise", "--lam", "--damping",
            "--iters", "--tol", "--n-mc", "--seed"],
    "se": ["--T", "--alpha", "--rho", "--beta", "--noise", "--lam", "--damping", "--d", "--iters", "--tol", "--n-mc",
           "--seed"],
    "bench": ["--d", "--T", "--alpha", "--repeats", "--seed"],
    "sweep": ["--alpha", "--T", "--rho", "--gamma", "--rank", "--beta", "--noise", "--lam", "--damping", "--d",
              "--iters", "--tol", "--n-mc", "--n-test", "--seeds", "--jobs"],
    "spectrum": ["--T", "--alpha", "--rho", "--beta", "--noise", "--lam", "--damping", "--d", "--iters", "--tol",
                 "--n-mc", "--outlier-mass", "--seed"],
    "thresholds": ["--T", "--alpha", "--rho", "--beta", "--noise", "--lam", "--lo", "--hi", "--d", "--n-mc",
                   "--seed"],
}
ITERATION_COUNTS = {"--iters", "--repeats"}

BAD = ["nan", "NaN", "inf", "-inf", "-1", "-0.5", "0", "-0.0", "1e-320", "abc", "", " ", ",", "1,,2", ",3",
       "0:1:0", "1:2", "a:b:3", "1:2:x", "1:2:1e9", "0x10", "1e400", "--", "1.5", "2.5e0", "-1e300"]
HUGE = ["1e15", "1e300", "1e308", "123456789012345678901234567890"]


def _check(cmd, argv):
    code, out, err = cli_outcome(argv)
    if code == 0:
        if "--json" in argv and not any(a in ("-h", "--help", "--version") for a in argv):
            lines = [ln for ln in out.splitlines() if ln.strip()]
            assert len(lines) == 1, f"{argv}: --json must print exactly one line on stdout, got {out!r}"
            json.loads(lines[0])  # parseable (the CLI dumps with allow_nan=False)
        OUTCOMES[(cmd, "ok")] += 1
    else:
        last = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(" ")][-1]
        assert last.startswith("amp-attention") and ": error: " in last, f"{argv}: {last!r}"
        OUTCOMES[(cmd, "error")] += 1
    return code, out, err


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    rep = request.config.pluginmanager.get_plugin("terminalreporter")
    cap = request.config.pluginmanager.get_plugin("capturemanager")
    if rep is not None and cap is not None and OUTCOMES:
        total = sum(OUTCOMES.values())
        with cap.global_and_fixture_disabled():
            rep.write_line(f"\ntest_fuzz_cli: {total} argument lists: " +
                           ", ".join(f"{c} {k}={v}" for (c, k), v in sorted(OUTCOMES.items())))


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_cli")


# --------------------------------------------------------------------------------------------
# valid small runs
# --------------------------------------------------------------------------------------------

small_alpha = st.sampled_from(["0.05", "0.2", "0.5", "1", "1e-9"])
model = st.fixed_dictionaries({
    "--T": st.sampled_from(["2", "3"]),
    "--teacher": st.sampled_from(["wishart", "powerlaw", "lowrank"]),
    "--rho": st.sampled_from(["0.1", "0.5", "2", "50"]),
    "--beta": st.sampled_from(["0.5", "1", "4"]),
    "--noise": st.sampled_from(["0", "0.1", "1"]),
    "--loss": st.sampled_from(["cross_entropy", "square", "softmax_square"]),
    "--reg": st.sampled_from(["nuclear", "frobenius"]),
    "--lam": st.sampled_from(["0", "0.01", "0.5"]),
    "--damping": st.sampled_from(["auto", "0", "0.5"]),
})
channel = st.sampled_from(["softmax", "linear"])


def _flat(d):
    return [x for k, v in d.items() for x in (k, v)]


@settings(max_examples=examples(ci=10, thorough=120))
@given(cmd=st.sampled_from(["run", "se", "spectrum"]), m=model, ch=channel, alpha=small_alpha,
       d=st.integers(2, 6), iters=st.integers(1, 5), estimator=st.sampled_from(["erm", "bayes"]),
       variance=st.sampled_from(["sample", "scalar"]))
def test_valid_small_runs_succeed_or_refuse_in_one_line(cmd, m, ch, alpha, d, iters, estimator, variance):
    """Valid small runs: exit 0 with one JSON object, or a one-line error (e.g. the Bayes-optimal SE
    of a noisy softmax channel is not implemented; d too small for the sample variances)."""
    argv = [cmd, "--alpha", alpha, "--iters", str(iters), "--n-mc", "200", "--channel", ch,
            "--estimator", estimator, "--json"] + _flat(m)
    if cmd != "se":
        argv += ["--variance", variance]
    if cmd == "run" or (cmd == "spectrum" and d % 2):
        argv += ["--d", str(d)]
    _check(cmd, argv)


@settings(max_examples=examples(ci=6, thorough=60))
@given(d=st.integers(2, 6), T=st.sampled_from(["2", "3"]), alpha=st.sampled_from(["0.1", "0.3"]),
       iters=st.integers(1, 5), lam=st.sampled_from(["0.01", "0.1"]))
def test_surely_valid_runs_exit_0(d, T, alpha, iters, lam):
    """Cross-entropy ERM on softmax data with d(d+1)/2 >= K: always a result (exit 0, finite JSON)."""
    if d * (d + 1) // 2 < int(T) * (int(T) + 1) // 2:
        d = 3
    code, out, err = _check("run", ["run", "--d", str(d), "--T", T, "--alpha", alpha, "--iters", str(iters),
                                    "--lam", lam, "--n-mc", "200", "--json"])
    assert code == 0, err
    res = json.loads(out)
    assert res["params"]["d"] == d and res["amp"]["n_iter"] <= iters


@settings(max_examples=examples(ci=8, thorough=60))
@given(kind=st.sampled_from(["se", "bayes_se", "amp", "erm", "bayes_amp"]), d=st.integers(2, 5),
       alphas=st.lists(st.sampled_from(["0.1", "0.2", "0.4"]), min_size=1, max_size=2),
       iters=st.integers(1, 4), seeds=st.integers(1, 2), suffix=st.sampled_from([".csv", ".json"]),
       rng=st.sampled_from(["", "0.1:0.3:2"]))
def test_sweep_small(kind, d, alphas, iters, seeds, suffix, rng, outdir):
    out = outdir / f"sweep{suffix}"
    argv = ["sweep", "--kind", kind, "--alpha", rng or ",".join(alphas), "--iters", str(iters),
            "--seeds", str(seeds), "--out", str(out), "--json"]
    argv += ["--d", str(d), "--n-test", "20"] if kind in ("amp", "erm", "bayes_amp") else ["--n-mc", "200"]
    code, stdout, err = _check("sweep", argv)
    assert code == 0, err
    n_alpha = 2 if rng else len(alphas)
    assert json.loads(stdout)["rows"] == n_alpha * seeds and out.exists()


@settings(max_examples=examples(ci=3, thorough=20))
@given(ds=st.lists(st.integers(2, 6), min_size=1, max_size=2), T=st.sampled_from(["2", "3"]))
def test_bench_small(ds, T):
    code, out, err = _check("bench", ["bench", "--d", ",".join(map(str, ds)), "--T", T, "--alpha", "0.3",
                                      "--repeats", "1", "--json"])
    if int(T) == 2 or min(ds) >= 3:
        assert code == 0, err
        assert [r["d"] for r in json.loads(out)["rows"]] == ds


@settings(max_examples=examples(ci=3, thorough=20))
@given(which=st.lists(st.sampled_from(["recovery", "interpolation", "bayes"]), min_size=1, max_size=2, unique=True),
       ch=channel)
def test_thresholds_small(which, ch):
    if "recovery" in which:  # the noiseless linear recovery threshold takes ~20 s to bracket: not here
        ch = "softmax"
    _check("thresholds", ["thresholds", "--which", ",".join(which), "--channel", ch, "--n-mc", "200",
                          "--lo", "0.05", "--hi", "0.8", "--json"])


# --------------------------------------------------------------------------------------------
# bad values, unknown options, unwritable files
# --------------------------------------------------------------------------------------------


@st.composite
def bad_argv(draw):
    cmd = draw(st.sampled_from(list(NUMERIC)))
    option = draw(st.sampled_from(NUMERIC[cmd]))
    values = BAD + ([] if option in ITERATION_COUNTS else HUGE)
    value = draw(st.sampled_from(values) | st.text(max_size=6))
    argv = [cmd] + list(TINY[cmd]) + [option, value, "--json"]
    if cmd == "sweep":
        argv += ["--out", "/tmp/amp_attention_fuzz_cli_never_written.csv"]
    return cmd, option, value, argv


@settings(max_examples=examples(ci=40, thorough=250))
@given(case=bad_argv())
def test_bad_values(case, outdir):
    cmd, option, value, argv = case
    if cmd == "sweep":
        argv[argv.index("--out") + 1] = str(outdir / "bad.csv")
    code, out, err = _check(cmd, argv)
    if value.strip().lower() in ("nan", "inf", "-inf", "abc", "", ",", "1,,2", "0:1:0", "a:b:3", "1:2:x", "1e400"):
        assert code == 2, f"{argv} accepted {value!r}"
        assert option in err or "argument" in err or value in err, err


@settings(max_examples=examples(ci=6, thorough=40))
@given(cmd=st.sampled_from(list(TINY) + [""]),
       name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_", min_size=1, max_size=8))
def test_unknown_options(cmd, name):
    import argparse

    from amp_attention.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd or "run"]
    options = [o for p in (parser, sub) for a in p._actions for o in a.option_strings]
    if any(o.startswith(f"--{name}") for o in options):  # an option or an abbreviation argparse accepts
        name = "bogus-option"
    argv = ([cmd] + TINY[cmd] if cmd else []) + [f"--{name}", "1"]
    if cmd == "sweep":
        argv += ["--out", "/nonexistent-dir/x.csv"]
    code, _, err = _check(cmd or "run", argv)
    assert code == 2


@pytest.mark.parametrize("where", ["missing_dir", "is_dir", "under_file", "bad_suffix", "cache_is_file"])
def test_unwritable_out(where, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "dir.csv").mkdir()
    out = {"missing_dir": tmp_path / "no" / "x.csv", "is_dir": tmp_path / "dir.csv",
           "under_file": tmp_path / "file.txt" / "x.csv", "bad_suffix": tmp_path / "x.txt",
           "cache_is_file": tmp_path / "ok.csv"}[where]
    argv = ["sweep"] + TINY["sweep"] + ["--out", str(out), "--json"]
    if where == "cache_is_file":
        argv += ["--cache", str(tmp_path / "file.txt")]
    code, _, err = _check("sweep", argv)
    assert code != 0 and "error: " in err


# --------------------------------------------------------------------------------------------
# the reproducers of issue 12
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,option", [
    (["run", "--d", "100000"], "--d"),
    (["run", "--alpha", "1e15"], "--alpha"),
    (["run", "--alpha", "1e300", "--d", "1000"], "--alpha"),
    (["run", "--rho", "1e9"], "--rho"),
    (["bench", "--d", "100000"], "--d"),
    (["sweep", "--kind", "amp", "--alpha", "1e15", "--out", "/tmp/amp_attention_never_written.csv"], "--alpha"),
    (["se", "--teacher", "powerlaw", "--d", "10000000"], "--d"),
    (["se", "--n-mc", "1e15"], "--n-mc"),
])
def test_memory_is_estimated_before_allocating(argv, option):
    code, _, err = _check(argv[0], argv + ["--json"])
    assert code == 2
    assert "would need" in err and "GiB" in err and "available" in err and option in err, err


def test_d1_explains_the_sample_variance_or_runs():
    """``run --d 1``: K = 3 > d(d+1)/2 = 1; an error must say why and what to use instead (or, with a
    solver-side fallback, the run succeeds)."""
    code, out, err = _check("run", ["run", "--d", "1", "--iters", "3", "--n-mc", "200", "--json"])
    if code != 0:
        assert "--variance scalar" in err and "--d >= 2" in err, err
    code, out, err = _check("run", ["run", "--d", "1", "--iters", "3", "--n-mc", "200", "--variance", "scalar",
                                    "--json"])
    assert code == 0, err
    assert json.loads(out)["params"]["d"] == 1


def test_rho_large_but_affordable_is_a_result():
    code, out, err = _check("run", ["run", "--d", "4", "--rho", "1000", "--iters", "3", "--n-mc", "200", "--json"])
    assert code == 0, err
    assert json.loads(out)["final"]["mse"] is not None


def test_one_line_per_error_and_exit_codes(monkeypatch):
    """Whatever a subcommand raises, one line and the documented exit status (2 bad arguments,
    1 other failures, 130 interrupted); an unexpected exception type is reported as a bug."""
    from amp_attention import cli

    for exc, code, words in [(KeyboardInterrupt(), 130, "interrupted"), (MemoryError("x"), 1, "out of memory"),
                             (OverflowError("big"), 1, "overflow"), (FloatingPointError("fp"), 1, "overflow"),
                             (OSError(28, "No space left"), 1, "No space"), (TypeError("t\nu"), 1, "bug"),
                             (ValueError("bad\n value"), 2, "bad value"), (NotImplementedError("no"), 2, "no")]:
        def fail(args, exc=exc):
            raise exc

        monkeypatch.setattr(cli, "cmd_se", fail)  # build_parser binds cmd_se when main builds it
        c, _, err = _check("se", ["se"])
        assert c == code and words in err and err.startswith("amp-attention se: error: "), (exc, err)


def test_warnings_are_one_line(capsys):
    import warnings

    from amp_attention import cli

    show = cli.opt.one_line_warning("amp-attention run")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        warnings.warn("did not\nconverge", RuntimeWarning)
    err = capsys.readouterr().err
    assert err == "amp-attention run: warning: RuntimeWarning: did not converge\n"
