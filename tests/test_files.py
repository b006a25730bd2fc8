"""One contract for files: result-file modes, output-path checks, plan identity and coverage,
data-folder errors and sweep sizes."""
from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from mpqkit import fileutil
from mpqkit.budget import MAX_SWEEP_BUDGETS, expand_budgets
from mpqkit.errors import BudgetError, DataError, MissingResourceError, MpqkitError, PlanError, UnknownNameError
from mpqkit.fileutil import atomic_write_text, check_output_dir, check_output_file
from mpqkit.graph import discover
from mpqkit.plan import LayerQuant, Plan
from mpqkit.zoo.data import IMAGE_FOLDER_SPLITS, load_data
from mpqkit.zoo.models import get_model

as_root = os.geteuid() == 0 if hasattr(os, "geteuid") else False


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def digits():
    bundle = get_model("digits-cnn")
    return bundle, discover(bundle.model, bundle.input_shape)


def full_plan(graph, sha: str = "abc", **bits: LayerQuant) -> Plan:
    return Plan(layers={n: bits.get(n, LayerQuant(8, 8)) for n in graph.names}, model_name="m", model_sha256=sha)


# --------------------------------------------------------------------------- file modes
def test_umask_022_gives_0644_plan_file(tmp_path, umask, digits):
    umask(0o022)
    path = full_plan(digits[1]).save(tmp_path / "plan.json")
    assert mode(path) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temp file left behind


def test_umask_077_and_existing_mode_kept(tmp_path, umask):
    umask(0o077)
    atomic_write_text(tmp_path / "a.csv", "x\n")
    assert mode(tmp_path / "a.csv") == 0o600
    umask(0o022)
    (tmp_path / "b.csv").write_text("old\n")
    os.chmod(tmp_path / "b.csv", 0o640)
    atomic_write_text(tmp_path / "b.csv", "new\n")  # rewriting keeps the file's mode, like open("w")
    assert mode(tmp_path / "b.csv") == 0o640 and (tmp_path / "b.csv").read_text() == "new\n"


def test_current_umask_matches_os(umask, monkeypatch):
    for mask in (0o022, 0o027, 0o002):
        umask(mask)
        assert fileutil.current_umask() == mask

    def no_proc(*a):
        raise OSError("no /proc")

    monkeypatch.setattr(fileutil, "Path", no_proc)  # the portable fallback: set and restore
    assert fileutil.current_umask() == 0o002 and os.umask(0o002) == 0o002


# --------------------------------------------------------------------------- output checks
def test_check_output_file(tmp_path):
    assert check_output_file(tmp_path / "new" / "deeper" / "plan.json", "the plan") == tmp_path / "new" / "deeper" / "plan.json"
    assert (tmp_path / "new" / "deeper").is_dir() and not any((tmp_path / "new" / "deeper").iterdir())
    with pytest.raises(MpqkitError, match=r"the plan .*out is an existing directory.*file path"):
        (tmp_path / "out").mkdir()
        check_output_file(tmp_path / "out", "the plan")
    (tmp_path / "f").write_text("")
    with pytest.raises(MpqkitError, match=r"f is a file, not a folder"):
        check_output_file(tmp_path / "f" / "plan.json", "the plan")
    with pytest.raises(MpqkitError, match=r"f is a file, not a folder"):
        check_output_file(tmp_path / "f" / "sub" / "plan.json", "the plan")


def test_check_output_dir(tmp_path):
    assert check_output_dir(tmp_path / "res" / "a", "the results folder").is_dir()
    check_output_dir(tmp_path / "res" / "a")  # existing and writable: fine
    (tmp_path / "f").write_text("")
    with pytest.raises(MpqkitError, match=r"the results folder .*f is an existing file, not a folder"):
        check_output_dir(tmp_path / "f", "the results folder")
    with pytest.raises(MpqkitError, match=r"f is a file, not a folder"):
        check_output_dir(tmp_path / "f" / "sub", "the results folder")


def test_unwritable_output_probe(tmp_path, monkeypatch):
    """The writability probe really creates a file: a refusal there is one line naming the folder."""
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(fileutil.tempfile, "mkstemp", denied)
    with pytest.raises(MpqkitError, match=r"folder .*ro is not writable \(Permission denied\)") as e:
        check_output_file(tmp_path / "ro" / "plan.json", "the plan")
    assert "\n" not in str(e.value)
    with pytest.raises(MpqkitError, match=r"the results folder .*ro is not writable"):
        check_output_dir(tmp_path / "ro", "the results folder")


@pytest.mark.skipif(as_root, reason="root can write into a read-only folder")
def test_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(MpqkitError, match="not writable"):
            check_output_file(ro / "plan.json")
        with pytest.raises(MpqkitError, match="not writable"):
            check_output_dir(ro)
    finally:
        ro.chmod(0o755)


def test_fileutil_has_no_mpqkit_or_torch_import_at_module_level():
    tree = ast.parse(Path(fileutil.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [("." * n.level) + (n.module or "") for n in top if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m.startswith((".", "mpqkit", "torch"))], names


def test_hash_helpers_moved_and_re_exported(digits):
    from mpqkit.engine import cache
    from mpqkit.zoo import models

    assert cache.tensor_sha256 is fileutil.tensor_sha256 and models.state_dict_sha256 is fileutil.state_dict_sha256
    assert fileutil.state_dict_sha256(digits[0].model) == digits[0].sha256
    t = torch.arange(6, dtype=torch.float32).view(2, 3)
    assert fileutil.tensor_sha256(t) == fileutil.tensor_sha256(t.clone()) != fileutil.tensor_sha256(t.T)


# --------------------------------------------------------------------------- plans
def test_plan_path_is_a_directory(tmp_path, digits):
    with pytest.raises(PlanError, match=r"is a directory, not a plan file: give the path of a plan \.json"):
        Plan.load(tmp_path)
    full_plan(digits[1]).save(tmp_path / "plan.json")
    with pytest.raises(PlanError, match=r"is a directory.*did you mean .*plan\.json\?"):
        Plan.load(tmp_path)
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "absent.json")


def test_search_plan_lists_every_layer(digits):
    import mpqkit

    bundle, graph = digits
    plan = mpqkit.search("digits-cnn", "digits", "avg-bits=4", "uniform", calib_size=64).plan
    assert list(plan.layers) == graph.names and plan.model_sha256 == bundle.sha256
    plan.validate(graph, bundle.sha256)
    del plan.layers["conv2"]
    with pytest.raises(PlanError, match=r"does not cover 1 of the model's 4 quantizable layers: conv2\."):
        plan.validate(graph, bundle.sha256)


def test_plan_missing_layers_named_first_few_and_count():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(9)]).eval()
    graph = discover(model, (4,))
    plan = Plan(layers={"0": LayerQuant(4, 8), "1": LayerQuant(4, 8)})
    with pytest.raises(PlanError, match=r"does not cover 7 of the model's 9 .*: 2, 3, 4, 5, 6, \.\.\. \(7 in all\)"):
        plan.validate(graph)
    plan.validate(graph, searched=["0", "1"])  # a caller may require fewer layers
    with pytest.raises(UnknownNameError):
        plan.validate(graph, searched=["nope"])


def test_plan_fp32_layers_are_listed_not_absent(digits, tmp_path):
    graph = digits[1]
    plan = full_plan(graph, conv2=LayerQuant(None, None))
    plan.validate(graph)  # an fp32 layer is listed with null bits ...
    loaded = Plan.load(plan.save(tmp_path / "p.json") or tmp_path / "p.json")
    assert loaded.layers["conv2"] == LayerQuant(None, None)  # ... and stays listed through a save / load
    absent = full_plan(graph)
    del absent.layers["conv2"]
    with pytest.raises(PlanError, match="conv2"):  # leaving it out is an error, not a way of saying fp32
        absent.validate(graph)


def test_plan_without_model_hash(digits):
    bundle, graph = digits
    plan = full_plan(graph, sha="")
    with pytest.raises(PlanError, match=r"does not say which weights .*no model\.sha256.*allow_other_model=True"):
        plan.validate(graph, bundle.sha256)
    plan.validate(graph, bundle.sha256, allow_unidentified=True)
    plan.validate(graph, None)  # None: identity not checked
    with pytest.raises(PlanError, match="made for model"):
        full_plan(graph, sha="0" * 64).validate(graph, bundle.sha256)


def test_apply_plan_refuses_unidentified_plan(digits):
    import mpqkit

    bundle, graph = digits
    plan = full_plan(graph, sha="", conv2=LayerQuant(4, None))
    plan.layers = {n: LayerQuant(lq.w_bits, None) for n, lq in plan.layers.items()}  # no calibration needed
    with pytest.raises(PlanError, match="no model.sha256"):
        mpqkit.apply_plan("digits-cnn", plan, None)
    q = mpqkit.apply_plan("digits-cnn", plan, None, allow_other_model=True)
    assert isinstance(q, nn.Module)


# --------------------------------------------------------------------------- data folders
def _image_folder(root: Path) -> Path:
    from PIL import Image

    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (40, 30), (100, 50, 200)).save(root / cls / "0.png")
    return root


def test_image_folder_bogus_split(tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    for split in IMAGE_FOLDER_SPLITS:
        assert len(load_data(str(folder), split)) == 2
    for split in ("bogus", "exact"):
        with pytest.raises(UnknownNameError, match=rf"unknown split '{split}' for image folder .*: use one of test, train, val"):
            load_data(str(folder), split)


def test_image_folder_that_is_a_file(tmp_path):
    f = tmp_path / "images.zip"
    f.write_bytes(b"PK")
    with pytest.raises(DataError, match=r"image folder .*images\.zip \(--data\): it is a file, not a folder") as e:
        load_data(str(f))
    assert "\n" not in str(e.value)


@pytest.mark.skipif(as_root, reason="root reads folders whatever their permissions")
def test_unreadable_image_folder(tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    folder.chmod(0)
    try:
        with pytest.raises(DataError, match=r"imgs \(--data\): it cannot be read"):
            load_data(str(folder))
    finally:
        folder.chmod(0o755)
    (folder / "dog").chmod(0)
    try:
        with pytest.raises(DataError, match=r"imgs \(--data\): class folder dog: it cannot be read"):
            load_data(str(folder))
    finally:
        (folder / "dog").chmod(0o755)


def test_cifar_data_root_that_is_a_file(tmp_path, monkeypatch):
    f = tmp_path / "data"
    f.write_text("")
    with pytest.raises(MissingResourceError, match=r"data is a file, not a folder\. Set --data-root or \$MPQKIT_DATA"):
        load_data("cifar10", root=f)
    monkeypatch.setenv("MPQKIT_DATA", str(f))
    with pytest.raises(MissingResourceError, match=r"is a file, not a folder.*MPQKIT_DATA"):
        load_data("cifar10")
    root = tmp_path / "root"
    root.mkdir()
    (root / "cifar10").write_text("")  # a file where the cifar10/ folder is expected
    with pytest.raises(DataError, match=r"CIFAR-10 folder .*cifar10: it is a file, not a folder\. Set --data-root"):
        load_data("cifar10", "train", root=root)


@pytest.mark.skipif(as_root, reason="root reads files whatever their permissions")
def test_unreadable_cifar_batch(tmp_path):
    d = tmp_path / "cifar10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    (d / "test_batch").write_bytes(b"x")
    (d / "test_batch").chmod(0)
    with pytest.raises(DataError, match=r"cannot read CIFAR-10 file .*test_batch \(Permission denied\).*--data-root"):
        load_data("cifar10", root=tmp_path)


# --------------------------------------------------------------------------- sweeps
def test_sweep_size_is_limited():
    with pytest.raises(BudgetError, match=rf"expands to 20001 budgets; the limit is {MAX_SWEEP_BUDGETS}"):
        expand_budgets("avg-bits=2:4:0.0001")
    assert len(expand_budgets(f"cr=1:{MAX_SWEEP_BUDGETS}:1")) == MAX_SWEEP_BUDGETS == 200
    with pytest.raises(BudgetError, match=r"expands to 5 budgets \(7 in the sweep\); the limit is 6"):
        expand_budgets("avg-bits=2;avg-bits=3;avg-bits=2:4:0.5", limit=6)
    with pytest.raises(BudgetError, match="more than 2 budgets"):
        expand_budgets("avg-bits=2;avg-bits=3;avg-bits=4", limit=2)


@pytest.mark.parametrize("spec,match", [
    ("avg-bits=2:4:0", r"step must be > 0, got 0"),
    ("avg-bits=2:4:-0.5", r"step must be > 0, got -0.5"),
    ("avg-bits=4:2:0.5", r"stop 2 is below start 4"),
    ("avg-bits=2:nan:1", r"finite"),
    ("avg-bits=2:x:1", r"malformed budget range"),
])
def test_bad_sweep_ranges(spec, match):
    with pytest.raises(BudgetError, match=match):
        expand_budgets(spec)


def test_sweep_values_are_exact():
    assert expand_budgets("avg-bits=2.5:4:0.1")[3] == "avg-bits=2.8"
    assert expand_budgets("avg-bits=2.5:4:0.5") == ["avg-bits=2.5", "avg-bits=3", "avg-bits=3.5", "avg-bits=4"]


def _write_cifar(root: Path, batches: int = 2, per: int = 30) -> None:
    """A small CIFAR-10 folder in torchvision's batch layout (random pixels)."""
    import pickle

    import numpy as np

    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i + 1}" for i in range(batches)] + ["test_batch"]:
        d = {"data": rng.randint(0, 256, (per, 3072), dtype=np.uint8), "labels": list(rng.randint(0, 10, per))}
        (folder / name).write_bytes(pickle.dumps(d))


def test_sample_data_draws_the_same_bytes_without_converting_the_split(tmp_path):
    """The calibration, held-out and training draws read the uint8 split and convert only the drawn
    images, to the same tensors (and sha256, hence probe-cache keys) as the draw from the whole split."""
    from mpqkit.zoo.data import sample_data

    _write_cifar(tmp_path)
    full = load_data("cifar10", "train", root=tmp_path)
    assert len(full) == 60
    for n, seed, offset in ((16, 0, 0), (16, 3, 0), (10, 3, 16), (100, 1, 0), (5, 2, 58)):
        want = full.sample(n, seed, offset)
        got = sample_data("cifar10", "train", n, seed, offset, root=tmp_path)
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
        assert got.sha256() == want.sha256() and (got.name, got.split) == ("cifar10", "train")
    digits_draw = sample_data("digits", "train", 20, 4)  # other datasets: the plain draw
    assert torch.equal(digits_draw.images, load_data("digits", "train").sample(20, 4).images)
