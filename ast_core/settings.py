"""The method's settings and their validation; importing it costs no torch.

Every name registry (datasets, architectures, protocols, initialisations, modes and switches of the
distillation and expert settings, DSA families) and the settings dataclasses, `DistillConfig`, `ExpertConfig`
and `EvalSpec`, are declared here once. The modules that use them (`ast_core.data`, `ast_core.distill`,
`ast_core.experts`, ...) import them from here, so `from ast_core.distill import DistillConfig` keeps working,
while `pipeline.params` validates a params file without importing torch, torchvision or scikit-learn.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------------------------------------------------
# Name registries
# ---------------------------------------------------------------------------------------------------------

IMAGENET_SUBSETS: dict[str, list[str]] = {
    # MTT's `Config` lists ImageNet-1k class indices; these are the same classes as WordNet ids, in the
    # same order (label i is the i-th entry).
    "imagenette": ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
                   "n03394916", "n03417042", "n03425413", "n03445777", "n03888257"],
    "imagewoof": ["n02096294", "n02093754", "n02111889", "n02088364", "n02086240",
                  "n02089973", "n02087394", "n02115641", "n02099601", "n02105641"],
    "imagefruit": ["n07753275", "n07753592", "n07745940", "n07747607", "n07749582",
                   "n07768694", "n07753113", "n07720875", "n07718472", "n07742313"],
    "imagemeow": ["n02123045", "n02123159", "n02123394", "n02123597", "n02124075",
                  "n02129165", "n02129604", "n02128925", "n02128757", "n02127052"],
    "imagesquawk": ["n01806143", "n02007558", "n01818515", "n02051845", "n02056570",
                    "n01614925", "n01843383", "n01518878", "n01860187", "n01819313"],
    "imageyellow": ["n02206856", "n12057211", "n07753592", "n07749582", "n12144580",
                    "n04146614", "n03530642", "n02129165", "n01773157", "n01531178"],
}

DATASETS: tuple[str, ...] = (
    "fashion_mnist", "mnist", "cifar10", "cifar100", "svhn", "tiny_imagenet", *IMAGENET_SUBSETS, "digits",
)
# Datasets whose digits must not be mirrored (docs/method.md section 1: drop `flip` for MNIST/SVHN).
DIGIT_DATASETS: frozenset[str] = frozenset({"mnist", "svhn", "digits"})

# MTT/AST forms first, then torchvision's batch-norm versions (options).
ARCHITECTURES = ("convnet", "resnet18", "vgg11", "alexnet", "resnet18_bn", "vgg11_bn")
PROTOCOLS = ("ast", "mtt")                                # evaluation protocols (ast_core.evaluate)
EVAL_SPLITS = ("test", "val")                             # splits an evaluation scores on (ast_core.evaluate)
INIT_METHODS = ("representative", "real", "noise")        # synthetic-set initialisations (ast_core.init)
CORESET_METHODS = ("random", "herding", "kcenter", "kmeans")   # coreset baselines (ast_core.baselines)
BETA_MODES = ("arclength", "uniform")                     # MCT anchor parameterisation (ast_core.trajectory)

# Expert training (ast_core.experts, ast_core.losses).
OPTIMIZERS = ("sgd", "momentum", "adam")
GP_NORMS = ("sample", "pixel")
GP_SIDES = ("two_sided", "one_sided")
CLIP_SCHEDULES = ("paper", "code")

# Distillation (ast_core.distill).
SAMPLING = ("discrete", "continuous")
INTERMEDIATE_WEIGHTS = ("equal", "varied")
GRADIENT_MODES = ("unroll", "tesla")
PERTURB_FORMS = ("paper", "code")
DENOMINATORS = ("unperturbed", "perturbed")
BALANCE_MIDDLES = ("half", "floor")
INTERMEDIATE_SPACINGS = ("paper", "code")                 # Eq. 22's steps: floor(k N / M) | (N // M) k

# Differentiable Siamese Augmentation (ast_core.augment).
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
FAMILIES: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")
_IDENTITY = ("", "none")


# ---------------------------------------------------------------------------------------------------------
# Checks shared with the compute modules
# ---------------------------------------------------------------------------------------------------------

def parse_dsa_strategy(strategy: str) -> tuple[str, ...]:
    """Split a DSA strategy `a_b_c` into families; `none`/empty give the identity (an empty tuple)."""
    if not isinstance(strategy, str):
        raise ValueError(f"strategy={strategy!r} must be a string such as {DEFAULT_STRATEGY!r}")
    if strategy.strip().lower() in _IDENTITY:
        return ()
    families = tuple(strategy.split("_"))
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(
            f"strategy={strategy!r} has unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
            f"allowed families: {', '.join(FAMILIES)} (joined by '_'), or 'none'"
        )
    return families


def dsa_strategy_for(dataset: str, strategy: str = DEFAULT_STRATEGY) -> str:
    """Return `strategy` adapted to `dataset`: `flip` is dropped for digit datasets (mnist, svhn, digits)."""
    families = parse_dsa_strategy(strategy)
    key = dataset.strip().lower().replace("-", "_")
    if key in DIGIT_DATASETS:
        families = tuple(f for f in families if f != "flip")
    return "_".join(families) if families else "none"


def _real(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_positive_int(value: Any) -> bool:
    """An int >= 1 that is not a bool (YAML's `true` must not count as 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_fields(settings: object, checks: dict[str, tuple[bool, str]]) -> None:
    """Raise ValueError for the first field whose check failed, naming `Class.field`, its value and what is allowed.

    `checks` maps a field name to (passed?, description of the allowed values).
    """
    for name, (ok, allowed) in checks.items():
        if not ok:
            raise ValueError(f"{type(settings).__name__}.{name}={getattr(settings, name)!r} is invalid; "
                             f"allowed: {allowed}")


def check_balance(vartheta: float, log_base: float, middle: str) -> None:
    """The settings of the balanced inner-loop loss (Eq. 20, `ast_core.matching.balance_factor`) are valid."""
    if not (math.isfinite(vartheta) and vartheta > 1 and math.isfinite(log_base) and log_base > 1):
        raise ValueError(f"vartheta={vartheta} and log_base={log_base} must be finite numbers > 1 so that nu > 0")
    if middle not in BALANCE_MIDDLES:
        raise ValueError(f"balance_middle={middle!r} is not supported; allowed: {', '.join(BALANCE_MIDDLES)}")


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistillConfig:
    """Every setting of one distillation run; validated on construction (before any compute)."""

    ipc: int = 10
    iterations: int = 1000
    syn_steps: int = 20                  # N
    expert_epochs: int = 2               # M
    max_start_epoch: float = 20          # T+
    batch_syn: int | None = None         # None: the whole synthetic set per student step
    lr_img: float = 100.0
    lr_lr: float = 1e-5
    lr_teacher: float = 0.01             # initial alpha
    img_momentum: float = 0.5
    lr_momentum: float = 0.5
    min_syn_lr: float = 1e-8             # alpha is kept >= this (positive)
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    sampling: str = "discrete"           # "continuous": MCT start epochs in U(0, T+)
    balanced_loss: bool = False          # Eq. 20
    vartheta: float = 8.0
    log_base: float = math.e
    intermediate_matching: bool = False  # Eq. 22
    intermediate_weights: str = "equal"
    perturb_rho: float = 0.0             # Eq. 23; 0 disables
    perturb_form: str = "paper"          # paper: per filter of >= 2-D weights (Eq. 23) | code: conv layers, θ ⊙ d
    intermediate_spacing: str = "paper"  # Eq. 22 steps: floor(k N / M) (paper) | (N // M) k (code)
    matching_denominator: str = "unperturbed"  # Eq. 5 and 22 denominators from θ*_t, or from the perturbed start
    balance_middle: str = "half"         # Eq. 20's m: T+/2 (paper) or floor(T+/2) (code)
    max_image_growth: float = 100.0      # stop when the images' RMS exceeds this multiple of the initial RMS
    student_momentum: float = 0.0        # optional heavy-ball student update
    gradient: str = "unroll"             # "tesla": constant memory in N (no intermediate matching/momentum)
    soft_labels: bool = False            # DATM: learnable label logits, initialised from the experts' logits
    lr_y: float = 2.0                    # SGD lr of the label logits (DATM CIFAR-10 ipc 10 and 50)
    label_momentum: float = 0.9          # momentum of the label logits' SGD (DATM Momentum_y)
    window_start: float | None = None    # DATM: the start-epoch bound grows from this to T+; None: always T+
    window_iterations: int = 1           # iterations over which the bound grows from window_start to T+
    skip_threshold: float | None = None  # DATM: iterations with matching loss above this update nothing
    image_ema: float = 0.0               # FTD: decay of the images' moving average that validation scores; 0: off
    max_nonfinite: int = 10              # consecutive skipped iterations before giving up
    seed: int = 0

    def __post_init__(self) -> None:
        positive_ints = {"ipc": self.ipc, "iterations": self.iterations, "syn_steps": self.syn_steps,
                         "expert_epochs": self.expert_epochs, "max_nonfinite": self.max_nonfinite,
                         "window_iterations": self.window_iterations}
        for key, value in positive_ints.items():
            if not is_positive_int(value):
                raise ValueError(f"{key}={value!r} must be a positive integer")
        positive = {"lr_img": self.lr_img, "lr_lr": self.lr_lr, "lr_teacher": self.lr_teacher,
                    "min_syn_lr": self.min_syn_lr, "max_start_epoch": self.max_start_epoch,
                    "max_image_growth": self.max_image_growth, "lr_y": self.lr_y}
        for key, value in positive.items():
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{key}={value!r} must be a finite number > 0")
        for key, value in {"img_momentum": self.img_momentum, "lr_momentum": self.lr_momentum,
                           "student_momentum": self.student_momentum, "label_momentum": self.label_momentum,
                           "image_ema": self.image_ema}.items():
            if not 0 <= value < 1:  # NaN fails too
                raise ValueError(f"{key}={value!r} must be in [0, 1)")
        choices = {"sampling": (self.sampling, SAMPLING), "gradient": (self.gradient, GRADIENT_MODES),
                   "intermediate_weights": (self.intermediate_weights, INTERMEDIATE_WEIGHTS),
                   "perturb_form": (self.perturb_form, PERTURB_FORMS),
                   "matching_denominator": (self.matching_denominator, DENOMINATORS),
                   "balance_middle": (self.balance_middle, BALANCE_MIDDLES),
                   "intermediate_spacing": (self.intermediate_spacing, INTERMEDIATE_SPACINGS)}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{key}={value!r} is not supported; allowed: {', '.join(allowed)}")
        if self.batch_syn is not None and not is_positive_int(self.batch_syn):
            raise ValueError(f"batch_syn={self.batch_syn!r} must be a positive integer or null (all)")
        if not (math.isfinite(self.perturb_rho) and self.perturb_rho >= 0):
            raise ValueError(f"perturb_rho={self.perturb_rho!r} must be a finite number >= 0")
        check_balance(self.vartheta, self.log_base, self.balance_middle)
        for key in ("soft_labels", "balanced_loss", "intermediate_matching"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key}={getattr(self, key)!r} must be true or false")
        if self.window_start is not None and not (_real(self.window_start)
                                                  and 0 < self.window_start <= self.max_start_epoch):
            raise ValueError(f"window_start={self.window_start!r} must be null (no window) or a number in "
                             f"(0, max_start_epoch = {self.max_start_epoch}]")
        discrete_window = self.sampling == "discrete" and self.window_start is not None
        if discrete_window and self.window_start != int(self.window_start):
            raise ValueError(f"window_start={self.window_start} must be an integer with discrete sampling")
        if self.skip_threshold is not None and not (_real(self.skip_threshold) and self.skip_threshold > 0):
            raise ValueError(f"skip_threshold={self.skip_threshold!r} must be null (never skip) or a finite "
                             "number > 0")
        if self.sampling == "discrete" and float(self.max_start_epoch) != int(self.max_start_epoch):
            raise ValueError(f"max_start_epoch={self.max_start_epoch} must be an integer with discrete sampling")
        if self.gradient == "tesla" and (self.intermediate_matching or self.student_momentum):
            raise ValueError("gradient='tesla' supports neither intermediate_matching nor student_momentum; "
                             "use gradient='unroll' for them")

    def start_bound(self, iteration: int) -> float:
        """T+ of iteration `iteration` (0-based): with a DATM window, window_start + (T+ - window_start) *
        min(iteration / window_iterations, 1), rounded down to an integer for discrete sampling (DATM's
        `Sequential_Generation`); without one, T+."""
        if self.window_start is None:
            return float(self.max_start_epoch)
        grown = (self.max_start_epoch - self.window_start) * min(iteration / self.window_iterations, 1.0)
        bound = self.window_start + grown
        return float(math.floor(bound)) if self.sampling == "discrete" else bound

    @property
    def epochs_needed(self) -> float:
        """Epochs of a stored trajectory one match may read: start epochs up to T+ (discrete: 0 .. T+ - 1, MCT:
        U(0, T+)) plus M epochs ahead. The pipeline checks it against buffer.epochs, the engine against the
        trajectories it gets."""
        return self.max_start_epoch + self.expert_epochs - (1 if self.sampling == "discrete" else 0)


# How the pipeline exposes DistillConfig (pipeline/params.py builds its sections from these names, so each
# setting is declared once, here): hyperparameters that may differ per ipc (distill.hyper, distill.per_ipc,
# a row's `hyper`) and the switches of one method row (distill.configs.<row>). The remaining fields (ipc, seed,
# optimiser momenta, min_syn_lr, dsa_strategy, max_nonfinite) are set by the pipeline or fixed.
HYPER_FIELDS = ("iterations", "syn_steps", "expert_epochs", "max_start_epoch", "batch_syn", "lr_img", "lr_lr",
                "lr_teacher", "student_momentum", "max_image_growth", "lr_y", "window_start", "window_iterations",
                "skip_threshold")
SWITCH_FIELDS = ("sampling", "balanced_loss", "vartheta", "log_base", "intermediate_matching",
                 "intermediate_weights", "intermediate_spacing", "perturb_rho", "perturb_form",
                 "matching_denominator", "balance_middle", "gradient", "soft_labels", "label_momentum", "image_ema")


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    """How to train one expert. Defaults: AST smooth experts (SGD + momentum, lr halved at epoch 25,
    clipped CE 0.5 -> 1 over 5 epochs, two-sided GP with K = 1, μ = 1). The MTT baseline is
    ``ExpertConfig(optimizer="sgd", lr_decay_epoch=None, clip_ce=False, grad_penalty=False)``.

    The authors' code variant [C] (docs/method.md section 8) is ``clip_schedule="code"`` (λ = 0.5, 0.55, …, 0.95),
    ``lr=0.003``, ``lr_decay_factor=0.6``, ``lr_decay_rebuild=True`` (momentum reset at the lr step),
    ``weight_decay=1e-3``, ``gp_norm="pixel"``, ``gp_weight=2``; ``gp_sided="one_sided"`` is the paper's
    text ("below K") rather than its two-sided formula. FTD's flat experts: ``sam_rho`` > 0 (SAM), with
    ``sam_alpha`` > 0 GSAM.
    `dsa_strategy` None picks `dsa_strategy_for(dataset)`; "none" turns augmentation off. `zca` only
    records that the caller whitened the data (docs/method.md section 1).
    """

    arch: str = "convnet"
    width: int = 128
    depth: int | None = None
    epochs: int = 50
    batch_size: int = 256
    optimizer: str = "momentum"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_decay_epoch: int | None = 25
    lr_decay_factor: float = 0.5
    lr_decay_rebuild: bool = False       # reset the optimiser state (momentum) at the lr step, as [C]
    dsa_strategy: str | None = None
    clip_ce: bool = True
    clip_warmup_epochs: float = 5
    clip_start: float = 0.5
    clip_schedule: str = "paper"
    grad_penalty: bool = True
    gp_weight: float = 1.0
    gp_target: float = 1.0
    gp_norm: str = "sample"
    gp_sided: str = "two_sided"
    sam_rho: float = 0.0                 # FTD flat experts: SAM/GSAM neighbourhood radius; 0: plain steps
    sam_alpha: float = 0.0               # GSAM's surrogate-gap weight; 0: SAM
    zca: bool = False

    def __post_init__(self) -> None:
        def number(value: Any, low: float, high: float = math.inf) -> bool:
            real = isinstance(value, int | float) and not isinstance(value, bool)
            return real and math.isfinite(value) and low <= value <= high

        checks: dict[str, tuple[bool, str]] = {
            "arch": (self.arch in ARCHITECTURES, f"one of {', '.join(ARCHITECTURES)}"),
            "width": (is_positive_int(self.width), "a positive integer"),
            "depth": (self.depth is None or is_positive_int(self.depth), "None or a positive integer"),
            "epochs": (is_positive_int(self.epochs), "a positive integer"),
            "batch_size": (is_positive_int(self.batch_size), "a positive integer"),
            "optimizer": (self.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            "lr": (number(self.lr, 0.0) and self.lr > 0, "a finite number > 0"),
            "momentum": (number(self.momentum, 0.0) and self.momentum < 1, "a number in [0, 1)"),
            "weight_decay": (number(self.weight_decay, 0.0), "a finite number >= 0"),
            "lr_decay_epoch": (self.lr_decay_epoch is None or is_positive_int(self.lr_decay_epoch),
                               "None or a positive integer"),
            "lr_decay_factor": (number(self.lr_decay_factor, 0.0, 1.0) and self.lr_decay_factor > 0,
                                "a number in (0, 1]"),
            "lr_decay_rebuild": (isinstance(self.lr_decay_rebuild, bool), "True or False"),
            "dsa_strategy": (self.dsa_strategy is None or isinstance(self.dsa_strategy, str),
                             "None or a DSA strategy string such as 'color_crop_cutout_flip_scale_rotate'"),
            "clip_ce": (isinstance(self.clip_ce, bool), "True or False"),
            "clip_warmup_epochs": (number(self.clip_warmup_epochs, 0.0), "a finite number >= 0"),
            "clip_start": (number(self.clip_start, 0.0, 1.0), "a number in [0, 1]"),
            "clip_schedule": (self.clip_schedule in CLIP_SCHEDULES, f"one of {', '.join(CLIP_SCHEDULES)}"),
            "grad_penalty": (isinstance(self.grad_penalty, bool), "True or False"),
            "gp_weight": (number(self.gp_weight, 0.0), "a finite number >= 0"),
            "gp_target": (number(self.gp_target, 0.0), "a finite number >= 0"),
            "gp_norm": (self.gp_norm in GP_NORMS, f"one of {', '.join(GP_NORMS)}"),
            "gp_sided": (self.gp_sided in GP_SIDES, f"one of {', '.join(GP_SIDES)}"),
            "sam_rho": (number(self.sam_rho, 0.0), "a finite number >= 0 (0: no sharpness-aware step)"),
            "sam_alpha": (number(self.sam_alpha, 0.0, 1.0), "a number in [0, 1] (0: SAM, > 0: GSAM)"),
            "zca": (isinstance(self.zca, bool), "True or False"),
        }
        check_fields(self, checks)
        if self.dsa_strategy is not None:
            try:
                parse_dsa_strategy(self.dsa_strategy)
            except ValueError as exc:
                raise ValueError(f"ExpertConfig.dsa_strategy={self.dsa_strategy!r} is invalid: "
                                 f"{exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dsa_for(self, dataset: str) -> str:
        """The DSA strategy used on `dataset` (`dsa_strategy`, or the dataset's default when None)."""
        return dsa_strategy_for(dataset) if self.dsa_strategy is None else self.dsa_strategy

    def lr_at(self, epoch: int) -> float:
        """Learning rate of a 0-indexed epoch: `lr`, times `lr_decay_factor` from `lr_decay_epoch` on."""
        decayed = self.lr_decay_epoch is not None and epoch >= self.lr_decay_epoch
        return self.lr * (self.lr_decay_factor if decayed else 1.0)



@dataclass(frozen=True)
class EvalSpec:
    """How a set is scored (docs/method.md section 5): the networks trained on it, their schedule, the split.

    Validation during distillation and the final test use the same code with different specs; the pipeline
    builds both from params in one place (`pipeline/modelling.py::eval_spec`), so the evaluation networks
    have the student's and experts' width and depth. `width` and `depth` shape the ConvNet only (None:
    `ast_core.models.default_depth`). Seed, learning rate and images are per call, not part of the spec.
    """

    arch: str = "convnet"
    width: int = 128
    depth: int | None = None
    protocol: str = "ast"                # "ast": `iterations` SGD steps | "mtt": `iterations` epochs
    iterations: int = 1000
    num_models: int = 5                  # networks trained from seeds seed, seed + 1, ...
    batch_size: int = 256
    eval_split: str = "test"             # "val" for model selection, never the test split
    batched: bool = True                 # convnet: train the networks at once where faster; False: one by one

    def __post_init__(self) -> None:
        check_fields(self, {
            "arch": (self.arch in ARCHITECTURES, f"one of {', '.join(ARCHITECTURES)}"),
            "width": (is_positive_int(self.width), "a positive integer"),
            "depth": (self.depth is None or is_positive_int(self.depth), "None or a positive integer"),
            "protocol": (self.protocol in PROTOCOLS, f"one of {', '.join(PROTOCOLS)}"),
            "iterations": (is_positive_int(self.iterations), "a positive integer"),
            "num_models": (is_positive_int(self.num_models), "a positive integer"),
            "batch_size": (is_positive_int(self.batch_size), "a positive integer"),
            "eval_split": (self.eval_split in EVAL_SPLITS, f"one of {', '.join(EVAL_SPLITS)}"),
            "batched": (isinstance(self.batched, bool), "true or false"),
        })
