"""A self-contained HTML page from the markdown medctl writes (no dependencies, one file to send around).

The subset: ATX headings (``#`` .. ``######``), paragraphs, pipe tables with an alignment row, fenced
code blocks, flat ``-``/``*`` and ``1.`` lists, ``---`` rules, ``>`` quotes, and inline ``code``,
``**bold**``, ``*italic*``, links and images. Images with a local path are read relative to
``base_dir`` and embedded as base64 data URIs, so the page needs no other file; an image that is not
there is shown as a visible "missing image" line and logged, never silently dropped. Everything else
is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from medctl.progress import log
from medctl.runs import write_text_atomic

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

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_BULLET = re.compile(r"^\s*[-*+]\s+(.*)$")
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+(.*)$")
_RULE = re.compile(r"^\s*([-*_])(\s*\1){2,}\s*$")
_IMAGE_LINE = re.compile(r"^\s*!\[([^\]]*)\]\(([^)\s]+)(?:\s+\"([^\"]*)\")?\)\s*$")
_INLINE = re.compile(
    r"(?P<code>`[^`]+`)"
    r"|(?P<image>!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\))"
    r"|(?P<link>\[(?P<text>[^\]]+)\]\((?P<href>[^)\s]+)\))"
    r"|(?P<bold>\*\*(?P<strong>.+?)\*\*)"
    r"|(?P<italic>(?<![\w*])\*(?P<em>[^*\s](?:[^*]*[^*\s])?)\*(?![\w*]))"
)


def markdown_to_html(md_text: str, base_dir: str | Path, title: str = "") -> str:
    """One HTML page (inline CSS, images as data URIs) from ``md_text``; images resolve against ``base_dir``."""
    base = Path(base_dir)
    body = "\n".join(_blocks(md_text.splitlines(), base))
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
    for line in md_text.splitlines():
        match = _HEADING.match(line)
        if match:
            return re.sub(r"[`*]", "", match.group(2))
    return ""


# -------------------------------------------------------------------------------------------- blocks
def _blocks(lines: list[str], base: Path) -> list[str]:
    out: list[str] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            out.append(f"<p>{_inline(' '.join(s.strip() for s in paragraph), base)}</p>")
            paragraph.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if _FENCE.match(line):  # fenced code: verbatim up to the closing fence
            flush()
            fence = _FENCE.match(line).group(1)
            language = line.strip()[3:].strip()
            code = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                code.append(lines[i])
                i += 1
            cls = f' class="language-{html.escape(language)}"' if language else ""
            out.append(f"<pre><code{cls}>{html.escape(chr(10).join(code))}</code></pre>")
            i += 1
            continue
        if not line.strip():
            flush()
            i += 1
            continue
        heading = _HEADING.match(line)
        if heading:
            flush()
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2), base)}</h{level}>")
            i += 1
            continue
        if "|" in line and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1]):
            flush()
            end = i + 2
            while end < len(lines) and lines[end].strip().startswith("|"):
                end += 1
            out.append(_table(lines[i], lines[i + 1], lines[i + 2 : end], base))
            i = end
            continue
        if _RULE.match(line) and not paragraph:
            out.append("<hr>")
            i += 1
            continue
        image = _IMAGE_LINE.match(line)
        if image and not paragraph:
            alt, src, caption = image.group(1), image.group(2), image.group(3) or image.group(1)
            figcaption = f"<figcaption>{_inline(caption, base)}</figcaption>" if caption else ""
            out.append(f"<figure>{_image(alt, src, base)}{figcaption}</figure>")
            i += 1
            continue
        if _BULLET.match(line) or _NUMBERED.match(line):
            flush()
            pattern, tag = (_BULLET, "ul") if _BULLET.match(line) else (_NUMBERED, "ol")
            items: list[str] = []
            while i < len(lines) and lines[i].strip():
                match = pattern.match(lines[i])
                if match:
                    items.append(match.group(1))
                elif items and lines[i].startswith((" ", "\t")):  # continuation of the item above
                    items[-1] += " " + lines[i].strip()
                else:
                    break
                i += 1
            rendered = "".join(f"<li>{_inline(item, base)}</li>" for item in items)
            out.append(f"<{tag}>{rendered}</{tag}>")
            continue
        if line.lstrip().startswith(">"):
            flush()
            quoted = []
            while i < len(lines) and lines[i].lstrip().startswith(">"):
                quoted.append(lines[i].lstrip()[1:].removeprefix(" "))
                i += 1
            out.append(f"<blockquote>{''.join(_blocks(quoted, base))}</blockquote>")
            continue
        paragraph.append(line)
        i += 1
    flush()
    return out


def _cells(row: str) -> list[str]:
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", row)]


def _table(header: str, rule: str, rows: list[str], base: Path) -> str:
    aligns = []
    for spec in _cells(rule):
        left, right = spec.startswith(":"), spec.endswith(":")
        aligns.append("center" if left and right else "right" if right else "left" if left else "")

    def row_html(cells: list[str], tag: str) -> str:
        parts = []
        for j, cell in enumerate(cells):
            align = aligns[j] if j < len(aligns) else ""
            style = f' style="text-align:{align}"' if align else ""
            parts.append(f"<{tag}{style}>{_inline(cell, base)}</{tag}>")
        return "<tr>" + "".join(parts) + "</tr>"

    head = row_html(_cells(header), "th")
    body = "\n".join(row_html(_cells(r), "td") for r in rows)
    return f"<table>\n<thead>{head}</thead>\n<tbody>\n{body}\n</tbody>\n</table>"


# -------------------------------------------------------------------------------------------- inline
def _inline(text: str, base: Path) -> str:
    out, pos = [], 0
    for match in _INLINE.finditer(text):
        out.append(html.escape(text[pos : match.start()]))
        if match.group("code"):
            out.append(f"<code>{html.escape(match.group('code')[1:-1])}</code>")
        elif match.group("image"):
            out.append(_image(match.group("alt"), match.group("src"), base))
        elif match.group("link"):
            href = html.escape(match.group("href"), quote=True)
            out.append(f'<a href="{href}">{_inline(match.group("text"), base)}</a>')
        elif match.group("bold"):
            out.append(f"<strong>{_inline(match.group('strong'), base)}</strong>")
        else:
            out.append(f"<em>{_inline(match.group('em'), base)}</em>")
        pos = match.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


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
