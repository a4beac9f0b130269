"""Synthetic scenes: masks agree with the pixels, composition, determinism, files and format."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labeler_service import scenes
from labeler_service.scenes import (
    SCENE_CLASSES,
    ScenesFolderRefused,
    load_mask,
    make_scenes,
    mask_bytes,
    mask_path,
    render_scene,
)
from storage import scan_image_folder

RENDERED = 60  # scenes rendered in memory by the checks below (about 0.1 s)


@pytest.fixture(scope="module")
def rendered() -> list[scenes.Scene]:
    return [render_scene(i, seed=3) for i in range(RENDERED)]


def _rgb(scene: scenes.Scene) -> np.ndarray:
    return np.asarray(scene.image, dtype=np.int64)


def _packed(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)


def test_classes_sorted_distinct_and_named() -> None:
    assert 8 <= len(SCENE_CLASSES) <= 12
    assert list(SCENE_CLASSES) == sorted(SCENE_CLASSES)
    assert len(set(SCENE_CLASSES)) == len(SCENE_CLASSES)
    shapes = [name.rsplit("-", 1)[-1] for name in SCENE_CLASSES]
    assert len(set(shapes)) == len(shapes), "every class has its own silhouette"


def test_every_class_draws_both_colours_inside_its_shape() -> None:
    """Each class's texture shows both colours in a large unoccluded object (no texture
    degenerates to one colour), across several images of that class."""
    for label in range(len(SCENE_CLASSES)):
        for i in (label, label + len(SCENE_CLASSES)):
            scene = render_scene(i, seed=11)
            main = scene.info["objects"][0]
            assert main["label"] == label
            rgb = _packed(_rgb(scene))[scene.mask == label]
            (r0, g0, b0), (r1, g1, b1) = main["colors"]
            first, second = r0 | g0 << 8 | b0 << 16, r1 | g1 << 8 | b1 << 16
            assert 0.05 < np.mean(rgb == second) < 0.95, SCENE_CLASSES[label]
            assert np.all((rgb == first) | (rgb == second))


def test_mask_matches_the_drawn_objects(rendered: list[scenes.Scene]) -> None:
    for scene in rendered:
        rgb, mask = _packed(_rgb(scene)), scene.mask
        info = scene.info
        assert mask.dtype == np.int8 and mask.shape == (info["height"], info["width"])
        labels = {o["label"] for o in info["objects"]}
        assert set(np.unique(mask).tolist()) <= labels | {-1}
        for obj in info["objects"]:
            at = mask == obj["label"]
            assert int(at.sum()) == obj["visible"] <= obj["pixels"]
            # every pixel the object is visible at shows one of its two colours
            colours = [r | g << 8 | b << 16 for r, g, b in obj["colors"]]
            assert np.isin(rgb[at], colours).all(), obj
            # and lies inside its bounding box
            x1, y1, x2, y2 = obj["bbox"]
            assert 0 <= x1 < x2 <= info["width"] and 0 <= y1 < y2 <= info["height"]
            assert at[y1:y2, x1:x2].sum() == at.sum()


def test_background_pixels_are_the_background_alone(rendered: list[scenes.Scene]) -> None:
    """Where the mask says -1 the image is exactly the background, rendered without objects
    (the renderer draws the background first from the same random stream)."""
    for index, scene in enumerate(rendered[:20]):
        rng = np.random.default_rng([3, index])
        lo, hi = scenes.SIZE_RANGE
        width, height = (int(v) for v in rng.random(2) * (hi - lo + 1) + lo)
        assert (width, height) == scene.image.size
        background = scenes._background(rng, width, height).packed.astype(np.int64)
        rgb = _packed(_rgb(scene))
        off = scene.mask < 0
        assert np.array_equal(rgb[off], background[off])
        # object pixels are painted over it: most of them differ from it
        assert np.mean(rgb[~off] != background[~off]) > 0.9


def test_composition(rendered: list[scenes.Scene]) -> None:
    counts = set()
    for index, scene in enumerate(rendered):
        info = scene.info
        lo, hi = scenes.SIZE_RANGE
        assert lo <= info["width"] <= hi and lo <= info["height"] <= hi
        label = index % len(SCENE_CLASSES)
        assert info["label"] == label and info["class"] == SCENE_CLASSES[label]
        main, *distractors = info["objects"]
        assert main["role"] == "main" and main["label"] == label
        assert main["class"] == SCENE_CLASSES[label]
        assert 0 <= len(distractors) <= 3
        counts.add(len(distractors))
        assert all(o["role"] == "distractor" for o in distractors)
        others = [o["label"] for o in distractors]
        assert label not in others and len(set(others)) == len(others)
        assert main["visible"] >= 0.7 * main["pixels"]
        short = min(info["width"], info["height"])
        x1, y1, x2, y2 = main["bbox"]
        assert max(x2 - x1, y2 - y1) >= 0.3 * short  # large (its nominal extent: 45-75 %)
        for o in distractors:
            x1, y1, x2, y2 = o["bbox"]
            assert max(x2 - x1, y2 - y1) <= 0.75 * short  # smaller (30-45 %, rotated)
            assert o["visible"] >= 0.5 * o["pixels"]
    assert counts == {0, 1, 2, 3}


def test_object_colours_stand_out(rendered: list[scenes.Scene]) -> None:
    """An object's two colours differ in luminance: its texture shows without colour."""
    luma = np.array([0.299, 0.587, 0.114])  # BT.601
    gaps = [abs(np.dot(o["colors"][0], luma) - np.dot(o["colors"][1], luma))
            for scene in rendered for o in scene.info["objects"]]
    assert min(gaps) >= scenes.MIN_TEXTURE_GAP - 1  # 1: rounding to integer channels


def _window_sums(a: np.ndarray, k: int) -> np.ndarray:
    """Sums over every k x k window (an integral image)."""
    c = np.pad(a.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]


def test_backgrounds_have_flat_and_textured_regions(rendered: list[scenes.Scene]) -> None:
    """Most images have a large flat background share (8x8 windows of near-zero variance) and
    most have textured background too."""
    flat_shares, textured_shares = [], []
    for scene in rendered:
        grey = _rgb(scene).mean(axis=2)
        mean = _window_sums(grey, 8) / 64
        variance = _window_sums(grey * grey, 8) / 64 - mean * mean
        off = _window_sums(scene.mask >= 0, 8) == 0  # windows of background only
        flat_shares.append(np.mean(variance[off] < 4))
        textured_shares.append(np.mean(variance[off] > 10))
    assert np.mean(np.array(flat_shares) >= 0.3) >= 0.8
    assert np.mean(np.array(textured_shares) >= 0.05) >= 0.7
    kinds = {r["kind"] for scene in rendered for r in scene.info["background"]}
    assert kinds == {"flat", "blotchy", "grain"}


def test_render_depends_only_on_seed_and_index() -> None:
    a, b = render_scene(7, seed=1), render_scene(7, seed=1)
    assert a.image.tobytes() == b.image.tobytes() and np.array_equal(a.mask, b.mask)
    assert a.info == b.info
    assert render_scene(7, seed=2).image.tobytes() != a.image.tobytes()
    assert render_scene(8, seed=1).image.tobytes() != a.image.tobytes()


def test_num_classes_uses_a_prefix_of_the_classes() -> None:
    scene = render_scene(5, seed=0, num_classes=3)
    assert scene.info["label"] == 2 and scene.info["class"] == SCENE_CLASSES[2]
    assert {o["label"] for o in scene.info["objects"]} <= {0, 1, 2}
    with pytest.raises(ValueError):
        render_scene(0, num_classes=1)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_make_scenes_writes_an_image_folder(tmp_path: Path) -> None:
    root = make_scenes(tmp_path / "scenes", images=30, seed=5)
    assert root == tmp_path / "scenes"
    manifest = scan_image_folder(root)
    assert manifest.class_names == SCENE_CLASSES
    assert len(manifest) == 30
    assert not any(p.endswith(".npz") for p in manifest.path)
    labels = np.bincount(manifest.label, minlength=len(SCENE_CLASSES))
    assert labels.tolist() == [3] * len(SCENE_CLASSES)  # balanced
    meta = json.loads((root / "scenes.json").read_text())
    assert meta["format"] == scenes.FORMAT and meta["version"] == scenes.FORMAT_VERSION
    assert meta["seed"] == 5 and meta["num_images"] == 30
    assert meta["classes"] == list(SCENE_CLASSES)
    assert [r["path"] for r in meta["images"]] == [
        f"{SCENE_CLASSES[i % len(SCENE_CLASSES)]}/{i:05d}.jpg" for i in range(30)]
    by_path = {r["path"]: r for r in meta["images"]}
    for rel, label, width, height in zip(manifest.path, manifest.label, manifest.width,
                                         manifest.height, strict=True):
        record = by_path[rel]
        index = int(rel.split("/")[1][:5])
        scene = render_scene(index, seed=5)
        assert record == {"path": rel, **json.loads(json.dumps(scene.info))}
        assert (record["width"], record["height"]) == (width, height)
        assert record["label"] == label and record["class"] == SCENE_CLASSES[label]
        assert all(set(o) >= {"class", "role", "bbox"} for o in record["objects"])
        mask = load_mask(root / rel)
        assert mask.dtype == np.int8 and np.array_equal(mask, scene.mask)
        with Image.open(root / rel) as img:
            assert img.format == "JPEG" and img.size == (width, height)
            decoded = np.asarray(img.convert("RGB"), dtype=np.float64)
        assert np.abs(decoded - _rgb(scene)).mean() < 10  # the JPEG of the rendered scene


def test_mask_files() -> None:
    mask = render_scene(2).mask
    data = mask_bytes(mask)
    with np.load(io.BytesIO(data)) as npz:
        assert npz.files == ["mask"]
        assert npz["mask"].dtype == np.int8 and np.array_equal(npz["mask"], mask)
    assert mask_bytes(mask) == data  # no timestamps: the same bytes every time
    for level in (1, 6, 9):
        with np.load(io.BytesIO(mask_bytes(mask, level))) as npz:
            assert np.array_equal(npz["mask"], mask)
    with pytest.raises(ValueError):
        mask_bytes(mask.astype(np.int16))
    assert mask_path(Path("a/b-c/00012.jpg")) == Path("a/b-c/00012.mask.npz")


def test_load_mask_reads_savez_files_and_checks_them(tmp_path: Path) -> None:
    image = tmp_path / "00000.jpg"
    mask = np.full((3, 4), -1, dtype=np.int8)
    np.savez_compressed(mask_path(image), mask=mask)
    assert np.array_equal(load_mask(image), mask)
    np.savez_compressed(mask_path(image), mask=mask.astype(np.int32))
    with pytest.raises(ValueError):
        load_mask(image)


def test_make_scenes_is_deterministic(tmp_path: Path) -> None:
    a = _tree(make_scenes(tmp_path / "a", images=20, seed=1))
    b = _tree(make_scenes(tmp_path / "b", images=20, seed=1))
    assert a == b
    assert _tree(make_scenes(tmp_path / "a", images=20, seed=1)) == a  # rewritten in place
    other = _tree(make_scenes(tmp_path / "c", images=20, seed=2))
    assert other.keys() == a.keys()
    assert all(other[k] != a[k] for k in a if k != "scenes.json")
    # image i does not depend on how many images are made
    more = _tree(make_scenes(tmp_path / "d", images=40, seed=1))
    assert all(more[k] == v for k, v in a.items() if k != "scenes.json")
    assert len(more) == 2 * 40 + 1


def test_make_scenes_over_a_larger_run_leaves_exactly_the_new_dataset(tmp_path: Path) -> None:
    root = make_scenes(tmp_path / "s", images=25, seed=0)
    (root / SCENE_CLASSES[0] / "notes.txt").write_text("kept")
    with pytest.raises(ScenesFolderRefused, match="pass --replace"):
        make_scenes(root, images=12, seed=0)  # it could be a dataset's, in some other store
    make_scenes(root, images=12, seed=0, replace=True)
    assert len(scan_image_folder(root)) == 12
    assert len(list(root.rglob("*.mask.npz"))) == 12
    assert (root / SCENE_CLASSES[0] / "notes.txt").exists()
    assert _tree(root) == {**_tree(make_scenes(tmp_path / "fresh", images=12, seed=0)),
                           f"{SCENE_CLASSES[0]}/notes.txt": b"kept"}


def test_fewer_images_than_classes_give_the_first_classes(tmp_path: Path) -> None:
    root = make_scenes(tmp_path / "s", images=25, seed=0)
    make_scenes(root, images=4, seed=0, replace=True)
    manifest = scan_image_folder(root)
    assert manifest.class_names == SCENE_CLASSES[:4] and manifest.label.tolist() == [0, 1, 2, 3]
    assert sorted(p.name for p in root.iterdir()) == [*SCENE_CLASSES[:4], "scenes.json"]
