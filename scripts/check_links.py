"""Check the links of top-level Markdown files (README.md, MODEL_CARD.md) and that docs/layout.md names every
module of src/braintumor; exit 1 with one line per problem. mkdocs --strict checks the pages under docs/.

A relative link must name an existing file; ``file.md#anchor`` (or ``#anchor``) must name a heading of that
file, slugged as GitHub and mkdocs do. Web links are not fetched (the check runs offline).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def slug(heading: str) -> str:
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return re.sub(r"\s", "-", text.strip())


def prose_lines(path: Path) -> list[tuple[int, str]]:
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for _, line in prose_lines(path) if re.match(r"^#{1,6} ", line)}


def link_problems(path: Path) -> list[str]:
    problems = []
    for number, line in prose_lines(path):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}:{number}: {target}"
            if not linked.exists():
                problems.append(f"{where}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{where}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    return problems


def layout_problems() -> list[str]:
    layout = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    package = ROOT / "src" / "braintumor"
    missing = []
    for module in sorted(package.rglob("*.py")):
        if module.name == "__init__.py":
            continue
        if not re.search(rf"(?<![\w/]){re.escape(module.name)}(?!\w)", layout):
            missing.append(f"docs/layout.md: {module.relative_to(package)} is not described")
    for folder in sorted(p for p in package.iterdir() if p.is_dir() and p.name != "__pycache__"):
        if f"{folder.name}/" not in layout:
            missing.append(f"docs/layout.md: the folder {folder.name}/ is not described")
    return missing


def main(argv: list[str]) -> int:
    problems = [problem for name in argv for problem in link_problems((ROOT / name).resolve())]
    problems += layout_problems()
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["README.md", "MODEL_CARD.md"]))
