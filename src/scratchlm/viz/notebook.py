"""Execute a notebook in place, and check that a notebook's committed outputs are current.

    python -m scratchlm.viz.notebook docs/walkthrough.ipynb            # re-run it, write the outputs in
    python -m scratchlm.viz.notebook docs/walkthrough.ipynb --check    # exit 1 (naming the cell) if stale

The kernel imports the scratchlm beside this file (this checkout's ``src/``), whatever is installed, and
draws with matplotlib's Agg backend. "Current" (:func:`stale_cells`) means every code cell of a fresh run
prints the same text as the committed one (numbers compared to within 1e-3, the printed precision, so that
another CPU's last-bit rounding does not count) and shows images of the same pixel size at the same places.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import struct
import sys
from base64 import b64decode
from pathlib import Path
from typing import Any

REGENERATE = "python -m scratchlm.viz.notebook docs/walkthrough.ipynb"
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def execute(path: str | Path, timeout: int = 120) -> Any:
    """Run every cell of the notebook at ``path`` (cwd: the repository root) and return it, executed."""
    import nbclient
    import nbformat

    path = Path(path)
    src = str(Path(__file__).resolve().parents[2])  # the src/ folder holding this scratchlm
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([src, env_path]) if env_path else src
    os.environ.setdefault("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    root = path.resolve().parents[1] if path.resolve().parent.name == "docs" else path.resolve().parent
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(root)}}
    )
    client.execute()
    return nb


def _texts(cell: Any) -> list[str]:
    """The text a code cell shows: streams, plain-text results and errors, in order."""
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            out.append(o.get("text", ""))
        elif o.get("output_type") in ("execute_result", "display_data"):
            if "image/png" not in o.get("data", {}):
                out.append(str(o.get("data", {}).get("text/plain", "")))
        elif o.get("output_type") == "error":
            out.append(f"{o.get('ename')}: {o.get('evalue')}")
    return ["".join(out)]


def _images(cell: Any) -> list[tuple[int, int]]:
    """(width, height) of every PNG a code cell shows, read from the PNG header."""
    sizes = []
    for o in cell.get("outputs", []):
        png = o.get("data", {}).get("image/png") if isinstance(o.get("data"), dict) else None
        if png:
            raw = b64decode(png if isinstance(png, str) else "".join(png))
            sizes.append(struct.unpack(">II", raw[16:24]))
    return sizes


def same_text(a: str, b: str, tol: float = 1e-3) -> bool:
    """True when ``a`` and ``b`` differ at most in numbers within ``tol`` (absolute, or relative for large)."""
    if _NUMBER.sub("#", a) != _NUMBER.sub("#", b):
        return False
    for x, y in zip(_NUMBER.findall(a), _NUMBER.findall(b)):
        fx, fy = float(x), float(y)
        if abs(fx - fy) > tol * max(1.0, abs(fx), abs(fy)) + 1e-9:  # one unit of the last printed digit
            return False
    return True


def stale_cells(committed: Any, fresh: Any) -> list[str]:
    """What differs between a committed notebook and a fresh run of it: one line per stale code cell."""
    problems = []
    old = [c for c in committed.cells if c.cell_type == "code"]
    new = [c for c in fresh.cells if c.cell_type == "code"]
    if [c.source for c in old] != [c.source for c in new]:
        return ["the code cells differ (a fresh run of another notebook?)"]
    for i, (a, b) in enumerate(zip(old, new), 1):
        if not a.get("outputs") and b.get("outputs"):
            problems.append(f"code cell {i} has no committed output")
        elif not same_text(_texts(a)[0], _texts(b)[0]):
            problems.append(f"code cell {i} prints other text than committed")
        elif _images(a) != _images(b):
            problems.append(f"code cell {i} shows other images ({_images(a)} committed, {_images(b)} now)")
    return problems


def main(argv: list[str] | None = None) -> int:
    import nbformat

    parser = argparse.ArgumentParser(
        prog="python -m scratchlm.viz.notebook", description=__doc__.split("\n")[0]
    )
    parser.add_argument("notebook", help="the .ipynb file (e.g. docs/walkthrough.ipynb)")
    parser.add_argument("--check", action="store_true", help="compare a fresh run with the committed outputs")
    args = parser.parse_args(argv)
    committed = nbformat.read(args.notebook, as_version=4)
    fresh = execute(args.notebook)
    if args.check:
        problems = stale_cells(committed, fresh)
        for p in problems:
            print(f"{args.notebook}: {p}; regenerate with: python -m scratchlm.viz.notebook {args.notebook}")
        return 1 if problems else 0
    out = copy.deepcopy(fresh)
    for cell in out.cells:  # keep diffs small: no execution timestamps
        cell.get("metadata", {}).pop("execution", None)
    nbformat.write(out, args.notebook)
    print(f"executed {args.notebook}: {sum(c.cell_type == 'code' for c in out.cells)} code cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
