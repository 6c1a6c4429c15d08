"""Writes mosaickv/data/corpus.json.gz, the prose the fidelity texts and the accuracy tasks'
haystacks are cut from: docstrings of standard-library modules and their public members,
in a fixed order. They were read at run time until the fifteenth GPU run, and then
differed between Python versions and with what the process had imported (a module's
members grow as its submodules load), so the same seed gave other tasks on the GPU machine
(Python 3.12) than here (3.11). Shipped once, they are the same everywhere.

    python scripts/make_corpus.py   # rewrites the file (tasks and fidelity texts change with it)
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "mosaickv" / "data" / "corpus.json.gz"
MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "email",
    "functools", "heapq", "http.client", "inspect", "itertools", "json", "logging", "pathlib", "pickle", "re",
    "shutil", "socket", "subprocess", "tarfile", "threading", "typing", "unittest", "urllib.parse", "zipfile",
)  # fmt: skip


def docstrings() -> list[str]:
    """Every distinct docstring of at least 200 characters, module by module."""
    parts: list[str] = []
    for name in MODULES:
        module = importlib.import_module(name)
        members = [module] + [getattr(module, m) for m in sorted(dir(module)) if not m.startswith("_")]
        for obj in members:
            doc = inspect.getdoc(obj) if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj) else None
            if doc and len(doc) >= 200 and doc not in parts:
                parts.append(doc)
    return parts


def main() -> None:
    parts = docstrings()
    body = json.dumps({"python": sys.version.split()[0], "modules": MODULES, "docstrings": parts}, indent=0)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(gzip.compress(body.encode(), mtime=0))
    print(f"{OUT}: {len(parts)} docstrings, {sum(map(len, parts)):,} characters")


if __name__ == "__main__":
    main()
