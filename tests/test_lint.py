"""`trainval lint`: every positive in the corpus is found; negatives and correct scripts stay quiet."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from trainval.lint.cli import lint_source
from trainval.lint.rules import RULES

CORPUS = os.path.join(REPO, "tests", "lint_corpus")
ALL = set(RULES)


def read(path):
    with open(path) as f:
        return f.read()


def expected(source: str) -> set[tuple[int, str]]:
    return {(i, m) for i, line in enumerate(source.splitlines(), 1) for m in re.findall(r"# expect: (TVL\d+)", line)}


@pytest.mark.parametrize("code", sorted(RULES))
def test_every_positive_is_found(code):
    path = os.path.join(CORPUS, "positives", f"{code}.py")
    source = read(path)
    want = expected(source)
    assert len(want) >= 3, f"{code} needs at least 3 positive examples"
    got = {(f.line, f.code) for f in lint_source(source, path, {code})}
    assert got == want


@pytest.mark.parametrize("code", sorted(RULES))
def test_tricky_negatives_stay_quiet(code):
    path = os.path.join(CORPUS, "negatives", f"{code}.py")
    source = read(path)
    assert len(re.findall(r"^\s*def ", source, re.M)) >= 3, f"{code} needs at least 3 negative examples"
    own = [f for f in lint_source(source, path, {code})]
    assert own == [], [f"{f.line}: {f.code}" for f in own]
    default = {c for c, r in RULES.items() if r.default}
    noisy = [f for f in lint_source(source, path, default) if f.level in ("error", "warning")]
    assert noisy == [], [f"{f.line}: {f.code}" for f in noisy]


def test_correct_scripts_have_no_error_findings():
    folder = os.path.join(CORPUS, "correct")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    assert len(files) >= 16 and "notes_train_val_test.py" in files
    for name in files:
        path = os.path.join(folder, name)
        errors = [f for f in lint_source(read(path), path) if f.level == "error"]
        assert errors == [], (name, [f"{f.line}: {f.code} {f.message}" for f in errors])


def lint(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "trainval", "lint", *args], capture_output=True, text=True, cwd=cwd)


def test_trainval_own_source_and_examples_are_clean():
    proc = lint(os.path.join(REPO, "src"), os.path.join(REPO, "examples"), os.path.join(REPO, "benchmarks"))
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_output_format_and_exit_codes(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("for x, y in loader:\n    loss = crit(model(x), y)\n    loss.backward()\n    opt.zero_grad()\n    opt.step()\n")
    proc = lint(str(bad))
    assert proc.returncode == 1
    line = proc.stdout.strip()
    assert re.match(rf"^{re.escape(str(bad))}:4:5: TVL001 opt\.zero_grad\(\) between backward\(\) \(line 3\) and opt\.step\(\)", line)
    js = json.loads(lint(str(bad), "--format", "json").stdout)
    assert js["findings"][0] == {**js["findings"][0], "path": str(bad), "line": 4, "col": 5, "code": "TVL001", "level": "error"}

    good = tmp_path / "good.py"
    good.write_text("import torch\nstate = torch.load('x.pt')\n")  # a warning only: exit 0
    proc = lint(str(good))
    assert proc.returncode == 0 and "TVL008" in proc.stdout

    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n    pass\n")
    proc = lint(str(broken), str(bad))
    assert proc.returncode == 2
    assert f"{broken}:1:7: cannot parse" in proc.stderr and "TVL001" in proc.stdout  # the other file is still checked

    assert lint(str(tmp_path / "missing.py")).returncode == 2
    usage = lint(str(bad), "--select", "TVL999")
    assert usage.returncode == 2 and "unknown rule code(s) TVL999" in usage.stderr


def test_select_ignore_noqa_and_pyproject(tmp_path):
    src = ("import torch\n"
           "for x, y in loader:\n"
           "    loss = crit(model(x), y)\n"
           "    loss.backward()\n"
           "    opt.zero_grad()\n"
           "    opt.step()\n"
           "    total += loss.item()\n"
           "state = torch.load('x.pt')\n")
    f = tmp_path / "s.py"
    f.write_text(src)
    codes = lambda proc: sorted(re.findall(r": (TVL\d+) ", proc.stdout))  # noqa: E731
    assert codes(lint(str(f))) == ["TVL001", "TVL008"]
    assert codes(lint(str(f), "--select", "TVL010")) == ["TVL010"]
    assert codes(lint(str(f), "--ignore", "TVL001")) == ["TVL008"]
    f.write_text(src.replace("    opt.zero_grad()\n", "    opt.zero_grad()  # noqa: TVL001\n"))
    assert codes(lint(str(f))) == ["TVL008"]
    f.write_text(src.replace("state = torch.load('x.pt')", "state = torch.load('x.pt')  # noqa"))
    assert codes(lint(str(f))) == ["TVL001"]
    (tmp_path / "pyproject.toml").write_text('[tool.trainval.lint]\nignore = ["TVL008"]\nexclude = ["skipme"]\n')
    (tmp_path / "skipme").mkdir()
    (tmp_path / "skipme" / "x.py").write_text(src)
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "y.py").write_text(src)
    proc = lint(str(tmp_path))
    assert codes(proc) == ["TVL001"] and "skipme" not in proc.stdout and ".venv" not in proc.stdout


def test_readme_rules_table_matches_rules():
    from trainval.lint.rules import rules_table

    assert rules_table() in read(os.path.join(REPO, "README.md"))
