"""The field's files: MTT replay buffers in (official ConvNet layout, bit for bit), distilled sets out as MTT
tensors and an ImageFolder, any set scored again, and the errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from ast_core.field_files import (
    class_folders,
    export_image_folder,
    export_mtt_set,
    load_image_folder,
    load_mtt_buffer,
    load_mtt_set,
    mtt_expert_matrix,
)
from ast_core.models import FlatModel, build_model
from ast_core.trajectory import load_buffer
from pipeline.cli import main


class OfficialConvNet(nn.Module):
    """The ConvNet as the MTT code lays it out (utils/networks.py: `_make_layers`): per block a convolution
    (padding 3 on the first for one-channel images), GroupNorm(width, width) as instance norm, ReLU, 2x2 average
    pooling; then one linear classifier on the flattened features."""

    def __init__(self, channel: int, num_classes: int, width: int, depth: int, im_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels, size = channel, im_size
        for d in range(depth):
            padding = 3 if channel == 1 and d == 0 else 1
            layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=padding),
                       nn.GroupNorm(width, width, affine=True), nn.ReLU(inplace=True),
                       nn.AvgPool2d(kernel_size=2, stride=2)]
            in_channels, size = width, (size + 2 * padding - 2) // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).view(x.shape[0], -1))


def official_buffer(path: Path, experts: int = 2, epochs: int = 3) -> list[list[list[torch.Tensor]]]:
    """`replay_buffer_0.pt` as MTT's buffer.py writes it: per expert, per epoch, [p for p in net.parameters()]."""
    buffer = []
    for e in range(experts):
        torch.manual_seed(e)
        net = OfficialConvNet(1, 10, 4, 3, 28)
        trajectory = [[p.detach().cpu().clone() for p in net.parameters()]]
        for _ in range(epochs):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            trajectory.append([p.detach().cpu().clone() for p in net.parameters()])
        buffer.append(trajectory)
    torch.save(buffer, path)
    return buffer


def test_official_convnet_checkpoints_map_to_ours_bit_for_bit(tmp_path: Path) -> None:
    """Every imported checkpoint is the concatenation of the official parameter list, and our ConvNet with it
    computes what the official network computes."""
    written = official_buffer(tmp_path / "replay_buffer_0.pt")
    ours = FlatModel(build_model("convnet", 1, 10, 28, width=4, depth=3))
    x = torch.randn(5, 1, 28, 28)
    for index, expert in enumerate(load_mtt_buffer(tmp_path / "replay_buffer_0.pt")):
        matrix = mtt_expert_matrix(expert, ours, f"expert {index}", "convnet width 4")
        for epoch, tensors in enumerate(written[index]):
            assert torch.equal(matrix[epoch], torch.cat([t.reshape(-1) for t in tensors]))
            official = OfficialConvNet(1, 10, 4, 3, 28)
            with torch.no_grad():
                for p, t in zip(official.parameters(), tensors, strict=True):
                    p.copy_(t)
            torch.testing.assert_close(ours(matrix[epoch], x), official(x), rtol=1e-5, atol=1e-5)


def test_a_buffer_of_another_network_names_both_shapes_and_the_setting(tmp_path: Path) -> None:
    official_buffer(tmp_path / "replay_buffer_0.pt")
    wider = FlatModel(build_model("convnet", 1, 10, 28, width=8, depth=3))
    expert = load_mtt_buffer(tmp_path / "replay_buffer_0.pt")[0]
    with pytest.raises(ValueError, match=r"epoch 0: 14 parameter tensors of shapes \[4x1x3x3.*student.*8x1x3x3"
                                         r".*model.width"):
        mtt_expert_matrix(expert, wider, "replay_buffer_0.pt expert 0", "convnet width 8")


def test_a_pickled_object_is_refused_without_advice_to_run_it(tmp_path: Path) -> None:
    path = tmp_path / "replay_buffer_0.pt"
    torch.save([[[torch.zeros(2)], [torch.zeros(2)]], {"note": object.__new__(nn.ReLU)}], path)
    with pytest.raises(ValueError, match="holds pickled objects") as error:
        load_mtt_buffer(path)
    assert "weights_only=False" not in str(error.value)
    (tmp_path / "list.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="list.pt is not a readable torch file"):
        load_mtt_buffer(tmp_path / "list.pt")


def test_exported_sets_read_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    images, labels = torch.randn(6, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    pixels = torch.rand(6, 1, 8, 8)
    export_mtt_set(tmp_path / "mtt", images, labels, 0.03, pixels)
    back, back_labels, lr = load_mtt_set(tmp_path / "mtt", 3, (1, 8, 8))
    assert torch.equal(back, images) and torch.equal(back_labels, labels) and lr == pytest.approx(0.03)
    assert torch.equal(torch.load(tmp_path / "mtt/pixels_best.pt", weights_only=True), pixels)
    first = {path.name: path.read_bytes() for path in (tmp_path / "mtt").iterdir()}
    export_mtt_set(tmp_path / "mtt", images, labels, 0.03, pixels)       # the same set again: the same bytes
    assert {path.name: path.read_bytes() for path in (tmp_path / "mtt").iterdir()} == first
    names = ("T-shirt/top", "Trouser", "Bag")
    export_image_folder(tmp_path / "images", pixels, labels, names)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == class_folders(names) == [
        "0_T-shirt_top", "1_Trouser", "2_Bag"]
    read, read_labels = load_image_folder(tmp_path / "images", names, (1, 8, 8))
    assert torch.equal(read_labels, labels)
    assert (read - pixels).abs().max() <= 0.5 / 255 + 1e-6     # 8-bit PNG rounding only
    logits = torch.randn(6, 3)
    export_mtt_set(tmp_path / "soft", images, logits, 0.03, pixels)
    _, soft, _ = load_mtt_set(tmp_path / "soft", 3, (1, 8, 8))
    torch.testing.assert_close(soft, torch.softmax(logits, 1))


@pytest.mark.parametrize(("broken", "message"), [
    ("images", r"images_best.pt holds \(6, 1, 4, 4\); expected N x 1 x 8 x 8"),
    ("labels", r"labels_best.pt: class labels must be a vector of integers in \[0, 3\)"),
    ("nan", "images_best.pt holds NaN"),
    ("lr", "lr_best.pt must hold one finite positive learning rate"),
])
def test_a_bad_set_file_is_named(tmp_path: Path, broken: str, message: str) -> None:
    images, labels = torch.randn(6, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    export_mtt_set(tmp_path, images, labels, 0.03, images)
    if broken == "images":
        torch.save(torch.randn(6, 1, 4, 4), tmp_path / "images_best.pt")
    if broken == "labels":
        torch.save(torch.tensor([0, 0, 1, 1, 2, 7]), tmp_path / "labels_best.pt")
    if broken == "nan":
        torch.save(images.masked_fill(images > 1, float("nan")), tmp_path / "images_best.pt")
    if broken == "lr":
        torch.save(torch.tensor(-1.0), tmp_path / "lr_best.pt")
    with pytest.raises(ValueError, match=message):
        load_mtt_set(tmp_path, 3, (1, 8, 8))


def test_a_bad_image_folder_is_named(tmp_path: Path) -> None:
    export_image_folder(tmp_path / "set", torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2]), ("a", "b", "c"))
    (tmp_path / "set/1_b/notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes.txt is not an image file"):
        load_image_folder(tmp_path / "set", ("a", "b", "c"), (1, 8, 8))
    (tmp_path / "set/1_b/notes.txt").unlink()
    (tmp_path / "set/1_b/broken.png").write_bytes(b"PNG? no")
    with pytest.raises(ValueError, match=r"broken.png is not a readable image"):
        load_image_folder(tmp_path / "set", ("a", "b", "c"), (1, 8, 8))
    (tmp_path / "set/1_b/broken.png").unlink()
    (tmp_path / "set/dogs").mkdir()
    with pytest.raises(ValueError, match=r"folders \['dogs'\] are not classes"):
        load_image_folder(tmp_path / "set", ("a", "b", "c"), (1, 8, 8))


def test_imported_buffer_distils_exports_and_rescores_like_the_pipeline(tiny: Path, caplog) -> None:
    """Experts written in MTT's layout are imported by the buffer stage unchanged to the bit; a row distils
    from them; its exported MTT files, scored by `ast-dd score`, get the evaluate stage's accuracy (same test
    networks); its ImageFolder scores too, beside the real subsets of its size."""
    params = yaml.safe_load((tiny / "params.yaml").read_text())
    params["buffer"]["train"] = ["sgd"]
    params["init"]["buffer"] = "sgd"
    params["distill"]["methods"] = ["mtt"]
    (tiny / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("prepare", "buffer"):
        assert main([stage]) == 0, caplog.text
    trained = load_buffer(tiny / "artifacts/buffer/sgd")
    flat = FlatModel(build_model("convnet", 1, 10, 8, width=8))
    (tiny / "imports").mkdir()
    torch.save([[list(flat.unflatten(t.checkpoints[e]).values()) for e in range(t.num_epochs + 1)]
                for t in trained], tiny / "imports/replay_buffer_0.pt")
    params["buffer"]["variants"]["official"] = {"source": "imports/replay_buffer_*.pt", "optimizer": "sgd",
                                                "clip_ce": False, "grad_penalty": False,
                                                "lr_decay_epoch": None}
    params["buffer"]["train"] = ["sgd", "official"]
    params["init"]["buffer"] = "official"
    params["distill"]["methods"] = ["mtt_official"]
    params["distill"]["configs"]["mtt_official"] = {"buffer": "official", "init": "representative"}
    (tiny / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in (["buffer", "--variant", "official"], ["init"], ["distill"], ["evaluate"]):
        assert main(stage) == 0, caplog.text
    imported = load_buffer(tiny / "artifacts/buffer/official")
    assert all(torch.equal(a.checkpoints, b.checkpoints) for a, b in zip(imported, trained, strict=True))
    assert imported[0].metadata["source"] == {"file": "replay_buffer_0.pt", "expert": 0}
    summary = json.loads((tiny / "artifacts/buffer/official/summary.json").read_text())
    assert summary["test_acc"]["mean"] == pytest.approx(
        json.loads((tiny / "artifacts/buffer/sgd/summary.json").read_text())["test_acc"]["mean"])
    cell = tiny / "artifacts/distill/mtt_official/ipc1/seed0"
    synthetic = load_file(str(cell / "synthetic.safetensors"))
    assert torch.equal(torch.load(cell / "mtt/images_best.pt", weights_only=True), synthetic["images"])
    evaluated = json.loads((tiny / "artifacts/evaluate/mtt_official/ipc1/seed0/results.json").read_text())
    assert main(["score", str(cell / "mtt"), "--name", "exported"]) == 0, caplog.text
    scored = json.loads((tiny / "artifacts/scores/exported/results.json").read_text())["results"]["convnet"]
    assert scored["set"]["accuracies"] == pytest.approx(evaluated["results"]["convnet"]["accuracies"])
    assert set(scored) == {"set", "random", "kmeans"}
    assert main(["score", str(cell / "images"), "--name", "pictures"]) == 0, caplog.text
    pictures = json.loads((tiny / "artifacts/scores/pictures/results.json").read_text())
    assert pictures["format"] == "imagefolder" and pictures["ipc"] == 1
    assert pictures["results"]["convnet"]["set"]["mean"] > 20  # twice chance: the PNGs carry the distilled images
