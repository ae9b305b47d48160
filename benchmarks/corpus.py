"""English text for the sentence-embedding case: docstring summaries of the Python standard library.

Run as a script in a child interpreter (``python -I corpus.py OUT.json``): it imports the standard
library's public top-level modules, which a benchmark process should not carry around, and some of
which print on import. Standard library only, so that the isolated child needs nothing else.

What is collected, in a fixed order (module names sorted, then each module's own classes and
functions sorted by name): the first paragraph of the docstring of each module, and of each class
and function defined in that module or its submodules, with whitespace collapsed and a leading C
signature line (``log(x, [base=math.e])``) dropped. Texts are deduplicated, first occurrence wins.
The caller filters by token count and shuffles (``sentences``).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import warnings

# Modules that act on import (open a browser, print a poem, start Tk) or drag in a GUI.
SKIP_MODULES = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"})
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")


def first_paragraph(doc: str | None) -> str | None:
    """The docstring's first paragraph as one line, or None when there is no prose."""
    if not isinstance(doc, str) or not doc:
        return None
    lines = doc.strip().splitlines()
    if lines and _SIGNATURE_LINE.match(lines[0].strip()):
        lines = lines[1:]
    paragraph: list[str] = []
    for line in lines:
        if not line.strip():
            if paragraph:
                break
            continue
        paragraph.append(line.strip())
    text = " ".join(" ".join(paragraph).split())
    return text or None


def collect(names: list[str]) -> list[str]:
    import importlib

    texts: list[str] = []
    seen: set[str] = set()

    def add(doc: str | None) -> None:
        text = first_paragraph(doc)
        if text and text not in seen:
            seen.add(text)
            texts.append(text)

    warnings.simplefilter("ignore")  # deprecated modules warn on import and on attribute access
    for name in names:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                module = importlib.import_module(name)
        except Exception:  # platform modules (msvcrt, winreg, ...) and optional ones (curses, ...)
            continue
        add(module.__doc__)
        for attr in sorted(vars(module)):
            obj = vars(module)[attr]
            owner = getattr(obj, "__module__", None)
            if not isinstance(owner, str) or not (owner == name or owner.startswith(name + ".")):
                continue
            if isinstance(obj, type) or callable(obj):
                add(getattr(obj, "__doc__", None))
    return texts


def main() -> None:
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP_MODULES)
    texts = collect(names)
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        json.dump({"python": sys.version.split()[0], "modules": len(names), "texts": texts}, f)


if __name__ == "__main__":
    main()
