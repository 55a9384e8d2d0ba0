"""A self-contained HTML page from the markdown medctl writes: one file to send around.

markdown-it-py parses CommonMark plus GFM pipe tables; raw HTML in the text (a class or file name like
``<tag>``) is escaped, never passed through. Images with a local path are read relative to ``base_dir``
and embedded as base64 data URIs, so the page needs no other file; an image that is not there is
shown as a visible "missing image" line and logged, never silently dropped.
"""

from __future__ import annotations

import base64
import functools
import html
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote

from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token
from markdown_it.utils import OptionsDict

from medctl.io import write_text_atomic
from medctl.progress import log

MIME = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".svg": "image/svg+xml",
    ".webp": "image/webp",
}

CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328;
       margin: 0; background: #f6f8fa; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1, h2, h3 { line-height: 1.25; margin: 1.4em 0 0.5em; }
h1 { font-size: 1.9em; border-bottom: 1px solid #d1d9e0; padding-bottom: 0.3em; }
h2 { font-size: 1.45em; border-bottom: 1px solid #d1d9e0; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; display: block; overflow-x: auto; }
th, td { border: 1px solid #d1d9e0; padding: 4px 10px; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
code { font: 0.9em ui-monospace, Menlo, Consolas, monospace; background: #eff1f3; padding: 1px 4px;
       border-radius: 4px; }
pre { background: #f6f8fa; padding: 12px; overflow-x: auto; border-radius: 6px; }
pre code { background: none; padding: 0; }
img { max-width: 100%; height: auto; }
figure { margin: 1em 0; }
figcaption { color: #59636e; font-size: 0.9em; }
blockquote { margin: 0.8em 0; padding: 0 1em; color: #59636e; border-left: 4px solid #d1d9e0; }
.missing { color: #b42318; font-weight: 600; }
"""

def markdown_to_html(md_text: str, base_dir: str | Path, title: str = "") -> str:
    """One HTML page (inline CSS, images as data URIs) from ``md_text``; images resolve against ``base_dir``."""
    body = _parser().render(md_text, {"base": Path(base_dir)})
    title = title or _first_heading(md_text) or "medctl report"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def write_report(md_text: str, out_dir: str | Path, name: str = "report") -> tuple[Path, Path]:
    """Write ``<name>.md`` and its self-contained ``<name>.html`` into ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    md_path, html_path = out_dir / f"{name}.md", out_dir / f"{name}.html"
    write_text_atomic(md_path, md_text)
    write_text_atomic(html_path, markdown_to_html(md_text, out_dir))
    return md_path, html_path


def _first_heading(md_text: str) -> str:
    tokens = _parser().parse(md_text)
    for opening, inline in zip(tokens, tokens[1:], strict=False):
        if opening.type == "heading_open":
            return "".join(child.content for child in inline.children or [] if child.type in {"text", "code_inline"})
    return ""


@functools.cache
def _parser() -> MarkdownIt:
    """CommonMark with GFM tables; raw HTML in the text is escaped, never passed through."""
    parser = MarkdownIt("commonmark", {"html": False}).enable("table")
    parser.add_render_rule("image", _render_image)
    return parser


def _render_image(self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: dict) -> str:
    token = tokens[idx]
    alt = self.renderInlineAsText(token.children or [], options, env)
    return _image(alt, unquote(str(token.attrGet("src") or "")), env["base"])


def _image(alt: str, src: str, base: Path) -> str:
    alt_attr = html.escape(alt, quote=True)
    if src.startswith(("data:", "http://", "https://")):
        return f'<img src="{html.escape(src, quote=True)}" alt="{alt_attr}">'
    path = (base / src).resolve() if not Path(src).is_absolute() else Path(src)
    mime = MIME.get(path.suffix.lower())
    if mime is None or not path.is_file():
        reason = "unsupported image type" if path.is_file() else "not found"
        log(f"report: image {src} {reason} (looked in {base}); the page shows a placeholder")
        return f'<span class="missing">missing image: {html.escape(src)} ({reason})</span>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:{mime};base64,{data}" alt="{alt_attr}">'
