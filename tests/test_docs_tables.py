"""Results tables in README.md and docs/ are rendered from their JSON records; these tests fail when a page and its
record disagree, and check the verdict rule every claims table is judged by."""

import json
import os
import shutil

import pytest

from onestep.eval import tables, verdicts


def test_every_table_in_the_docs_equals_its_record():
    problems = tables.stale()
    assert problems == [], "run `python -m onestep.eval.tables` to re-render: " + "; ".join(problems)


def test_every_marker_names_a_known_table_and_every_claims_record_is_shown():
    shown = set()
    for page in tables.pages():
        shown |= {m.group("name") for m in tables.MARKER.finditer(open(page, encoding="utf-8").read())}
    assert shown <= set(tables.TABLES)
    for name, (record, _) in tables.TABLES.items():
        if os.path.exists(os.path.join(tables.ROOT, record)):
            assert name in shown, f"{record} is rendered by no page"


def _copy_docs_and_records(tmp_path):
    for page in tables.pages():
        target = tmp_path / os.path.relpath(page, tables.ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, target)
    for record, _ in tables.TABLES.values():
        if os.path.exists(os.path.join(tables.ROOT, record)):
            (tmp_path / record).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.join(tables.ROOT, record), tmp_path / record)


def _first_shown_claims_table():
    for page in tables.pages():
        for m in tables.MARKER.finditer(open(page, encoding="utf-8").read()):
            name = m.group("name")
            if name.endswith("-gmm") and os.path.exists(os.path.join(tables.ROOT, tables.TABLES[name][0])):
                return name
    pytest.skip("no claims table is shown yet")


def test_editing_a_record_makes_its_table_stale_and_the_fix_rewrites_it(tmp_path):
    name = _first_shown_claims_table()
    _copy_docs_and_records(tmp_path)
    record_path = tmp_path / tables.TABLES[name][0]
    record = json.loads(record_path.read_text())
    claim = record["claims"][0]
    values = claim["values"] if "values" in claim else claim["a"]["values"]
    values[0] = values[0] * 3 + 1.0
    record_path.write_text(json.dumps(record))

    def about_this_table():
        return [p for p in tables.stale(str(tmp_path)) if p.endswith(": " + name)]

    assert about_this_table()
    tables.stale(str(tmp_path), fix=True)
    assert about_this_table() == []


def test_verdict_rule_needs_the_difference_to_exceed_the_seeds_spread():
    assert verdicts.better([1.0, 1.1, 0.9], [2.0, 2.1, 1.9]) == "reproduced"
    assert verdicts.better([1.0, 1.5, 0.5], [1.2, 1.7, 0.7]) == "inconclusive"
    assert verdicts.better([2.0, 2.1, 1.9], [1.0, 1.1, 0.9]) == "not reproduced"
    assert verdicts.below([0.01, 0.012, 0.011], 0.05) == "reproduced"
    assert verdicts.below([0.04, 0.06, 0.05], 0.05) == "inconclusive"
    assert verdicts.above([0.9, 0.91, 0.92], 0.5) == "reproduced"


def test_a_claim_with_one_seed_is_never_reproduced():
    assert verdicts.better([1.0], [2.0]) == "inconclusive"
    assert verdicts.below([0.0], 1.0) == "inconclusive"
