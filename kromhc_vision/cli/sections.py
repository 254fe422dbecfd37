"""Sections of BENCHMARKS.md owned by one generator each, between ``<!-- NAME:begin -->`` / ``<!-- NAME:end -->``.

:func:`replace_section` rewrites only the text between one generator's markers (appending the marked
section when the file has none), so generators that regenerate their own parts keep the others'.
"""
import shlex
import sys
import time
from pathlib import Path


def markers(name: str) -> tuple:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the section ``name`` (markers included) holding ``body``; appended at the end if absent.

    Raises ``ValueError`` if the markers are unbalanced (one without the other, or end before begin).
    """
    begin, end = markers(name)
    section = f"{begin}\n{body.strip()}\n{end}"
    i, j = text.find(begin), text.find(end)
    if i < 0 and j < 0:
        return text.rstrip("\n") + "\n\n" + section + "\n" if text.strip() else section + "\n"
    if i < 0 or j < i or text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"unbalanced or repeated markers for section {name!r}")
    return text[:i] + section + text[j + len(end):]


def write_section(path, name: str, body: str) -> None:
    """Replace the section ``name`` of the file at ``path`` (created if missing) with ``body``."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    path.write_text(replace_section(text, name, body))


def write_command_section(path, name: str, title: str, script: str, argv, lines) -> None:
    """Write the section ``name``: ``## title``, the command (``python <script> <argv>``, ``argv`` None:
    this process's arguments) with today's UTC date, then ``lines`` (a benchmark's printed output) as a code block."""
    command = f"python {script} " + shlex.join(sys.argv[1:] if argv is None else argv)
    write_section(path, name, f"## {title}\n\n`{command}` ({time.strftime('%Y-%m-%d', time.gmtime())}):\n\n```\n"
                  + "\n".join(lines).rstrip() + "\n```\n")
