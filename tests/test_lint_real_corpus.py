"""`trainval lint` on real public training scripts (tests/lint_corpus/real): every finding of the default
rules is labelled by hand (right / wrong / debatable), precision must stay >= 0.97, nothing may crash,
and every one-mistake mutant of a real script must be reported at the right line.

The scripts are pinned by commit and SHA-256 in MANIFEST.tsv and materialised from local git mirrors
(see corpus.py); without the mirrors these tests are skipped, saying so.
"""

from __future__ import annotations

import collections
import os
import sys
import time

import pytest
from conftest import REPO, run_cli

from trainval.lint.cli import lint_source
from trainval.lint.rules import RULES

sys.path.insert(0, os.path.join(REPO, "tests", "lint_corpus", "real"))
import corpus  # noqa: E402

DEFAULT = {c for c, r in RULES.items() if r.default}
PERMISSIVE = {"MIT", "BSD-2-Clause", "BSD-3-Clause", "Apache-2.0"}


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    missing = corpus.materialise()
    if missing:
        pytest.skip(
            f"{len(missing)} corpus files cannot be materialised from {corpus.DEFAULT_MIRRORS} "
            f"(set TRAINVAL_LINT_CORPUS_MIRRORS; see tests/lint_corpus/real/corpus.py)"
        )
    out = {}
    for e in corpus.manifest():
        with open(corpus.path_of(e.name), encoding="utf-8") as f:
            out[e.name] = f.read()
    return out


def _lint_all(files: dict[str, str]) -> tuple[dict[str, set], list[str]]:
    found, crashes = {}, []
    for name, source in files.items():
        try:
            found[name] = {(f.line, f.code) for f in lint_source(source, name, DEFAULT)}
        except Exception as e:  # noqa: BLE001 - counted, then the test fails with the list
            crashes.append(f"{name}: {type(e).__name__}: {e}")
    return found, crashes


def test_manifest_is_permissive_and_broad():
    entries = corpus.manifest()
    assert {e.licence for e in entries} <= PERMISSIVE
    assert len({e.repository for e in entries}) >= 15
    assert len({e.name for e in entries}) == len(entries)


def test_precision_on_labelled_findings(files, capsys):
    found, crashes = _lint_all(files)
    assert crashes == []
    labels = {(lb.name, lb.line, lb.code): lb for lb in corpus.labels()}
    got = {(name, line, code) for name, pairs in found.items() for line, code in pairs}
    assert sorted(got - set(labels)) == [], "findings without a label: judge them and add them to LABELS.tsv"
    assert sorted(set(labels) - got) == [], "labelled findings no longer reported: relabel or explain"
    assert {lb.verdict for lb in labels.values()} <= {"right", "wrong", "debatable"}
    round7 = {e.name for e in corpus.manifest() if e.repository in corpus.ROUND7_REPOSITORIES}
    verdicts = collections.Counter(lb.verdict for lb in labels.values() if lb.name not in round7)
    precision = verdicts["right"] / (verdicts["right"] + verdicts["wrong"])
    non_load = collections.Counter(
        lb.verdict for lb in labels.values() if lb.code != "TVL008" and lb.name not in round7
    )
    held = collections.Counter(lb.verdict for lb in labels.values() if lb.name in round7)
    held_non_load = collections.Counter(
        lb.verdict for lb in labels.values() if lb.name in round7 and lb.code != "TVL008"
    )
    with capsys.disabled():
        lines = sum(s.count("\n") for s in files.values())
        print(
            f"\n[lint real corpus] {len(files)} files, {lines} lines, "
            f"{len({e.repository for e in corpus.manifest()})} projects; default rules: {sum(verdicts.values())} "
            f"findings, {verdicts['right']} right, {verdicts['wrong']} wrong, {verdicts['debatable']} debatable: "
            f"precision {precision:.3f} (without TVL008: {non_load['right']} right, {non_load['wrong']} wrong, "
            f"{non_load['debatable']} debatable) [rounds 1-6]"
        )
        print(
            f"[lint real corpus] round 7 (held out, {len(round7)} files): {sum(held.values())} findings, "
            f"{held['right']} right, {held['wrong']} wrong, {held['debatable']} debatable: precision "
            f"{held['right'] / max(1, held['right'] + held['wrong']):.3f} (without TVL008: {held_non_load['right']} "
            f"right, {held_non_load['wrong']} wrong, {held_non_load['debatable']} debatable)"
        )
    assert precision >= 0.97
    # issue 22's bar for the held-out round, after its fixes: >= 0.97 with the default rules, >= 0.95 without TVL008
    assert held["right"] / (held["right"] + held["wrong"]) >= 0.97
    assert held_non_load["right"] / (held_non_load["right"] + held_non_load["wrong"]) >= 0.95


def _mutate(source: str, m: corpus.Mutant) -> str:
    lines = source.splitlines(keepends=True)
    assert m.old in lines[m.line - 1], f"{m.name}:{m.line}: {m.old!r} not on that line"
    lines[m.line - 1] = lines[m.line - 1].replace(m.old, m.new, 1)
    return "".join(lines)


def test_every_mutant_is_caught_at_the_right_line(files, capsys):
    mutants = corpus.mutants()
    assert len(mutants) >= 20 and len({m.name for m in mutants}) >= 10
    missed = []
    for m in mutants:
        original = {(f.line, f.code) for f in lint_source(files[m.name], m.name, DEFAULT)}
        assert (m.expect_line, m.code) not in original, f"{m.name}: already reported before the mutation"
        mutated = {(f.line, f.code) for f in lint_source(_mutate(files[m.name], m), m.name, DEFAULT)}
        if (m.expect_line, m.code) not in mutated:
            missed.append(
                f"{m.name}:{m.expect_line} {m.code} ({m.mistake}); got {sorted(mutated - original)}"
            )
    recall = (len(mutants) - len(missed)) / len(mutants)
    with capsys.disabled():
        by_code = collections.Counter(m.code for m in mutants)
        print(
            f"\n[lint real corpus] mutants: {len(mutants) - len(missed)}/{len(mutants)} caught at the right line "
            f"(recall {recall:.3f}); by rule: {dict(sorted(by_code.items()))}"
        )
    assert missed == []


def test_mutation_control_reverting_the_fix_is_detected(files):
    # control: the harness itself can fail -- a mutant whose expected line is off by one is not "caught"
    m = corpus.mutants()[0]
    mutated = {(f.line, f.code) for f in lint_source(_mutate(files[m.name], m), m.name, DEFAULT)}
    assert (m.expect_line, m.code) in mutated and (m.expect_line + 1, m.code) not in mutated


def test_cli_over_the_whole_corpus_never_crashes(files, capsys):
    start = time.perf_counter()
    proc = run_cli("lint", corpus.FILES, timeout=120)
    elapsed = time.perf_counter() - start
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 1), proc.stderr
    assert len(proc.stdout.strip().splitlines()) == len(corpus.labels())
    with capsys.disabled():
        print(
            f"\n[lint real corpus] `trainval lint` over {len(files)} files: {elapsed:.2f} s wall "
            "(one process, including interpreter start-up)"
        )
