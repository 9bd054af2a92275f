"""Build the HTML template for `dvc plots show` (`.vega/template.html`, never committed, named by
`plots.html_template` in `.dvc/config`): vega, vega-lite and vega-embed inlined, so the plots draw offline.

The set-up installs the npm packages into the ignored folder `.vega/` and inlines their builds. Without npm it
writes a template that loads them from their CDN (`--cdn`), as DVC's own template does: the plots then draw
only with internet access, but `dvc plots show` works either way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ast_core.io import atomic_write_text

BUILDS = ("vega/build/vega.min.js", "vega-lite/build/vega-lite.min.js", "vega-embed/build/vega-embed.min.js")
CDN = "https://cdn.jsdelivr.net/npm"
CDN_PACKAGES = ("vega@5", "vega-lite@5", "vega-embed@6")


def render(node_modules: Path) -> str:
    """The template text: DVC replaces `{plot_divs}` with one div and vegaEmbed call per plot."""
    missing = [build for build in BUILDS if not (node_modules / build).is_file()]
    if missing:
        raise FileNotFoundError(f"{node_modules / missing[0]} is missing: run `make plots-offline` "
                                "(npm install vega@5 vega-lite@5 vega-embed@6 into .vega)")
    return page("\n".join(f"<script>{(node_modules / build).read_text()}</script>" for build in BUILDS))


def render_cdn() -> str:
    """The template text loading the three libraries from their CDN (no npm at set-up)."""
    return page("\n".join(f'<script src="{CDN}/{package}"></script>' for package in CDN_PACKAGES))


def page(scripts: str) -> str:
    """An HTML page with `scripts` in its head and DVC's `{plot_divs}` placeholder in its body."""
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n<title>DVC plots</title>\n"
            f"{scripts}\n</head>\n<body>\n{{plot_divs}}\n</body>\n</html>\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--node-modules", type=Path, default=Path(".vega/node_modules"))
    parser.add_argument("--out", type=Path, default=Path(".vega/template.html"))
    parser.add_argument("--cdn", action="store_true", help="load the libraries from their CDN (no npm)")
    args = parser.parse_args(argv)
    atomic_write_text(args.out, render_cdn() if args.cdn else render(args.node_modules))


if __name__ == "__main__":
    main()
