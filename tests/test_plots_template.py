"""The `dvc plots show` template: inlined libraries with npm, their CDN without it; DVC's placeholder in both."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import plots_template


def test_the_template_without_npm_loads_the_libraries_from_their_cdn(tmp_path: Path) -> None:
    out = tmp_path / "template.html"
    plots_template.main(["--cdn", "--out", str(out)])
    text = out.read_text()
    assert "{plot_divs}" in text
    for package in ("vega@5", "vega-lite@5", "vega-embed@6"):
        assert f'<script src="https://cdn.jsdelivr.net/npm/{package}"></script>' in text


def test_the_offline_template_inlines_the_builds_and_names_a_missing_one(tmp_path: Path) -> None:
    for build in plots_template.BUILDS:
        (tmp_path / build).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / build).write_text(f"/* {build} */")
    text = plots_template.render(tmp_path)
    assert "{plot_divs}" in text and all(f"<script>/* {build} */</script>" in text for build in plots_template.BUILDS)
    (tmp_path / plots_template.BUILDS[1]).unlink()
    with pytest.raises(FileNotFoundError, match="vega-lite.min.js is missing"):
        plots_template.render(tmp_path)
