"""docs/results.md: the project's results page, assembled by the report stage from the result tables it wrote
(`artifacts/report/tables/*.md`, committed), so no number on it is typed by hand; `render` of the committed
tables reproduces the committed page (a test checks it)."""

from __future__ import annotations

from pathlib import Path

RESULTS_DOCUMENT = Path("docs/results.md")
TABLES_LINK = "artifacts/report/tables"  # the tables, relative to the project root (links from docs/)

HEADER = """# Results

Written by `ast-dd report` (the last stage of `make run` and `dvc repro`) from the tables in
`artifacts/report/tables/`; do not edit by hand. Each table states its protocol, seeds and machine. The numbers
are one machine's: floating-point kernels differ between CPUs, thread counts and torch builds, and training
amplifies the differences, so compare your own experiments with each other (`dvc exp run -n baseline`, then
`dvc exp diff baseline <experiment>`), not with these.
"""

# (table stem, section heading, how it was produced)
SECTIONS = [
    ("results", "Default profile", "`make run` on `params.yaml` (`ast-dd run --jobs <cores>`: `dvc repro`, "
     "independent stages at once, one core each). Distilled rows: one set per distillation seed "
     "(`distill.seeds`), each scored on the test networks; real subsets and full-data training on the same "
     "networks, so each gain is paired network by network and seed by seed."),
    ("buffers", "Expert buffers of the default profile", "The buffer stage's summary of each trained variant."),
    ("seeds", "DVC experiments over distillation seeds", "Every DVC experiment of this project's MLflow store "
     "(`dvc exp run`, `ast-dd study run`), folded over its distillation seeds."),
    ("comparisons", "Paired comparisons of those experiments", "Pairs of rows of the table above."),
]

STUDIES = """## Studies

The paper's tables (AST Tables VII and VIII, MCT against MTT) and the sweeps that chose the defaults are DVC
experiments of the same pipeline, one page each in [docs/studies/](studies/), written by `ast-dd study report`
from the finished experiments (`ast-dd study run <name>`, settings in `profiles/studies/<name>.yaml`).
"""


def _section(heading: str, produced_by: str, table: str) -> str:
    """A table file (``## title``, note, table) under its section heading and the way it was produced."""
    body = table.split("\n", 1)[1].lstrip("\n") if table.startswith("## ") else table
    return f"## {heading}\n\n{produced_by}\n\n{body.rstrip()}\n"


def render(tables: Path) -> str:
    """The results page from the table files in `tables` (sections whose table is missing or empty are left
    out), then where the studies are."""
    parts = [HEADER]
    for stem, heading, produced_by in SECTIONS:
        path = tables / f"{stem}.md"
        if path.is_file() and "(no rows)" not in path.read_text():
            parts.append(_section(heading, produced_by, path.read_text()))
    return "\n".join([*parts, STUDIES])
