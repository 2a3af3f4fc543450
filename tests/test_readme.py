"""The README's table is what `amp-attention se` prints (section 'What the numbers mean')."""

import json
import re
from pathlib import Path

import pytest

from amp_attention.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _table():
    text = README.read_text()
    section = text.split("## What the numbers mean", 1)[1]
    cmds = re.findall(r"^amp-attention (se .*)$", section, flags=re.M)
    rows = re.findall(r"^\| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$",
                      section, flags=re.M)
    return cmds, [[float(v) for v in r] for r in rows]


def test_readme_table_is_reproduced_by_the_cli(capsys):
    cmds, rows = _table()
    assert len(cmds) == 2 and len(rows) == 4
    outs = []
    for cmd in cmds:
        assert main(cmd.split() + ["--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    erm, bayes = outs
    for i, (alpha, mse_e, mse_b, te_e, te_b, tl_e) in enumerate(rows):
        assert erm["alpha"][i] == alpha == bayes["alpha"][i]
        for got, want in ((erm["mse"][i], mse_e), (bayes["mse"][i], mse_b), (erm["test_error"][i], te_e),
                          (bayes["test_error"][i], te_b), (erm["train_loss"][i], tl_e)):
            assert got == pytest.approx(want, abs=1.5e-5)
        assert mse_b <= mse_e
