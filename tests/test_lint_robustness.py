"""`trainval lint` on hostile input: recursion in the analysed code, huge expressions, FIFOs, encodings,
bad configuration, and one file's analysis failing while the others are still checked."""

from __future__ import annotations

import os
import re
import sys

import pytest
from conftest import run_cli

from trainval.lint import cli as lint_cli
from trainval.lint.cli import lint_source

MISTAKE = (
    "for x, y in loader:\n"
    "    loss = crit(model(x), y)\n"
    "    loss.backward()\n"
    "    opt.zero_grad()\n"
    "    opt.step()\n"
)

# the two shapes that crashed the whole run with a RecursionError in FileInfo.last_mode_in, now mode_effects (issue 13)
RECURSIVE = """
import torch

def repackage_hidden(h):
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)

class Windows(torch.utils.data.Dataset):
    def __getitem__(self, i):
        if i < 0:
            return self.__getitem__(i + len(self))
        return self.data[i]

def ping(n):
    model.eval()
    return pong(n - 1)

def pong(n):
    return ping(n) if n else model.train()

def train(model, loader, opt, hidden):
    for epoch in range(3):
        for x, y in loader:
            hidden = repackage_hidden(hidden)
            opt.zero_grad()
            out, hidden = model(x, hidden)
            crit(out, y).backward()
            opt.step()
        ping(3)
"""


def test_recursive_helpers_are_analysed_not_crashed():
    findings = lint_source(RECURSIVE, "recursive.py")  # raised RecursionError before the fix
    assert all(f.code.startswith("TVL") for f in findings)
    # mutual recursion that ends in train(): the mode it leaves is still followed (no TVL005)
    assert [f.code for f in findings if f.code == "TVL005"] == []


MATCH = """
import torch

model = torch.nn.Linear(2, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for epoch in range(3):
    match epoch:
        case 1:
            model.eval()
        case _:
            pass
    loss = model(torch.zeros(2)).sum()
    loss.backward()
    opt.step()
    opt.zero_grad()
"""


def test_match_statement_cases_are_walked():
    # flow.py read ast.Match.match_cases (no such field: it is .cases): an internal error on any match (found by mypy)
    findings = lint_source(MATCH, "match.py")
    assert [(f.line, f.code) for f in findings] == [(9, "TVL005")]  # the eval() in a case, never undone


def test_recursive_file_does_not_hide_other_files(tmp_path):
    (tmp_path / "a_recursive.py").write_text(RECURSIVE)
    (tmp_path / "b_bad.py").write_text(MISTAKE)
    proc = run_cli("lint", str(tmp_path), timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"{tmp_path / 'b_bad.py'}:4:5: TVL001" in proc.stdout
    assert proc.returncode == 1


def test_huge_expression_is_one_error_line_and_the_rest_is_checked(tmp_path):
    (tmp_path / "huge.py").write_text("x = " + " + ".join(["a"] * 20000) + "\n")
    (tmp_path / "long.py").write_text("total = 0\n" + MISTAKE + "y = " + " + ".join(["loss"] * 900) + "\n")
    (tmp_path / "mistake.py").write_text(MISTAKE)
    proc = run_cli("lint", str(tmp_path), timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and re.match(
        rf"trainval lint: error: {re.escape(str(tmp_path / 'huge.py'))}:0:0: "
        r"cannot analyse: the code nests too deeply",
        errors[0],
    ), errors
    assert f"{tmp_path / 'mistake.py'}:4:5: TVL001" in proc.stdout
    assert f"{tmp_path / 'long.py'}:5:5: TVL001" in proc.stdout  # 900 terms: analysed normally
    assert proc.returncode == 2


def test_an_analysis_bug_in_one_file_is_one_internal_error_line(tmp_path, monkeypatch, capsys):
    import trainval.lint.rules as rules

    real_check = rules.check

    def check(info):
        if "BOOM" in info.source:
            raise KeyError("simulated analysis bug")
        return real_check(info)

    monkeypatch.setattr(rules, "check", check)
    (tmp_path / "a.py").write_text("# BOOM\n" + MISTAKE)
    (tmp_path / "b.py").write_text(MISTAKE)
    parser = __import__("argparse").ArgumentParser()
    lint_cli.add_arguments(parser)
    status = lint_cli.run(parser.parse_args([str(tmp_path)]))
    out, err = capsys.readouterr()
    assert status == 2
    assert err.strip() == (
        f"trainval lint: error: {tmp_path / 'a.py'}:0:0: internal error: KeyError: "
        "'simulated analysis bug' (please report this file)"
    )
    assert f"{tmp_path / 'b.py'}:4:5: TVL001" in out and "a.py:" not in out
    # control: without the simulated bug, both files are reported and the exit code is the findings code
    monkeypatch.setattr(rules, "check", real_check)
    assert lint_cli.run(parser.parse_args([str(tmp_path)])) == 1
    assert capsys.readouterr().out.count("TVL001") == 2


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_named_py_does_not_hang_the_walk(tmp_path):
    os.mkfifo(tmp_path / "pipe.py")
    (tmp_path / "mistake.py").write_text(MISTAKE)
    proc = run_cli("lint", str(tmp_path), timeout=60)  # blocked forever in open() before the fix
    assert proc.returncode == 1 and "TVL001" in proc.stdout and "pipe.py" not in proc.stdout + proc.stderr
    named = run_cli("lint", str(tmp_path / "pipe.py"), timeout=60)
    assert named.returncode == 2
    assert (
        named.stderr.strip()
        == f"trainval lint: error: {tmp_path / 'pipe.py'}:0:0: cannot read: source file {tmp_path / 'pipe.py'} is "
        "a FIFO (named pipe), not a regular file; give the path of a file."
    )


def test_coding_cookie_is_honoured(tmp_path):
    latin = tmp_path / "latin.py"
    latin.write_bytes(
        ("# -*- coding: latin-1 -*-\n# donn\xe9es d'entra\xeenement\n" + MISTAKE).encode("latin-1")
    )
    proc = run_cli("lint", str(latin), timeout=60)  # refused as invalid UTF-8 before the fix
    assert proc.returncode == 1 and f"{latin}:6:5: TVL001" in proc.stdout, proc.stdout + proc.stderr
    # control: the same bytes without the cookie are not UTF-8, and say so on one line
    plain = tmp_path / "plain.py"
    plain.write_bytes(latin.read_bytes().split(b"\n", 1)[1])
    proc = run_cli("lint", str(plain), timeout=60)
    assert proc.returncode == 2 and re.match(
        rf"trainval lint: error: {re.escape(str(plain))}:\d+:\d+: cannot ", proc.stderr
    ), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(sys.version_info < (3, 11), reason="pyproject is read with tomllib")
@pytest.mark.parametrize(
    "body, message",
    [
        ("select = 5", "select must be a list of strings or one comma-separated string, not 5"),
        ("ignore = [1, 2]", "ignore must be a list of strings or one comma-separated string, not [1, 2]"),
        ("exclude = 3", "exclude must be a list of strings or one comma-separated string, not 3"),
        (
            "selct = ['TVL001']",
            "[tool.trainval.lint] has unknown key(s) selct (keys: select, ignore, exclude)",
        ),
        ("select = ['TVL01']", "select: unknown rule code(s) TVL01"),
    ],
)
def test_bad_pyproject_values_are_one_config_error_exit_2(tmp_path, body, message):
    (tmp_path / "pyproject.toml").write_text(f"[tool.trainval.lint]\n{body}\n")
    (tmp_path / "s.py").write_text(MISTAKE)
    proc = run_cli("lint", str(tmp_path), timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, (
        proc.stderr
    )


def test_pyproject_string_values_still_work(tmp_path):
    # control for the above: the accepted forms (a comma-separated string, a list) keep working
    (tmp_path / "pyproject.toml").write_text(
        '[tool.trainval.lint]\nignore = "TVL001, TVL008"\nexclude = "skip*"\n'
    )
    (tmp_path / "s.py").write_text(MISTAKE + "import torch\ntorch.load('x')\n")
    (tmp_path / "skipme.py").write_text(MISTAKE)
    proc = run_cli("lint", str(tmp_path), timeout=60)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_explain_prints_rationale_examples_and_fix():
    proc = run_cli("lint", "--explain", "tvl009", timeout=60)
    assert proc.returncode == 0
    for part in (
        "TVL009 (error, on by default)",
        "Why: ",
        "Wrong:\n    model.load_state_dict(sd)",
        "Right:\n",
        "    model.eval()",
        "Fix: call model.eval() after load_state_dict()",
    ):
        assert part in proc.stdout, proc.stdout
    bad = run_cli("lint", "--explain", "TVL999", timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith(
        "trainval lint: error: --explain: unknown rule code TVL999"
    )
    none = run_cli("lint", timeout=60)
    assert none.returncode == 2 and "give at least one PATH" in none.stderr


def test_call_fan_out_and_long_helper_chains_stay_bounded(tmp_path):
    # 10 calls per helper, 12 helpers deep: 10**11 paths if every call were followed without a budget
    fan = ["import torch"]
    for i in range(11):
        fan.append(f"def f{i}(model, x):\n" + "\n".join(f"    f{i + 1}(model, x)" for _ in range(10)))
    fan.append("def f11(model, x):\n    with torch.no_grad():\n        print(model(x))")
    fan.append("f0(model, x)")
    (tmp_path / "fan.py").write_text("\n".join(fan) + "\n")
    chain = ["import torch"] + [
        f"def g{i}(model, x):\n    loss = model(x).sum()\n    loss.backward()\n    return g{i + 1}(model, x)"
        for i in range(3000)
    ]
    (tmp_path / "chain.py").write_text("\n".join(chain + ["g0(model, x)"]) + "\n")
    proc = run_cli("lint", str(tmp_path), timeout=60)  # a hang would fail here
    assert "Traceback" not in proc.stderr and proc.returncode == 1, proc.stderr
    # the fan-out's evaluation is still found (no model.eval() on any path), once
    assert proc.stdout.count("TVL004") == 1 and f"{tmp_path / 'fan.py'}:" in proc.stdout


# --- issue 22 follow-up: hostile names, pyproject shapes and links (an attacker round found each) --------------

ESCAPES = "e\x1b]0;X\x07\x1b[2Jred.py"


def test_a_walked_file_name_with_terminal_escapes_is_printed_escaped(tmp_path):
    (tmp_path / ESCAPES).write_text(MISTAKE)
    proc = run_cli("lint", str(tmp_path), timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout, proc.stdout
    assert "e\\x1b]0;X\\x07\\x1b[2Jred.py:4:5: TVL001" in proc.stdout
    # JSON keeps the real name (json.dumps escapes control characters itself)
    proc = run_cli("lint", "--format", "json", str(tmp_path), timeout=60)
    assert "\x1b" not in proc.stdout and '"path": "' in proc.stdout
    import json

    assert json.loads(proc.stdout)["findings"][0]["path"] == str(tmp_path / ESCAPES)


def test_an_unreadable_file_with_escapes_in_its_name_is_one_escaped_error_line(tmp_path):
    (tmp_path / ESCAPES).write_bytes(b"x = '\xff'\n")  # not UTF-8: 'cannot read', quoting the name
    proc = run_cli("lint", str(tmp_path / ESCAPES), timeout=60)
    assert proc.returncode == 2
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "e\\x1b]0;X" in proc.stderr


@pytest.mark.skipif(sys.version_info < (3, 11), reason="pyproject is read with tomllib")
@pytest.mark.parametrize(
    "body, message",
    [
        (b'tool = "x"\n', "pyproject.toml: [tool] must be a table, not 'x'"),
        (b"[tool]\ntrainval = 3\n", "pyproject.toml: [tool.trainval] must be a table, not 3"),
        (b"[tool.trainval]\nlint = [1]\n", "pyproject.toml: [tool.trainval.lint] must be a table, not [1]"),
        (b"x = " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "pyproject.toml: nested too deeply to read as TOML"),
        (b'[tool]\nx = "\xff"\n', "pyproject.toml: not UTF-8 text"),
    ],
    ids=["tool-string", "trainval-int", "lint-list", "deep", "not-utf8"],
)
def test_a_hostile_pyproject_is_one_line_naming_it_exit_2(tmp_path, body, message):
    (tmp_path / "pyproject.toml").write_bytes(body)
    (tmp_path / "s.py").write_text(MISTAKE)
    proc = run_cli("lint", str(tmp_path), timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == "" and proc.stderr.strip().splitlines() == [
        proc.stderr.strip()
    ] and f"{tmp_path / message}" in proc.stderr, proc.stderr


def test_a_symlink_loop_is_named_as_one(tmp_path):
    os.symlink("loop1.py", tmp_path / "loop1.py")
    os.symlink("nothere.py", tmp_path / "dangling.py")
    proc = run_cli("lint", str(tmp_path / "loop1.py"), str(tmp_path / "dangling.py"), str(tmp_path / "absent.py"),
                   timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"trainval lint: error: {tmp_path / 'loop1.py'}: a symbolic link loop (the link leads back to itself); "
        "point it at a file or folder",
        f"trainval lint: error: {tmp_path / 'dangling.py'}: a symbolic link to a file or folder that does not exist "
        "(nothere.py)",
        f"trainval lint: error: {tmp_path / 'absent.py'}: no such file or folder",
    ], proc.stderr
