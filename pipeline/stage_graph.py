"""The pipeline's stage graph as DVC sees it (`Repo.index.graph`, foreach/matrix stages expanded to names such
as ``buffer@ast`` and ``distill@ast-10-0``), dependencies first: what `ast-dd run --jobs N` and the Prefect flows
schedule, each stage as ``dvc --wait-for-lock repro --single-item <stage>``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.schema import ParamsError

TRAINING_STAGES = frozenset({"buffer", "distill", "evaluate", "baselines"})


@dataclass(frozen=True)
class StageNode:
    """One stage of the DVC graph: its address (what `dvc repro` accepts) and the stages it needs."""

    name: str
    upstream: tuple[str, ...]

    @property
    def group(self) -> str:
        """The dvc.yaml entry a foreach/matrix stage comes from (``distill@ast-10`` -> ``distill``)."""
        return self.name.rsplit(":", 1)[-1].split("@", 1)[0]

    @property
    def trains(self) -> bool:
        """Whether the stage trains networks (experts, distillation, evaluation): the device-bound stages."""
        return self.group in TRAINING_STAGES


def stage_graph(root: Path, targets: Sequence[str] | None = None) -> list[StageNode]:
    """The pipeline stages `targets` need (all when empty), dependencies first, in a stable order."""
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        if targets:
            wanted = set()
            for target in targets:
                try:
                    sources = repo.stage.collect(target)
                except DvcException as error:
                    raise ParamsError(f"targets: {target!r} is not a stage of {root / 'dvc.yaml'} ({error})") from error
                for source in sources:
                    wanted |= {source, *nx.descendants(graph, source)}
            graph = graph.subgraph(wanted)
        stages = [stage for stage in graph if getattr(stage, "cmd", None)]  # skip `dvc add` data stages
        graph = graph.subgraph(stages)
        order = nx.lexicographical_topological_sort(graph.reverse(copy=True), key=lambda stage: stage.addressing)
        return [StageNode(stage.addressing, tuple(sorted(dep.addressing for dep in graph.successors(stage))))
                for stage in order]
