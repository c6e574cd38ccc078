"""A generated block of benchmarks/RESULTS.md: the text between `<!-- NAME:start -->` and `<!-- NAME:end -->` is
replaced by what a benchmark script renders from its committed result files, so no figure is typed by hand."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"


def replace_block(name: str, body: str, results: Path = RESULTS) -> None:
    """Put `body` in the block `name` (appended at the end of the file when there is none yet)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = results.read_text() if results.exists() else "# Results\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + start + "\n" + body + "\n" + end + "\n"
    results.write_text(text)


def publish(text: str, block: str | None) -> None:
    """Print a benchmark's rendered table and, when `block` names one, put it into RESULTS.md too."""
    print(text)
    if block:
        replace_block(block, text)
