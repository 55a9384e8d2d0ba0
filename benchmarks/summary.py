"""Regenerate the "Where each target stands" table at the top of benchmarks/RESULTS.md.

    uv run python benchmarks/summary.py            # rewrite the table in place
    uv run python benchmarks/summary.py --print    # print it, change nothing

RESULTS.md is a dated log that the benchmark scripts append to. This script reads that log and, for each
target in DESIGN.md's table (and the ones issues added), finds the newest section that measured it, pulls
the figure out of the line that holds it, and writes one row: figure, target, met or not, machine, date.
A target that no section measured says so ("not measured") instead of borrowing an older or smaller run.
The log below the table is never changed.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- summary:begin -->", "<!-- summary:end -->"
HEADING = re.compile(r"^## (?P<title>.+?)\s*(?:—|\()\s*(?P<date>\d{4}-\d{2}-\d{2}(?: \d{2}:\d{2})?)")


@dataclass(frozen=True)
class Section:
    title: str
    date: str
    lines: tuple[str, ...]

    @property
    def machine(self) -> str:
        """'2-core Intel(R) Xeon(R) Processor, no GPU' from a machine table or a '- machine:' line."""
        text = "\n".join(self.lines)
        cores = re.search(r"\| cores \| (\d+) \||cores (\d+)|(\d+) cores", text)
        cpu = re.search(r"\| cpu \| ([^|]+) \||cpu ([^;,]+?)(?:[;,]|$)", text, re.MULTILINE)
        gpu = re.search(r"\| gpu \| ([^|]+) \||gpu ([^;,]+?)(?:[;,]|$)", text, re.MULTILINE)
        parts = []
        if cores:
            parts.append(f"{next(g for g in cores.groups() if g)}-core")
        if cpu:
            parts.append(next(g for g in cpu.groups() if g).strip())
        gpu_name = next((g for g in gpu.groups() if g), "").strip() if gpu else ""
        parts.append("no GPU" if gpu_name in ("", "none") else gpu_name)
        return " ".join(parts[:-1]) + f", {parts[-1]}" if len(parts) > 1 else parts[0]


@dataclass(frozen=True)
class Measured:
    figure: str
    met: bool | None  # None: the log gives a figure but no verdict can be read from it


@dataclass(frozen=True)
class Target:
    """One promise: which sections may measure it, and how to read its figure from one."""

    name: str
    goal: str
    sections: str  # regex on the section title
    read: Callable[[Section], Measured | None]
    not_measured: str = "not measured"


def parse(text: str) -> list[Section]:
    """The log's '## title — date' sections, in file order."""
    sections: list[Section] = []
    heading: tuple[str, str] | None = None
    body: list[str] = []
    for line in [*text.splitlines(), "## end"]:
        if line.startswith("## "):
            if heading is not None:
                sections.append(Section(*heading, tuple(body)))
            dated = HEADING.match(line)
            heading, body = ((dated["title"], dated["date"]) if dated else (line[3:].strip(), "")), []
        elif heading is not None:
            body.append(line)
    return sections


def verdict_row(label: str) -> Callable[[Section], Measured | None]:
    """A table row '| <label ...> | <figure> PASS |' whose own cell says PASS or MISS."""
    pattern = re.compile(rf"^\| {label}[^|]*\| (?P<value>[^|]+?) \|")

    def read(section: Section) -> Measured | None:
        for line in section.lines:
            found = pattern.match(line)
            if found and re.search(r"\b(PASS|MISS)\b", found["value"]):
                headline = found["value"].split(";")[0]  # '1.60x PASS; training epochs alone 1.71x'
                figure = re.sub(r"\s*\b(PASS|MISS)\b", "", headline).strip()
                return Measured(figure, "PASS" in found["value"])
        return None

    return read


def demo_run(section: Section) -> Measured | None:
    for line in section.lines:
        found = re.search(r"fresh run: (\d+) s wall, peak memory ([\d.]+) GB", line)
        if found:
            seconds, gigabytes = int(found[1]), float(found[2])
            return Measured(f"{seconds} s, {gigabytes} GB", seconds < 300 and gigabytes < 4)
    return None


def workers_scale(section: Section) -> Measured | None:
    rates = {}
    for line in section.lines:
        found = re.match(r"^\| preprocess build, (\d+) worker\(s\), samples/s \| ([\d.]+)", line)
        if found:
            rates[int(found[1])] = float(found[2])
    if len(rates) < 2:
        return None
    fewest, most = min(rates), max(rates)
    return Measured(f"{rates[most]} vs {rates[fewest]} samples/s ({most} vs {fewest} workers)",
                    rates[most] > rates[fewest])


def rerun_decodes_nothing(section: Section) -> Measured | None:
    for line in section.lines:
        found = re.match(r"^\| preprocess rerun, nothing new \| ([^|]+?) \|", line)
        if found:
            return Measured(found[1], bool(re.search(r"\b0 decoded\b", found[1])))
    return None


def memory_bound(section: Section) -> Measured | None:
    """bench_memory.py: the largest medctl preprocess row, its peak RSS against the 3x source + 1 GB bound."""
    rows = [line for line in section.lines if "| medctl preprocess |" in line]
    if not rows:
        return None
    cells = [cell.strip() for cell in rows[-1].strip("|").split("|")]
    return Measured(f"{cells[0]}: peak {cells[3]}, bound {cells[5].split()[0]} GiB", cells[5].endswith("PASS"))


def gpu_only(section: Section) -> Measured | None:
    """A GPU target counts only from a section that ran on a GPU."""
    return None if section.machine.endswith("no GPU") else Measured("see section", None)


TARGETS = (
    Target("epoch from the cache vs MONAI LoadImaged+resize", ">= 25x", r"^bench_cache\.py$",
           verdict_row(r"cache vs MONAI")),
    Target("epoch from the cache vs bare np.load", ">= 70%", r"^bench_cache\.py$",
           verdict_row(r"cache vs (?:bare np\.load|fair limit)")),
    Target("preprocess scales with workers", "more workers, more samples/s", r"^bench_cache\.py$",
           workers_scale),
    Target("preprocess rerun with nothing new", "no decoding", r"^bench_cache\.py$", rerun_decodes_nothing),
    Target("preprocess memory, 300-512 cubed CT", "<= 3x source + 1 GB", r"^bench_memory\.py$", memory_bound),
    Target("linear probe, cached features vs encoder every epoch", ">= 30x", r"^bench_probe\.py",
           verdict_row(r"(?:speed-up|whole run, speed-up)")),
    Target("probe grid of 20 heads vs one head, cached embeddings", "<= 2x wall time", r"^bench_probe\.py",
           verdict_row(r"cached embeddings, linear: grid / one head")),
    Target("probe grid of 20 attentive heads vs one, cached tokens", "<= 4x wall time", r"^bench_probe\.py",
           verdict_row(r"cached tokens, attentive: grid / one head")),
    Target("medctl demo on a 2-core CPU", "< 300 s, < 4 GB", r"^medctl demo", demo_run),
    Target("vit3d_base fine-tune at [64, 384, 384], bf16, one H100", ">= 45% MFU", r"^vit3d throughput",
           gpu_only, "not measured: no GPU lent yet"),
    Target("integrated gradients, one [64, 384, 384] volume, one H100", "< 10 s", r"^saliency maps",
           gpu_only, "not measured: no GPU lent yet"),
)


def summary_rows(sections: list[Section]) -> list[tuple[str, ...]]:
    rows = []
    for target in TARGETS:
        found = None
        for section in reversed(sections):
            if re.search(target.sections, section.title) and (measured := target.read(section)):
                found = (section, measured)
                break
        if found is None:
            rows.append((target.name, target.not_measured, target.goal, "—", "—", "—"))
            continue
        section, measured = found
        met = {True: "met", False: "**not met**", None: "see log"}[measured.met]
        rows.append((target.name, measured.figure, target.goal, met, section.machine, section.date))
    return rows


def summary_block(sections: list[Section]) -> str:
    header = ("target", "latest figure", "goal", "status", "machine", "date")
    lines = [
        BEGIN,
        "## Where each target stands",
        "",
        "The newest figure in the log below for each target; regenerate with "
        "`uv run python benchmarks/summary.py`.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(row) + " |" for row in summary_rows(sections)),
        END,
    ]
    return "\n".join(lines)


def with_summary(text: str) -> str:
    """The RESULTS.md text with its summary block replaced (or inserted after the title paragraph)."""
    log = re.sub(rf"{re.escape(BEGIN)}.*?{re.escape(END)}\n*", "", text, flags=re.DOTALL)
    block = summary_block(parse(log))
    first_section = log.find("\n## ")
    if first_section < 0:
        return log.rstrip("\n") + "\n\n" + block + "\n"
    return log[: first_section + 1] + block + "\n\n" + log[first_section + 1 :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="print the table, do not rewrite RESULTS.md")
    args = parser.parse_args()
    text = RESULTS.read_text()
    if args.print:
        print(summary_block(parse(text)))
        return
    RESULTS.write_text(with_summary(text))
    print(f"wrote the summary table into {RESULTS}")


if __name__ == "__main__":
    main()
