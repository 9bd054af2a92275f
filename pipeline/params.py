"""params.yaml: every setting of the pipeline, grouped by stage, validated before any compute.

`load_params(path)` returns a frozen `Params`; an unknown key or a bad value raises `ParamsError` whose
message starts with the dotted key (e.g. ``distill.configs.ast.perturb_rho: ...``).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ast_core.settings import (
    ARCHITECTURES,
    BETA_MODES,
    CORESET_METHODS,
    DATASETS,
    HYPER_FIELDS,
    INIT_METHODS,
    PROTOCOLS,
    SWITCH_FIELDS,
    DistillConfig,
    ExpertConfig,
)
from pipeline.schema import ParamsError, from_mapping, to_mapping

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-")


def check_seeds(key: str, seeds: list[int] | tuple[int, ...]) -> None:
    """Seeds for repeated runs: a non-empty list of distinct integers >= 0."""
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ParamsError(f"{key}: {list(seeds)} must be distinct integers >= 0")


def check_minimums(section: str, obj: Any, minimums: dict[str, int]) -> None:
    """Each named integer field of `obj` must be >= its minimum; the error names `section.field`."""
    for name, low in minimums.items():
        value = getattr(obj, name)
        if value < low:
            raise ParamsError(f"{section}.{name}: {value!r} must be an integer >= {low}")


def _check_name(key: str, name: str) -> None:
    if not name or set(name) - NAME_CHARS:
        raise ParamsError(f"{key}: {name!r} must be lower-case letters, digits, '_' or '-'")


@dataclass(frozen=True)
class DataParams:
    dataset: str = "fashion_mnist"          # a name from ast_core.data.DATASETS or imagefolder:PATH
    root: str | None = None
    val_size: int | float = 5000             # validation split carved from train (count or fraction)
    zca: bool = False
    zca_eps: float = 0.1
    # What ZCA is fitted on: raw = [0, 1] pixels with no mean/std normalisation (the MTT/AST code); normalized =
    # after mean/std, where the same eps regularises 1/std^2 (8-25x) less (docs/method.md section 8, item 7).
    zca_fit: Literal["raw", "normalized"] = "raw"

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS and not self.dataset.startswith("imagefolder:"):
            raise ParamsError(f"data.dataset: {self.dataset!r} is unknown; allowed: {', '.join(DATASETS)} "
                              "or imagefolder:PATH")
        if self.val_size <= 0 or (isinstance(self.val_size, float) and self.val_size >= 1):
            raise ParamsError(f"data.val_size: {self.val_size!r} must be a fraction of the training split in (0, 1) "
                              "or a number of images >= 1 (model selection needs a split)")
        if self.zca_eps < 0:
            raise ParamsError(f"data.zca_eps: {self.zca_eps!r} must be >= 0")


@dataclass(frozen=True)
class ModelParams:
    arch: str = "convnet"
    width: int = 128
    depth: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ParamsError(f"model.arch: {self.arch!r} is unknown; allowed: {', '.join(ARCHITECTURES)}")
        if self.width < 1 or (self.depth is not None and self.depth < 1):
            raise ParamsError(f"model.width/depth: must be positive, got {self.width}/{self.depth}")


# Keys a buffer variant may not set: they come from `model` and `buffer` so that variants stay comparable.
VARIANT_FIXED = ("arch", "width", "depth", "epochs", "batch_size", "zca")
# A variant with `source` imports MTT-family replay_buffer_*.pt files (a path or glob, relative to the project)
# instead of training; its other keys describe how those experts were trained, where known.
SOURCE_KEY = "source"


def expert_variant(name: str, spec: dict[str, Any]) -> ExpertConfig:
    """Validate one `buffer.variants.<name>` entry as the AST/MTT expert settings it stands for (its `source`,
    for imported experts, is `BufferParams.source`)."""
    key = f"buffer.variants.{name}"
    fixed = sorted(set(spec) & set(VARIANT_FIXED))
    if fixed:
        raise ParamsError(f"{key}.{fixed[0]}: set it under model/buffer, not per variant")
    source = spec.get(SOURCE_KEY)
    if source is not None and (not isinstance(source, str) or not source.strip()):
        raise ParamsError(f"{key}.{SOURCE_KEY}: {source!r} must be a path or glob of MTT replay_buffer_*.pt files")
    return from_mapping(ExpertConfig, {k: v for k, v in spec.items() if k != SOURCE_KEY}, key)


@dataclass(frozen=True)
class BufferParams:
    num_experts: int = 10
    epochs: int = 50
    batch_size: int = 256
    train_size: int | None = None            # experts see a class-balanced subset of this size (None: all)
    workers: int = 1                         # local process pool size
    cluster: str | None = None               # Dask scheduler address: one expert per task on that cluster
    storage_dtype: Literal["float32", "float16"] = "float32"
    mct_anchors: list[int] = field(default_factory=lambda: [2, 4])
    mct_beta: str = "arclength"
    train: list[str] = field(default_factory=lambda: ["ast"])   # the variants this pipeline trains
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"ast": {}})   # ExpertConfig fields

    def __post_init__(self) -> None:
        check_minimums("buffer", self, {"num_experts": 1, "epochs": 1, "batch_size": 1, "workers": 1})
        if self.train_size is not None and self.train_size < 1:
            raise ParamsError(f"buffer.train_size: {self.train_size!r} must be a positive integer or null")
        if any(not 2 <= n <= self.epochs + 1 for n in self.mct_anchors):  # anchors are distinct epochs 0..epochs
            raise ParamsError(f"buffer.mct_anchors: {list(self.mct_anchors)} must all be in 2..{self.epochs + 1} "
                              f"(buffer.epochs + 1 = {self.epochs + 1} stored parameter sets)")
        if self.mct_beta not in BETA_MODES:
            raise ParamsError(f"buffer.mct_beta: {self.mct_beta!r} is unknown; allowed: {', '.join(BETA_MODES)}")
        if not self.train:
            raise ParamsError("buffer.train: at least one variant is needed")
        for name in self.train:
            if name not in self.variants:
                raise ParamsError(f"buffer.train: {name!r} is not defined in buffer.variants "
                                  f"({', '.join(self.variants)})")
        for name, spec in self.variants.items():
            _check_name(f"buffer.variants.{name}", name)
            variant = expert_variant(name, spec)
            if variant.lr_decay_epoch is not None and variant.lr_decay_epoch >= self.epochs:
                raise ParamsError(f"buffer.variants.{name}.lr_decay_epoch: {variant.lr_decay_epoch} must be < "
                                  f"buffer.epochs ({self.epochs})")

    def source(self, name: str) -> str | None:
        """The MTT buffer files `buffer.variants.<name>` imports (path or glob), None for a trained variant."""
        return self.variants[name].get(SOURCE_KEY)

    def variant(self, name: str) -> ExpertConfig:
        """The expert settings of `buffer.variants.<name>` (KeyError names the undefined variant)."""
        if name not in self.variants:
            raise KeyError(f"buffer.variants.{name} is not defined ({', '.join(self.variants)})")
        return expert_variant(name, self.variants[name])


@dataclass(frozen=True)
class InitParams:
    buffer: str = "ast"           # which buffer variant's final expert embeds the real images
    expert_index: int = 0
    plot_classes: int = 5         # classes in the 2-D PCA picture (AST Fig. 10)


def distill_config_fields(names: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """(name, type, default) of DistillConfig's fields `names`, so the params sections built from them declare
    no setting a second time (types, defaults and checks stay in ast_core/settings.py)."""
    hints = typing.get_type_hints(DistillConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    return [(name, hints[name], field(default=defaults[name])) for name in names]


def params_section(name: str, fields: list[tuple[str, Any, Any]], doc: str) -> type:
    """A frozen dataclass of params.yaml built from field specs (importable and picklable like a written one)."""
    section = dataclasses.make_dataclass(name, fields, frozen=True, namespace={"__doc__": doc})
    section.__module__ = __name__
    return section


Hyper = params_section("Hyper", distill_config_fields(HYPER_FIELDS),
                       "Distillation hyperparameters that may differ per ipc (docs/method.md section 7): "
                       "ast_core.settings.HYPER_FIELDS of DistillConfig.")


def check_hyper_keys(section: str, keys: Any) -> None:
    """Every key of a mapping that overrides distill.hyper values (a row's `hyper`) is one."""
    for key in keys:
        if key not in HYPER_FIELDS:
            raise ParamsError(f"{section}.{key}: not a distill.hyper key; allowed: {', '.join(HYPER_FIELDS)}")


MethodParams = params_section("MethodParams", [
    ("buffer", str, field(default="ast")),
    ("mct_anchors", int | None, field(default=None)),   # None: the plain stored trajectory; n: n-anchor convexified
    ("init", str, field(default="representative")),
    *distill_config_fields(SWITCH_FIELDS),
    ("hyper", dict[str, int | float], field(default_factory=dict)),   # this row's own distill.hyper values
], "One distillation method = one ablation row: buffer, trajectory form, init and the switches "
   "(ast_core.settings.SWITCH_FIELDS of DistillConfig).")

METHOD_KEYS = tuple(f.name for f in dataclasses.fields(MethodParams))


@dataclass(frozen=True)
class DistillParams:
    ipcs: list[int] = field(default_factory=lambda: [10])
    methods: list[str] = field(default_factory=lambda: ["ast"])
    num_experts: int | None = None      # use the first n experts of the buffer (None: all)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])   # one distilled set per seed (a DVC matrix axis)
    checkpoint_every: int = 100
    devices: int = 1                    # processes one cell runs on (GPUs, or CPU processes): not a DVC dependency
    eval_every: int = 100               # validation accuracy for best-set selection (0: only at the end)
    eval_models: int = 1
    eval_iterations: int = 300
    hyper: Hyper = field(default_factory=Hyper)
    per_ipc: dict[str, dict[str, Any]] = field(default_factory=dict)
    configs: dict[str, MethodParams] = field(default_factory=lambda: {"ast": MethodParams()})

    def __post_init__(self) -> None:
        if not self.ipcs or any(ipc < 1 for ipc in self.ipcs):
            raise ParamsError(f"distill.ipcs: {list(self.ipcs)} must be positive integers")
        if not self.methods:
            raise ParamsError(f"distill.methods: list at least one distill.configs row ({', '.join(self.configs)})")
        for name in self.methods:
            if name not in self.configs:
                raise ParamsError(f"distill.methods: {name!r} has no entry in distill.configs "
                                  f"(defined: {', '.join(self.configs)})")
        for name, row in self.configs.items():
            _check_name(f"distill.configs.{name}", name)
            if row.init not in INIT_METHODS:
                raise ParamsError(f"distill.configs.{name}.init: {row.init!r} is unknown; allowed: "
                                  f"{', '.join(INIT_METHODS)}")
            check_hyper_keys(f"distill.configs.{name}.hyper", row.hyper)
        for key in self.per_ipc:
            if not key.isdigit():
                raise ParamsError(f"distill.per_ipc.{key}: keys are ipc values such as '10'")
            from_mapping(Hyper, {**dataclasses.asdict(self.hyper), **self.per_ipc[key]}, f"distill.per_ipc.{key}")
        check_seeds("distill.seeds", self.seeds)
        if self.num_experts is not None and self.num_experts < 1:
            raise ParamsError(f"distill.num_experts: {self.num_experts!r} must be a positive integer or null (all)")
        check_minimums("distill", self, {"checkpoint_every": 1, "devices": 1, "eval_every": 0, "eval_models": 1,
                                         "eval_iterations": 1})

    def hyper_for(self, ipc: int) -> Hyper:
        return from_mapping(Hyper, {**dataclasses.asdict(self.hyper), **self.per_ipc.get(str(ipc), {})},
                            f"distill.per_ipc.{ipc}")


@dataclass(frozen=True)
class EvaluateParams:
    num_models: int = 5
    seed: int = 1000                    # test network i has seed `seed + i`: never a selection network's seed
    iterations: int = 1000
    protocol: str = "ast"
    batch_size: int = 256
    archs: list[str] = field(default_factory=lambda: ["convnet"])
    baselines: list[str] = field(default_factory=lambda: list(CORESET_METHODS))
    full_data_epochs: int = 0           # >0: also train on the full training split (upper bound)

    def __post_init__(self) -> None:
        if not self.archs:
            raise ParamsError(f"evaluate.archs: list at least one architecture ({', '.join(ARCHITECTURES)})")
        if self.protocol not in PROTOCOLS:
            raise ParamsError(f"evaluate.protocol: {self.protocol!r} is unknown; allowed: {', '.join(PROTOCOLS)}")
        for arch in self.archs:
            if arch not in ARCHITECTURES:
                raise ParamsError(f"evaluate.archs: {arch!r} is unknown; allowed: {', '.join(ARCHITECTURES)}")
        for name in self.baselines:
            if name not in CORESET_METHODS:
                raise ParamsError(f"evaluate.baselines: {name!r} is unknown; allowed: "
                                  f"{', '.join(CORESET_METHODS)}")
        check_minimums("evaluate", self, {"num_models": 1, "seed": 0, "iterations": 1, "batch_size": 1,
                                          "full_data_epochs": 0})


@dataclass(frozen=True)
class StudyParams:
    """What a study overlay (`profiles/studies/<name>.yaml`, run by `ast-dd study run <name>`) adds to its
    settings; no stage depends on this section, so a study reuses every stage another run already computed."""

    name: str | None = None   # set on each of the study's DVC experiments (MLflow tag `study`)
    title: str = ""           # the heading of the study's table
    grid: dict[str, list[Any]] = field(default_factory=dict)   # a sweep: params key -> values; one experiment
                                                                # per point, scored on validation only

    def __post_init__(self) -> None:
        for key, values in self.grid.items():
            if not values:
                raise ParamsError(f"study.grid.{key}: list at least one value")

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values (the cartesian product, in the order written); one empty
        point without a grid."""
        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.grid.values())]


@dataclass(frozen=True)
class TrackingParams:
    experiment: str = "ast-dd"

    def __post_init__(self) -> None:
        if not self.experiment.strip():
            raise ParamsError("tracking.experiment: name the MLflow experiment runs are logged to (e.g. ast-dd)")


@dataclass(frozen=True)
class Params:
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    buffer: BufferParams = field(default_factory=BufferParams)
    init: InitParams = field(default_factory=InitParams)
    distill: DistillParams = field(default_factory=DistillParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    study: StudyParams = field(default_factory=StudyParams)

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ParamsError(f"seed: {self.seed!r} must be >= 0")
        shared = set(self.validation_seeds) & set(self.test_seeds)
        if shared:
            raise ParamsError(f"evaluate.seed: test networks {self.test_seeds} would share seeds {sorted(shared)} with "
                              f"the validation networks that select the kept set (seed .. seed + "
                              f"distill.eval_models - 1 = {self.validation_seeds}); choose an evaluate.seed >= "
                              f"{self.seed + self.distill.eval_models}")
        if self.init.buffer not in self.buffer.train:
            raise ParamsError(f"init.buffer: {self.init.buffer!r} is not trained by buffer.train "
                              f"({', '.join(self.buffer.train)})")
        if not 0 <= self.init.expert_index < self.buffer.num_experts:
            raise ParamsError(f"init.expert_index: {self.init.expert_index} must be in [0, buffer.num_experts)")
        count = self.distill.num_experts
        if count is not None and count > self.buffer.num_experts:
            raise ParamsError(f"distill.num_experts: {count} is more than the buffer.num_experts "
                              f"({self.buffer.num_experts}) a buffer holds")
        for name in self.distill.methods:
            self.check_runnable(name, self.distill.configs[name])
        self.check_devices()
        for name in self.distill.configs:  # every row, run now or by an experiment or study later
            for ipc in self.distill.ipcs:
                self.distill_config(name, ipc, seed=self.distill.seeds[0])  # raises ParamsError naming the key
        try:  # distill.hyper's own values, even those that per_ipc shadows at every ipc
            DistillConfig(ipc=self.distill.ipcs[0], seed=self.distill.seeds[0],
                          **dataclasses.asdict(self.distill.hyper))
        except ValueError as error:
            raise ParamsError(f"distill.hyper.{str(error).split('=', 1)[0]}: {error}") from error

    def check_runnable(self, name: str, method: MethodParams) -> None:
        """A row this run distils needs its buffer trained and its convexified form built (names the key)."""
        key = f"distill.configs.{name}"
        if method.buffer not in self.buffer.train:
            raise ParamsError(f"{key}.buffer: {method.buffer!r} is not trained by buffer.train "
                              f"({', '.join(self.buffer.train)})")
        if method.mct_anchors is not None and method.mct_anchors not in self.buffer.mct_anchors:
            raise ParamsError(f"{key}.mct_anchors: {method.mct_anchors} is not built by buffer.mct_anchors "
                              f"({list(self.buffer.mct_anchors)})")

    def check_devices(self) -> None:
        """distill.devices > 1 splits each student step's batch over that many processes (docs/method.md section
        12): one GPU each where CUDA is used, a student without batch norm (its samples are coupled) and batches
        of at least one image per process (an empty share would skip a collective and hang the others)."""
        devices = self.distill.devices
        if devices == 1:
            return
        for method in self.distill.methods:
            for ipc in self.distill.ipcs:
                batch = self.distill_config(method, ipc, seed=self.distill.seeds[0]).batch_syn
                if batch is not None and batch < devices:
                    raise ParamsError(f"{self._origin(method, ipc, 'batch_syn')}: {batch} images per student step "
                                      f"cannot be split over distill.devices: {devices} processes; raise it to >= "
                                      f"{devices}, or null for the whole set")
        if self.model.arch.endswith("_bn"):
            raise ParamsError(f"distill.devices: {devices} needs a student without batch norm; model.arch "
                              f"{self.model.arch!r} couples its samples (use {self.model.arch[:-3]!r} or devices: 1)")
        import torch

        visible = torch.cuda.device_count()
        uses_cuda = self.device == "cuda" or (self.device == "auto" and visible > 0)
        if uses_cuda and devices > visible:
            raise ParamsError(f"distill.devices: {devices} GPUs asked for but {visible} are visible "
                              "(CUDA_VISIBLE_DEVICES); lower distill.devices or set device: cpu")

    def _origin(self, method: str, ipc: int, setting: str) -> str:
        """Where a distillation setting of one cell comes from: the key to fix, then the cell it broke."""
        cell = f"(distill.configs.{method} at ipc {ipc})"
        if setting in self.distill.configs[method].hyper:
            return f"distill.configs.{method}.hyper.{setting} (ipc {ipc})"
        if setting in self.distill.per_ipc.get(str(ipc), {}):
            return f"distill.per_ipc.{ipc}.{setting} {cell}"
        if setting in HYPER_FIELDS:
            return f"distill.hyper.{setting} {cell}"
        if setting in METHOD_KEYS:
            return f"distill.configs.{method}.{setting} (ipc {ipc})"
        return f"distill.configs.{method} (ipc {ipc})"

    @property
    def validation_seeds(self) -> list[int]:
        """Seeds of the networks that score candidate sets during distillation (selection): `seed` onwards."""
        return [self.seed + i for i in range(self.distill.eval_models)]

    @property
    def test_seeds(self) -> list[int]:
        """Seeds of the networks that score every reported set, distilled or baseline (`evaluate.seed` onwards);
        disjoint from `validation_seeds` (checked on load), so no reported number was selected on them."""
        return [self.evaluate.seed + i for i in range(self.evaluate.num_models)]

    def shadowed_hyper_keys(self) -> list[str]:
        """`distill.hyper` keys that `distill.per_ipc` overrides at every ipc of `distill.ipcs`: editing them
        changes nothing."""
        overridden = [set(self.distill.per_ipc.get(str(ipc), {})) for ipc in self.distill.ipcs]
        return sorted(set.intersection(*overridden)) if overridden else []

    def distill_config(self, method: str, ipc: int, *, seed: int) -> DistillConfig:
        """The ast_core DistillConfig of one (method, ipc) cell and distillation `seed` (segment sampling, DSA,
        batches, random-real init, perturbation: one of `distill.seeds`), checked against the buffer length."""
        hyper, chosen = self.distill.hyper_for(ipc), self.distill.configs[method]
        if chosen.hyper:
            hyper = from_mapping(Hyper, {**dataclasses.asdict(hyper), **chosen.hyper},
                                 f"distill.configs.{method}.hyper")
        switches = {key: getattr(chosen, key) for key in SWITCH_FIELDS}
        try:
            config = DistillConfig(ipc=ipc, seed=seed, **dataclasses.asdict(hyper), **switches)
        except ValueError as error:
            setting = str(error).split("=", 1)[0]
            raise ParamsError(f"{self._origin(method, ipc, setting)}: {error}") from error
        needed = config.epochs_needed
        if needed > self.buffer.epochs:
            raise ParamsError(f"{self._origin(method, ipc, 'max_start_epoch')}: max_start_epoch + "
                              f"expert_epochs = {needed} epochs but buffer.epochs is {self.buffer.epochs}")
        return config


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading exponent floats as YAML 1.2 does (DVC's reader and writer): `1e-05`, which
    `dvc exp run -S key=1e-5` writes, is a number, not the text YAML 1.1 makes of it."""


Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                   list("-+.0123456789"))


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of a settings file names the same key twice (YAML would silently keep the last)."""


def _unique_mapping(loader: Yaml12Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in first_line:
            raise DuplicateKeyError(f"key {key!r} appears twice, on lines {first_line[key]} and {line}; keep one")
        first_line[key] = line
    return loader.construct_mapping(node, deep=deep)


Yaml12Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _read_yaml(file: Path, what: str) -> dict[str, Any]:
    if not file.is_file():
        raise ParamsError(f"{what}: {file} does not exist")
    try:
        raw = yaml.load(file.read_text(), Loader=Yaml12Loader)  # noqa: S506 (a SafeLoader)
    except DuplicateKeyError as error:
        raise ParamsError(f"{what}: {file}: {error}") from error
    except yaml.YAMLError as error:
        raise ParamsError(f"{what}: {file} is not valid YAML: {error}") from error
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{what}: {file} must hold a mapping of settings")
    return raw or {}


def overlay(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` merged in: mappings merge key by key, anything else (lists too) is replaced."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = overlay(merged[key], value)
        else:
            merged[key] = value
    return merged


PROFILES = "profiles"


def settings_yaml(params: Params) -> str:
    """Every resolved setting as a complete params file (`ast-dd params`; loads back to the same Params)."""
    return yaml.safe_dump(to_mapping(params), sort_keys=False)


def overlay_file(profile: str | Path, root: Path | None = None) -> Path:
    """A profile as a file: a path as given, or a bare name (``gpu``) as `<root>/profiles/<name>.yaml`."""
    path = Path(profile)
    if path.suffix or len(path.parts) > 1:
        return path
    return (root or Path.cwd()) / PROFILES / f"{profile}.yaml"


def read_overlays(files: list[Path]) -> dict[str, Any]:
    """The profiles' own settings merged in order (later files win), not yet applied to params.yaml."""
    merged: dict[str, Any] = {}
    for file in files:
        merged = overlay(merged, _read_yaml(file, "--profile"))
    return merged


def load_params(path: str | Path = "params.yaml", profiles: list[str | Path] | tuple = ()) -> Params:
    """Read and validate params.yaml with each profile overlay (only the keys it changes; a file or a name in
    profiles/) merged on top, in order; ParamsError names the first bad key."""
    path = Path(path)
    raw = _read_yaml(path, "params")
    raw = overlay(raw, read_overlays([overlay_file(profile, path.parent) for profile in profiles]))
    return from_mapping(Params, raw)
