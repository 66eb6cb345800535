"""mkdocs hooks: the site's home page is README.md and its model card MODEL_CARD.md, included as they are.

docs/index.md and docs/model-card.md are placeholders; their content is the top-level file, with its links
rewritten from the repository root to docs/ (``docs/x.md`` -> ``x.md``, ``MODEL_CARD.md`` -> ``model-card.md``),
so README.md reads right on a code host and on the site, and mkdocs checks its links like any page's.
"""

from __future__ import annotations

import re
from pathlib import Path

INCLUDED = {"index.md": "README.md", "model-card.md": "MODEL_CARD.md"}
_LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)\s]+)\)")


def root_link_to_docs(target: str) -> str:
    """A link written from the repository root, as seen from docs/."""
    path, _, anchor = target.partition("#")
    if path.startswith("docs/"):
        path = path[len("docs/"):]
    else:
        path = {"README.md": "index.md", "MODEL_CARD.md": "model-card.md"}.get(path, path)
    return path + (f"#{anchor}" if anchor else "")


def on_page_markdown(markdown: str, page, config, files) -> str:
    source = INCLUDED.get(page.file.src_uri)
    if source is None:
        return markdown
    text = (Path(config.config_file_path).parent / source).read_text(encoding="utf-8")
    return _LINK.sub(lambda match: f"]({root_link_to_docs(match.group(1))})", text)
