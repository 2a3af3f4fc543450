"""The amp-attention command (docs/theory.md §9): --json prints exactly one JSON object."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from amp_attention.cli import main


def _json(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # fails unless stdout is exactly one JSON document


def test_run_json_has_amp_and_se_side_by_side(capsys):
    res = _json(capsys, ["run", "--d", "40", "--alpha", "0.4", "--iters", "6", "--tol", "0", "--n-mc", "5000", "--json"])
    assert set(res) == {"params", "amp", "se", "final"}
    for key in ("mse", "m", "q", "train_loss"):
        assert len(res["amp"][key]) == 6
    for key in ("mse", "m", "q"):
        assert len(res["se"][key]) == 6
    assert res["amp"]["n_iter"] == 6 and res["amp"]["converged"] is False
    assert res["amp"]["time_per_iter_s"] > 0
    assert res["params"]["n"] == 640 and res["params"]["lam"] == 0.05
    # AMP and its SE start from the same point and stay close even at d = 40
    assert abs(res["amp"]["mse"][-1] - res["se"]["mse"][-1]) < 0.1
    assert res["final"]["mse"] == res["amp"]["mse"][-1]
    assert 0 <= res["final"]["test_error"] < 2


def test_run_bayes_and_square_frobenius(capsys):
    res = _json(capsys, ["run", "--d", "40", "--iters", "4", "--estimator", "bayes", "--json"])
    assert len(res["amp"]["mse"]) == len(res["se"]["mse"]) == res["amp"]["n_iter"]
    res = _json(capsys, ["run", "--d", "30", "--iters", "5", "--loss", "square", "--reg", "frobenius",
                         "--channel", "linear", "--noise", "0.1", "--json"])
    assert res["amp"]["n_iter"] == 5


def test_run_human_table(capsys):
    assert main(["run", "--d", "30", "--iters", "3", "--n-mc", "2000"]) == 0
    out = capsys.readouterr().out
    assert "mse AMP" in out and "mse SE" in out and "final mse" in out


def test_se_json_curve_against_closed_form(capsys):
    """Square loss + Frobenius, linear channel: the SE fixed point has a closed form we can
    solve independently (scalar fixed point of the formulas of docs/theory.md §7)."""
    alphas = [0.1, 0.3]
    res = _json(capsys, ["se", "--alpha", ",".join(map(str, alphas)), "--loss", "square", "--reg", "frobenius",
                         "--channel", "linear", "--noise", "0.2", "--lam", "0.1", "--rho", "0.5", "--tol", "1e-12",
                         "--iters", "5000", "--json"])
    assert res["alpha"] == alphas
    assert set(res) >= {"alpha", "mse", "m", "q", "test_error", "train_loss"}
    K, Q, s2, lam = 3, 1.5, 0.2, 0.1
    for i, alpha in enumerate(alphas):
        m = q = 0.0
        V = 1.0
        for _ in range(20000):
            A = m_hat = 2 * alpha * K / (1 + 2 * V)
            q_hat = 4 * alpha * K * (Q - 2 * m + q + s2) / (1 + 2 * V) ** 2
            a, Delta = m_hat / A, q_hat / (2 * A * A)
            c = A / (A + lam)
            m, q, V = c * a * Q, c * c * (a * a * Q + Delta), c / (2 * A)
        assert abs(res["mse"][i] - (Q - 2 * m + q)) < 1e-8
        # the fixed point's variance and conjugates (enough to compute the spectrum of S_hat)
        A = 2 * alpha * K / (1 + 2 * V)
        q_hat = 4 * alpha * K * (Q - 2 * m + q + s2) / (1 + 2 * V) ** 2
        for key, want in (("V", V), ("A_hat", A), ("m_hat", A), ("q_hat", q_hat), ("a", 1.0),
                          ("Delta", q_hat / (2 * A * A))):
            assert res[key][i] == pytest.approx(want, rel=1e-7), key
        # linear channel: test error is E||h* - h_hat||_F^2 = 2 K mse (Monte Carlo)
        assert abs(res["test_error"][i] - 2 * K * (Q - 2 * m + q)) < 0.02 * 2 * K * (Q - 2 * m + q)


def test_se_bayes_json(capsys):
    res = _json(capsys, ["se", "--alpha", "0.05,0.3", "--estimator", "bayes", "--json"])
    assert res["mse"][0] > res["mse"][1] >= 0
    assert "train_loss" not in res and "train_objective" not in res
    # Nishimori line: A_hat = m_hat = q_hat, a = 1, V = mse
    for i in range(2):
        assert res["A_hat"][i] == pytest.approx(res["m_hat"][i], rel=1e-12)
        assert res["A_hat"][i] == pytest.approx(res["q_hat"][i], rel=1e-12)
        assert res["a"][i] == pytest.approx(1.0, rel=1e-12)
        assert res["V"][i] == pytest.approx(res["mse"][i], rel=1e-9)


def test_se_precision_option_and_the_error_estimate_in_the_output(capsys):
    """--precision: the SE grows its rule until the fixed point's error estimate (printed as
    stderr_m, stderr_q, stderr_V, stderr_mse) is below the target; the fixed point stays put."""
    argv = ["se", "--alpha", "0.5", "--lam", "0.01", "--n-mc", "65536", "--json"]
    base = _json(capsys, argv)
    target = base["stderr_V"][0] / 3                     # (needs a rule about 4x larger)
    held = _json(capsys, argv + ["--precision", repr(target)])
    assert base["converged"] == held["converged"] == [True] and held["params"]["precision"] == target
    assert max(held[f"stderr_{k}"][0] for k in ("m", "q", "V", "mse")) <= target < base["stderr_V"][0]
    assert abs(held["V"][0] - base["V"][0]) <= 5 * base["stderr_V"][0]
    assert _json(capsys, ["se", "--alpha", "0.3", "--estimator", "bayes", "--json"])["stderr_V"] == [None]
    with pytest.raises(SystemExit) as exc:
        main(["se", "--estimator", "bayes", "--precision", "1e-4"])
    assert exc.value.code == 2 and "--precision applies to --estimator erm" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["se", "--precision", "0"])
    assert exc.value.code == 2 and "--precision" in capsys.readouterr().err
    # the spectrum command runs the same SE: the same option and estimate
    spec = _json(capsys, ["spectrum", "--alpha", "0.5", "--lam", "0.01", "--n-mc", "65536", "--precision",
                          repr(target), "--json"])["se"]
    assert spec["converged"] and max(spec[f"stderr_{k}"] for k in ("m", "q", "V", "mse")) <= target
    assert spec["V"] == pytest.approx(held["V"][0], abs=5 * target)
    with pytest.raises(SystemExit) as exc:
        main(["spectrum", "--estimator", "bayes", "--precision", "1e-4"])
    assert exc.value.code == 2 and "--precision applies to --estimator erm" in capsys.readouterr().err


def test_se_acceleration_option(capsys):
    """--acceleration none: the plain SE steps; the fixed point is the same, reached in more steps."""
    argv = ["se", "--alpha", "0.2", "--loss", "square", "--reg", "frobenius", "--channel", "linear", "--noise", "0.1",
            "--lam", "0.1", "--tol", "1e-12", "--iters", "2000", "--json"]
    acc, plain = _json(capsys, argv), _json(capsys, argv + ["--acceleration", "none"])
    assert acc["params"]["acceleration"] == "anderson" and plain["params"]["acceleration"] == "none"
    assert acc["converged"] == plain["converged"] == [True]
    assert abs(acc["mse"][0] - plain["mse"][0]) < 1e-10 and acc["n_iter"][0] < plain["n_iter"][0]
    res = _json(capsys, ["se", "--alpha", "0.3", "--estimator", "bayes", "--acceleration", "none", "--json"])
    assert res["converged"] == [True]
    with pytest.raises(SystemExit) as exc:
        main(["se", "--acceleration", "fast"])
    assert exc.value.code == 2 and "acceleration" in capsys.readouterr().err


def test_paper_setting_se_and_run_json(capsys):
    """Softmax-square loss on noisy softmax labels (issue 10): both commands run and report the
    noisy test error, the training objective and the SE's variance and conjugates."""
    model = ["--T", "2", "--channel", "softmax", "--beta", "1", "--noise", "0.25", "--loss", "softmax_square",
             "--reg", "nuclear", "--lam", "0.01", "--n-mc", "2000"]
    res = _json(capsys, ["se", "--alpha", "0.3", "--iters", "60"] + model + ["--json"])
    assert res["params"]["noise"] == 0.25 and res["params"]["loss"] == "softmax_square"
    for key in ("mse", "test_error", "train_loss", "V", "A_hat", "m_hat", "q_hat", "a", "Delta"):
        assert res[key][0] is not None and np.isfinite(res[key][0]), key
    assert {"test_error_noisy", "train_objective"} <= set(res)
    if res["test_error_noisy"][0] is not None:  # fresh noisy labels are further from the clean map
        assert res["test_error_noisy"][0] > res["test_error"][0]
    res = _json(capsys, ["run", "--d", "24", "--alpha", "0.3", "--iters", "4", "--tol", "0"] + model + ["--json"])
    final, se = res["final"], res["se"]
    assert final["test_error_noisy"] > final["test_error"] > 0
    assert set(se["fixed_point"]) >= {"V", "A_hat", "m_hat", "q_hat", "a", "Delta"}
    for key in ("V", "A_hat", "m_hat", "q_hat"):
        assert len(se[key]) == 4 and se[key][-1] == se["fixed_point"][key], key
    assert len(res["amp"]["A_hat"]) == 4


def test_noise_applies_to_every_channel():
    from amp_attention import cli

    parser = cli.build_parser()
    for name, cls in (("softmax", "SoftmaxChannel"), ("hardmax", "HardmaxChannel"), ("linear", "LinearChannel")):
        args = parser.parse_args(["run", "--channel", name, "--noise", "0.3", "--beta", "2"])
        channel = cli._make_channel(args)
        assert type(channel).__name__ == cls and channel.noise == 0.3
        assert getattr(channel, "beta", 2.0) == 2.0


def test_every_option_shows_its_default_in_help():
    import argparse

    from amp_attention import cli

    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) >= {"run", "se", "bench"}
    for name, p in subs.choices.items():
        text = " ".join(p.format_help().split())
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings}: no help"
            default = action.default if not isinstance(action.default, list) else str(action.default)
            assert f"(default: {default})" in text, f"{name} {action.option_strings}: default not shown"
    assert "softmax_square" in " ".join(subs.choices["se"].format_help().split())


def test_bench_json(capsys):
    res = _json(capsys, ["bench", "--d", "30", "--T", "2", "--repeats", "2", "--json"])
    row = res["rows"][0]
    assert row["d"] == 30 and row["ratio_floor"] > 0 and row["t_floor"] > 0


@pytest.mark.parametrize("argv,msg", [
    (["run", "--d", "0"], "expected an integer >= 1"),
    (["run", "--beta", "-1"], "expected a finite number > 0"),
    (["run", "--T", "9", "--d", "10"], "T must be"),
    (["run", "--T", "1", "--d", "10"], "T >= 2"),
    (["se", "--alpha", "0.1,nope"], "comma-separated"),
    (["run", "--channel", "hardmax", "--estimator", "bayes", "--d", "10", "--iters", "1"], "hardmax"),
    (["run", "--noise", "-0.1"], "expected a finite number >= 0"),
])
def test_bad_input_exits_2_with_message(argv, msg, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert msg.lower() in capsys.readouterr().err.lower()


def test_console_script_installed():
    """`pip install -e .` puts the console script next to the interpreter."""
    exe = shutil.which("amp-attention", path=str(Path(sys.executable).parent)) or shutil.which("amp-attention")
    assert exe is not None, "the amp-attention console script is not installed"
    out = subprocess.run([exe, "se", "--alpha", "0.2", "--loss", "square", "--channel", "linear",
                          "--json"], capture_output=True, text=True, check=True).stdout
    assert np.isfinite(json.loads(out)["mse"][0])


def test_warm_up_compiles_in_a_second_process_only_for_heavy_losses():
    """The CLI's warm-up: no second process for the square loss or a Bayes estimator; the child's
    work (the prox on tiny inputs) runs; a warm-up returns the seconds it spent."""
    import amp_attention as aa
    from amp_attention import _warmup

    assert _warmup.start_output_side(aa.ERMAttention(loss="square"), 2) is None
    assert _warmup.start_output_side(aa.BayesAttention(aa.SoftmaxChannel(1.0), aa.SpectralLaw.wishart(0.5)), 2) is None
    _warmup._compile_output_side("cross_entropy", 1.0, 2)
    t = _warmup.warm_up(aa.ERMAttention(loss="square", reg="frobenius"), 2, 10, aa.LinearChannel(0.1))
    assert t > 0
