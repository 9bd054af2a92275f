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
     "(`dvc exp run`, `ast-dd ablate`), folded over its distillation seeds."),
    ("comparisons", "Paired comparisons of those experiments", "Pairs of rows of the table above."),
]

STALE_STUDIES = [
    ("buffers_study", "AST Table VII at CPU size (`ast-dd study buffers`)"),
    ("modules_study", "AST Table VIII and MCT at CPU size (`ast-dd study modules`)"),
    ("convergence_study", "MCT vs MTT convergence on validation (`ast-dd study modules`)"),
    ("sweep_study", "Hyperparameter sweep on validation (`ast-dd study sweep`)"),
]

STALE_NOTE = """## Studies awaiting re-production

These tables were computed before test networks were separated from the networks that select the kept set:
their test networks share seeds with the validation networks, and their ± is a population std (ddof 0) without
paired tests. They are kept as files, not as results: no claim is made from them until they are re-produced
through the pipeline under the protocol above.
"""


def _section(heading: str, produced_by: str, table: str) -> str:
    """A table file (``## title``, note, table) under its section heading and the way it was produced."""
    body = table.split("\n", 1)[1].lstrip("\n") if table.startswith("## ") else table
    return f"## {heading}\n\n{produced_by}\n\n{body.rstrip()}\n"


def render(tables: Path) -> str:
    """The results page from the table files in `tables` (sections whose table is missing or empty are left
    out; stale study tables are listed, not shown)."""
    parts = [HEADER]
    for stem, heading, produced_by in SECTIONS:
        path = tables / f"{stem}.md"
        if path.is_file() and "(no rows)" not in path.read_text():
            parts.append(_section(heading, produced_by, path.read_text()))
    stale = [(stem, title) for stem, title in STALE_STUDIES if (tables / f"{stem}.md").is_file()]
    if stale:
        parts.append(STALE_NOTE + "\n" + "".join(f"- {title}: [{stem}.md](../{TABLES_LINK}/{stem}.md)\n"
                                                 for stem, title in stale))
    return "\n".join(parts)
