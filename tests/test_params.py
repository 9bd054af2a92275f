"""params.yaml validation: every bad key or value fails before compute, naming the dotted key."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.params import load_params
from pipeline.schema import ParamsError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "params.yaml").read_text())


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def with_change(path: str, value) -> dict:
    data = copy.deepcopy(DEFAULT)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


def documented_commands(profile: Path) -> list[list[str]]:
    """The commands a profile's header comment gives on lines of their own (`ast-dd ...` or
    `.venv/bin/ast-dd ...`, continued with a backslash), as argument lists."""
    lines = [line.lstrip("#").strip() for line in profile.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.startswith(("ast-dd ", ".venv/bin/ast-dd "))]


def test_default_params_are_valid() -> None:
    load_params(ROOT / "params.yaml")


def test_exponent_floats_read_as_dvc_writes_them(tmp_path: Path) -> None:
    """`dvc exp run -S distill.hyper.lr_lr=1e-5` writes 1e-05, text to YAML 1.1 but a number to DVC."""
    text = (ROOT / "params.yaml").read_text().replace("lr_lr: 1.0e-07", "lr_lr: 1e-05", 1)
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml").distill.hyper.lr_lr == 1e-5
    (tmp_path / "params.yaml").write_text(text.replace("lr_lr: 1e-05", "lr_lr: '1e-5'", 1))
    with pytest.raises(ParamsError, match=r"distill.hyper.lr_lr: expected a number, got '1e-5' \(quoted, so it is "
                                          r"text; write 1e-5 without quotes\)"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("profile", sorted(p.relative_to(ROOT / "profiles").as_posix()
                                           for p in (ROOT / "profiles").rglob("*.yaml")))
def test_each_profile_resolves_to_a_valid_parameter_set_as_its_header_documents(profile: str) -> None:
    commands = documented_commands(ROOT / "profiles" / profile)
    assert commands, f"profiles/{profile} documents no `ast-dd ...` command"
    for command in commands:
        assert Path(command[0]).name == "ast-dd"
        if profile.startswith("studies/"):   # a study: `ast-dd study run <name>`, every experiment checked
            from pipeline.studies import plan

            assert command[1:] == ["study", "run", Path(profile).stem], command
            assert plan(Path(profile).stem, ROOT / "params.yaml")
            continue
        overlays = [value for option, value in zip(command, command[1:], strict=False) if option == "--profile"]
        assert any(Path(o).stem == Path(profile).stem for o in overlays), command
        load_params(ROOT / "params.yaml", [ROOT / o if "/" in o else o for o in overlays])


def test_overlay_profiles_hold_only_what_differs_from_params_yaml() -> None:
    """A profile that repeats a value of params.yaml would silently pin it when params.yaml changes."""
    def same(base: object, overlay: object, key: str) -> list[str]:
        if isinstance(base, dict) and isinstance(overlay, dict):
            return [k for name in overlay if name in base for k in same(base[name], overlay[name], f"{key}.{name}")]
        return [key] if base == overlay and not isinstance(overlay, dict) else []

    for name in ("tiny", "gpu"):
        overlay = yaml.safe_load((ROOT / "profiles" / f"{name}.yaml").read_text())
        assert same(DEFAULT, overlay, name) == []


BAD = [
    ("seed", -1, "seed"),
    ("device", "tpu", "device"),
    ("typo_key", 1, "typo_key: unknown key"),
    ("data.dataset", "imagenet21k", "data.dataset"),
    ("data.val_size", 0, "data.val_size"),
    ("data.zca", "yes", "data.zca"),
    ("data.zca_eps", -0.1, "data.zca_eps"),
    ("model.arch", "mlp", "model.arch"),
    ("model.width", 0, "model.width"),
    ("buffer.num_experts", 0, "buffer.num_experts"),
    ("buffer.epochs", "ten", "buffer.epochs"),
    ("buffer.storage_dtype", "int8", "buffer.storage_dtype"),
    ("buffer.mct_anchors", [1], "buffer.mct_anchors"),
    ("buffer.mct_beta", "cubic", "buffer.mct_beta"),
    ("buffer.train", ["adamw"], "buffer.train"),
    ("buffer.variants.sgd.optimizer", "rmsprop", "buffer.variants.sgd"),
    ("buffer.variants.ast.lr", -0.01, "buffer.variants.ast"),
    ("buffer.variants.ast.lr_decay_epoch", 99, "buffer.variants.ast.lr_decay_epoch"),
    ("buffer.variants.ast.momentum_typo", 0.9, "buffer.variants.ast.momentum_typo: unknown key"),
    ("buffer.variants.ast.gp_norm", "channel", "gp_norm='channel' is invalid; allowed: one of sample, pixel"),
    ("buffer.variants.ast.gp_sided", "both", "gp_sided='both' is invalid; allowed: one of two_sided, one_sided"),
    ("buffer.variants.ast.clip_schedule", "cosine", "clip_schedule='cosine' is invalid; allowed: one of paper, code"),
    ("buffer.variants.ast.weight_decay", -1e-3, "buffer.variants.ast: ExpertConfig.weight_decay"),
    ("buffer.variants.ast.gp_weight", -2.0, "buffer.variants.ast: ExpertConfig.gp_weight"),
    ("buffer.variants.ast.lr_decay_factor", 0.0, "lr_decay_factor=0.0 is invalid; allowed: a number in (0, 1]"),
    ("buffer.variants.ast.lr_decay_factor", 1.5, "lr_decay_factor=1.5 is invalid; allowed: a number in (0, 1]"),
    ("buffer.variants.ast.lr_decay_rebuild", "yes", "buffer.variants.ast.lr_decay_rebuild"),
    ("study.grid", {"distill.hyper.lr_img": []}, "study.grid.distill.hyper.lr_img: list at least one value"),
    ("study.title", 3, "study.title: expected a string"),
    ("init.buffer", "ast", "init.buffer"),
    ("init.expert_index", 7, "init.expert_index"),
    ("distill.ipcs", [0], "distill.ipcs"),
    ("distill.methods", ["nope"], "distill.methods"),
    ("distill.seeds", [1, 1], "distill.seeds: [1, 1] must be distinct integers >= 0"),
    ("evaluate.seed", -1, "evaluate.seed: -1 must be an integer >= 0"),
    ("distill.hyper.lr_img", -100.0, "distill.hyper.lr_img (distill.configs.ast at ipc 1): lr_img=-100.0"),
    ("distill.hyper.max_start_epoch", 30, "distill.hyper.max_start_epoch"),
    ("distill.hyper.batch_syn", 0, "batch_syn"),
    ("distill.configs.ast.sampling", "random", "distill.configs.ast"),
    ("distill.configs.ast.init", "kmeans", "distill.configs.ast.init: 'kmeans' is unknown"),
    ("distill.configs.ast.perturb_rho", -1.0, "perturb_rho"),
    ("distill.configs.ast.perturb_rho", float("nan"), "distill.configs.ast.perturb_rho: nan must be a finite number"),
    ("distill.configs.ast.perturb_form", "layer", "perturb_form='layer' is not supported; allowed: paper, code"),
    ("distill.configs.ast.matching_denominator", "x", "matching_denominator='x' is not supported"),
    ("distill.configs.ast.balance_middle", "round", "balance_middle='round' is not supported; allowed: half, floor"),
    ("distill.configs.ast.vartheta", 1.0, "distill.configs.ast.vartheta (ipc 1): vartheta=1.0"),
    ("distill.configs.ast.vartheta", float("nan"), "distill.configs.ast.vartheta: nan must be a finite number"),
    ("distill.hyper.student_momentum", 1.0, "distill.hyper.student_momentum (distill.configs.ast at ipc 1): "
                                            "student_momentum=1.0 must be in [0, 1)"),
    ("distill.hyper.student_momentum", -0.1, "student_momentum=-0.1 must be in [0, 1)"),
    ("distill.hyper.max_image_growth", 0.0, "max_image_growth=0.0 must be a finite number > 0"),
    ("distill.configs.ast.image_ema", 1.5, "distill.configs.ast.image_ema (ipc 1): image_ema=1.5 must be in [0, 1)"),
    ("distill.configs.ast.soft_labels", "yes", "distill.configs.ast.soft_labels"),
    ("distill.configs.ast.intermediate_spacing", "even", "intermediate_spacing='even' is not supported"),
    ("distill.hyper.window_start", 9, "distill.hyper.window_start (distill.configs.ast at ipc 1): window_start=9"),
    ("distill.hyper.skip_threshold", 0.0, "skip_threshold=0.0 must be null (never skip) or a finite number > 0"),
    ("distill.hyper.lr_y", -2.0, "lr_y=-2.0 must be a finite number > 0"),
    ("buffer.variants.ast.sam_rho", -0.1, "buffer.variants.ast: ExpertConfig.sam_rho=-0.1 is invalid"),
    ("buffer.variants.ast.source", "", "buffer.variants.ast.source: '' must be a path or glob"),
    ("distill.per_ipc", {"ten": {"lr_img": 1.0}}, "distill.per_ipc.ten"),
    ("distill.per_ipc", {"10": {"lr_imgs": 1.0}}, "distill.per_ipc.10.lr_imgs: unknown key"),
    ("evaluate.protocol", "dc", "evaluate.protocol"),
    ("evaluate.archs", ["vit"], "evaluate.archs"),
    ("evaluate.baselines", ["forgetting"], "evaluate.baselines"),
    ("evaluate.num_models", 0, "evaluate.num_models: 0 must be an integer >= 1"),
    ("evaluate.batch_size", 0, "evaluate.batch_size: 0 must be an integer >= 1"),
    ("evaluate.archs", [], "evaluate.archs: list at least one architecture"),
    ("distill.methods", [], "distill.methods: list at least one distill.configs row"),
    ("distill.num_experts", 0, "distill.num_experts: 0 must be a positive integer or null"),
    ("distill.eval_models", 0, "distill.eval_models: 0 must be an integer >= 1"),
    ("distill.hyper.lr_img", float("inf"), "distill.hyper.lr_img: inf must be a finite number"),
    ("data.zca_eps", float("nan"), "data.zca_eps: nan must be a finite number"),
    ("buffer.variants.ast.gp_target", float("nan"), "buffer.variants.ast.gp_target: nan must be a finite number"),
    ("buffer.mct_anchors", [99], "buffer.mct_anchors: [99] must all be in 2.."),
    ("buffer.workers", 0, "buffer.workers: 0 must be an integer >= 1"),
    ("tracking.experiment", " ", "tracking.experiment: name the MLflow experiment"),
    ("distill.configs.ast.hyper", {"lr_imgs": 3.0}, "distill.configs.ast.hyper.lr_imgs: not a distill.hyper key"),
    ("distill.configs.ast.hyper", {"lr_img": -3.0}, "distill.configs.ast.hyper.lr_img (ipc 1): lr_img=-3.0"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_bad_value_names_the_key(tmp_path: Path, key: str, value, message: str) -> None:
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, with_change(key, value)))
    assert message in str(error.value)


def test_distill_seeds_seed_only_distillation(tmp_path: Path) -> None:
    default = load_params(ROOT / "params.yaml")
    assert default.distill.seeds == (0, 1, 2)
    assert [default.distill_config("ast", 10, seed=s).seed for s in default.distill.seeds] == [0, 1, 2]
    seeded = load_params(write(tmp_path, with_change("distill.seeds", [7])))
    assert seeded.distill_config("ast", 10, seed=7).seed == 7
    assert seeded.seed == default.seed  # the split, experts and validation networks keep the top-level seed


def test_test_networks_never_share_a_seed_with_selection_networks(tmp_path: Path) -> None:
    """The default streams are disjoint, and a setting that would make them meet is refused before compute."""
    default = load_params(ROOT / "params.yaml")
    assert default.validation_seeds == [0, 1, 2] and default.test_seeds == [1000, 1001, 1002, 1003, 1004]
    assert not set(default.validation_seeds) & set(default.test_seeds)
    with pytest.raises(ParamsError, match=r"evaluate.seed: test networks \[2, 3, 4, 5, 6\] would share seeds \[2\]"):
        load_params(write(tmp_path, with_change("evaluate.seed", 2)))
    data = with_change("seed", 1000)
    with pytest.raises(ParamsError, match="evaluate.seed: .* choose an evaluate.seed >= 1003"):
        load_params(write(tmp_path, data))


def test_buffer_variant_gives_the_expert_settings() -> None:
    params = load_params(ROOT / "params.yaml")
    ast = params.buffer.variant("ast")
    assert (ast.lr, ast.momentum, ast.grad_penalty, ast.clip_ce) == (0.01, 0.9, True, True)
    assert params.buffer.variant("sgd").momentum == 0.0
    with pytest.raises(KeyError, match="buffer.variants.adam"):
        params.buffer.variant("adam")


def test_mct_method_needs_its_anchors_built(tmp_path: Path) -> None:
    data = with_change("distill.methods", ["mct4"])
    data["buffer"]["train"] = ["ast", "sgd"]
    data["init"]["buffer"] = "sgd"
    with pytest.raises(ParamsError, match="distill.configs.mct4.mct_anchors"):
        load_params(write(tmp_path, data))


def test_cli_exits_2_and_names_the_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, with_change("model.arch", "mlp"))
    assert main(["prepare", "--params", str(path)]) == 2
    assert "model.arch" in caplog.text
    assert main(["params", "--params", str(tmp_path / "missing.yaml")]) == 2


def test_cli_rejects_a_cell_outside_the_matrix(caplog: pytest.LogCaptureFixture) -> None:
    assert main(["distill", "--params", str(ROOT / "params.yaml"), "--method", "mct4"]) == 2
    assert "--method" in caplog.text


def test_a_row_may_override_distill_hyper_keys(tmp_path: Path) -> None:
    """distill.configs.<row>.hyper replaces distill.hyper values for that row only."""
    change = with_change("distill.configs.ast.hyper", {"lr_img": 30.0, "syn_steps": 7})
    params = load_params(write(tmp_path, change))
    config = params.distill_config("ast", 1, seed=0)
    assert (config.lr_img, config.syn_steps) == (30.0, 7)
    others = [name for name in params.distill.configs if name != "ast"]
    assert all(params.distill_config(name, 1, seed=0).lr_img == params.distill.hyper.lr_img for name in others)


def test_a_key_written_twice_is_an_error_naming_it_and_both_lines(tmp_path: Path) -> None:
    text = (ROOT / "params.yaml").read_text().replace("  zca: false\n", "  zca: false\n  zca: true\n", 1)
    path = tmp_path / "params.yaml"
    path.write_text(text)
    line = text.splitlines().index("  zca: false") + 1
    with pytest.raises(ParamsError, match=rf"key 'zca' appears twice, on lines {line} and {line + 1}"):
        load_params(path)


@pytest.mark.parametrize("value", [1.5, 1.0, 0.0])
def test_a_validation_fraction_outside_zero_one_fails_before_any_data_is_read(tmp_path: Path, value: float) -> None:
    with pytest.raises(ParamsError, match=rf"data.val_size: {value} must be a fraction of the training split"):
        load_params(write(tmp_path, with_change("data.val_size", value)))


def test_a_bad_distill_hyper_value_fails_even_where_per_ipc_shadows_it(tmp_path: Path) -> None:
    data = with_change("distill.hyper.iterations", 0)
    data["distill"]["per_ipc"] = {str(ipc): {"iterations": 50} for ipc in data["distill"]["ipcs"]}
    with pytest.raises(ParamsError, match="distill.hyper.iterations: iterations=0"):
        load_params(write(tmp_path, data))


def test_params_warns_of_a_distill_hyper_key_that_per_ipc_shadows_everywhere(tmp_path: Path, capsys,
                                                                              caplog) -> None:
    from pipeline.cli import main

    data = with_change("distill.hyper.lr_img", 30.0)
    data["distill"]["per_ipc"] = {str(ipc): {"lr_img": 100.0} for ipc in data["distill"]["ipcs"]}
    path = write(tmp_path, data)
    assert load_params(path).shadowed_hyper_keys() == ["lr_img"]
    assert load_params(ROOT / "params.yaml").shadowed_hyper_keys() == []
    assert main(["params", "--params", str(path)]) == 0
    assert "distill.hyper.lr_img has no effect: distill.per_ipc sets it for every ipc" in caplog.text
