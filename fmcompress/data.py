"""Calibration data for `fmcompress compile --data ...`.

Three sources, one result (a `Dataset` of arrays keyed by model input name):

* an ``.npz`` file with one array per model input (keyed by input name; a
  single-input model may use any one key) and optional integer ``labels``;
* a folder of images (png/jpg/jpeg/bmp): class subfolders give labels by the
  ImageFolder convention (sorted subfolder names -> 0..n-1), a flat folder none;
* nothing: a surrogate set of augmented crops of the photographs that the
  scikit-image wheel ships (read straight from the installed files, so nothing
  is ever downloaded).

Images are resized (shorter side, bilinear), center-cropped to the input's H x W
and normalised as ``x = (pixels * scale - mean) / std`` in CHW float32.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx

from .errors import InputError
from .shapes import graph_inputs

DEFAULT_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)  # ImageNet, in [0, 1] pixel units
DEFAULT_STD: tuple[float, ...] = (0.229, 0.224, 0.225)
DEFAULT_SCALE: float = 1 / 255

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
LABELS_KEY = "labels"

# Photographs in skimage/data that ship inside the wheel (no pooch download).
SURROGATE_FILES = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "coins.png",
    "ihc.png", "page.png", "text.png", "moon.png", "hubble_deep_field.jpg", "retina.jpg",
    "motorcycle_left.png", "brick.png", "grass.png", "gravel.png", "clock_motion.png",
)
_SURROGATE_MAX_SIDE = 512  # downscale big photos once; crops are resized to the input anyway
_CROP_AREA = (0.2, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)
_JITTER = 0.3


@dataclass
class InputSpec:
    """One model input: name, shape (N, C, H, W; N ignored; 0/None dims are free) and dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))

    def __post_init__(self) -> None:
        self.shape = tuple(self.shape)
        self.dtype = np.dtype(self.dtype)


@dataclass
class Dataset:
    """Calibration samples: arrays [N, ...] keyed by input name, optional labels [N]."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""
    surrogate: bool = False
    skipped: int = 0  # corrupt files that were skipped
    skipped_files: tuple[str, ...] = ()  # their paths (the first few are named in warnings)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Consecutive batches of at most `batch_size` samples, in order."""
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            labels = None if self.labels is None else self.labels[start:stop]
            yield {name: array[start:stop] for name, array in self.inputs.items()}, labels

    def torch_batches(self, batch_size: int, names: Sequence[str]):
        """The inputs as tuples of torch tensors in `names` order (for the torch executor)."""
        import torch

        for inputs, _ in self.batches(batch_size):
            yield tuple(torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in names)

    def subset(self, indices: np.ndarray) -> Dataset:
        """The samples at `indices`, same source and flags."""
        labels = None if self.labels is None else self.labels[indices]
        inputs = {name: array[indices] for name, array in self.inputs.items()}
        return Dataset(inputs, labels, self.source, self.surrogate, self.skipped, self.skipped_files)

    def head(self, count: int) -> Dataset:
        """The first `count` samples (all of them when there are fewer)."""
        return self.subset(np.arange(min(count, len(self))))

    def split(self, held_out_fraction: float = 0.25, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Deterministic (calibration, held_out) split; both parts are non-empty."""
        total = len(self)
        if total < 2:
            raise InputError(f"need at least 2 samples to hold some out for evaluation, got {total}")
        if not 0 < held_out_fraction < 1:
            raise InputError(f"held-out fraction must be between 0 and 1, got {held_out_fraction}")
        held = min(total - 1, max(1, round(total * held_out_fraction)))
        order = np.random.default_rng(seed).permutation(total)
        return self.subset(np.sort(order[held:])), self.subset(np.sort(order[:held]))


MIN_HELD_OUT = 32  # fewer held-out samples than this make the fidelity figures coarse
NAMED_SKIPS = 3


def data_warnings(dataset: Dataset, held_out: Dataset | None = None) -> list[str]:
    """What makes calibration or fidelity figures weak: constant inputs, a tiny held-out part, bad files."""
    warnings = []
    for name, array in dataset.inputs.items():
        flat = array.reshape(len(array), -1)
        if not flat.size:
            continue
        if not np.any(flat):
            warnings.append(f"input {name!r} is all zeros in every sample: projections fitted on it mean little")
        elif np.all(flat == flat[:1]):
            warnings.append(f"input {name!r} is the same in every sample: projections fitted on it mean little")
        elif np.all(flat.max(axis=1) == flat.min(axis=1)):
            warnings.append(f"input {name!r} is constant within every sample: projections fitted on it mean little")
    if held_out is not None and len(held_out) < MIN_HELD_OUT:
        warnings.append(f"only {len(held_out)} held-out sample(s) (fewer than {MIN_HELD_OUT}): the fidelity "
                        "figures are coarse; pass more --num-samples")
    if dataset.skipped:
        named = ", ".join(dataset.skipped_files[:NAMED_SKIPS])
        more = f" and {dataset.skipped - NAMED_SKIPS} more" if dataset.skipped > NAMED_SKIPS else ""
        warnings.append(f"{dataset.skipped} unreadable file(s) skipped: {named}{more}")
    return warnings


def input_specs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None) -> list[InputSpec]:
    """The specs of a model's real inputs; `shapes` (resolved input shapes) replace declared dims."""
    specs = []
    for value in graph_inputs(model):
        tensor = value.type.tensor_type
        declared = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        dims = tuple((shapes or {}).get(value.name, declared))
        specs.append(InputSpec(value.name, dims, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)))
    return specs


def load_dataset(
    source: str | Path | None,
    specs: list[InputSpec],
    *,
    num_samples: int = 256,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    scale: float = DEFAULT_SCALE,
    seed: int = 0,
    num_classes: int | None = None,
) -> Dataset:
    """Load calibration data from an .npz file, an image folder, a named dataset (`mnist`,
    see fmcompress.datasets) or (None) the surrogate set."""
    if num_samples < 1:
        raise InputError(f"number of samples must be at least 1, got {num_samples}")
    if not specs:
        raise InputError("the model has no inputs to feed")
    from .datasets import is_named, load_named  # named real datasets (`--data mnist`)

    if source is not None and is_named(source):
        return load_named(str(source), specs, num_samples=num_samples, num_classes=num_classes)
    if source is None:
        spec = _image_input(specs, "the built-in surrogate data")
        norm = _Normalizer.build(spec, mean, std, scale)
        return _surrogate_dataset(spec, norm, num_samples, seed)
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        spec = _image_input(specs, "an image folder")
        norm = _Normalizer.build(spec, mean, std, scale)
        return _image_folder_dataset(path, spec, norm, num_samples, seed, num_classes)
    if path.suffix.lower() == ".npz":
        return _npz_dataset(path, specs, num_samples, num_classes)
    raise InputError(f"{path}: not a directory of images nor an .npz file")


# --------------------------------------------------------------------------- npz


def _npz_dataset(path: Path, specs: list[InputSpec], num_samples: int,
                 num_classes: int | None) -> Dataset:
    arrays = _read_npz(path)
    inputs = {spec.name: _checked_input(arrays, spec, specs, path) for spec in specs}
    counts = {name: len(array) for name, array in inputs.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name}: {n}" for name, n in counts.items())
        raise InputError(f"{path}: inputs have different numbers of samples ({listed})")
    total = next(iter(counts.values()))
    labels = arrays.get(LABELS_KEY)
    if labels is not None:
        labels = _checked_labels(labels, total, num_classes, str(path))[:num_samples]
    inputs = {name: array[:num_samples] for name, array in inputs.items()}
    return Dataset(inputs, labels, f"npz:{path}")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise InputError(f"{path}: holds object arrays; only numeric arrays are accepted") from exc
        raise InputError(f"{path}: not a readable .npz file ({exc})") from exc
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise InputError(f"{path}: not a readable .npz file ({type(exc).__name__})") from exc


def _pick_key(arrays: dict[str, np.ndarray], spec: InputSpec, specs: list[InputSpec],
              path: Path) -> str:
    if spec.name in arrays:
        return spec.name
    candidates = [key for key in arrays if key != LABELS_KEY]
    if len(specs) == 1 and len(candidates) == 1:
        return candidates[0]
    present = ", ".join(sorted(arrays)) or "none"
    raise InputError(f"{path}: no array for model input {spec.name!r} (keys present: {present})")


def _checked_input(arrays: dict[str, np.ndarray], spec: InputSpec, specs: list[InputSpec],
                   path: Path) -> np.ndarray:
    key = _pick_key(arrays, spec, specs, path)
    array = arrays[key]
    where = f"{path}: array {key!r}"
    _check_shape(array, spec, where)
    return _convert(array, spec.dtype, where)


def _check_shape(array: np.ndarray, spec: InputSpec, where: str) -> None:
    expected = ("N",) + tuple(d if d else "?" for d in spec.shape[1:])
    fits = array.ndim == len(spec.shape) and all(
        not want or have == want for have, want in zip(array.shape[1:], spec.shape[1:], strict=True)
    )
    if not fits:
        wanted = "[" + ", ".join(str(d) for d in expected) + "]"
        raise InputError(f"{where} has shape {list(array.shape)}, expected {wanted} for input {spec.name!r}")
    if array.shape[0] == 0:
        raise InputError(f"{where} has no samples")


def _convert(array: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    """Cast to the input's dtype; numbers only, no NaN/Inf, no lossy integer casts."""
    if array.dtype.kind not in "biuf":
        raise InputError(f"{where} has dtype {array.dtype}; expected numbers convertible to {dtype}")
    _check_finite(array, where)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
        converted = array.astype(dtype)
    if dtype.kind == "f":
        _check_finite(converted, f"{where} (after conversion to {dtype})")
    elif not np.array_equal(converted.astype(array.dtype), array):
        raise InputError(f"{where}: values do not convert exactly to {dtype}")
    return converted


def _check_finite(array: np.ndarray, where: str) -> None:
    if array.dtype.kind != "f":
        return
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise InputError(f"{where} has {bad} NaN/Inf value(s)")


def _checked_labels(labels: np.ndarray, total: int, num_classes: int | None, where: str) -> np.ndarray:
    if labels.dtype.kind not in "iu":
        raise InputError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if labels.ndim != 1 or len(labels) != total:
        raise InputError(f"{where}: labels have shape {list(labels.shape)}, expected [{total}] (one per sample)")
    labels = labels.astype(np.int64)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        limit = f"[0, {num_classes})" if num_classes is not None else "non-negative"
        raise InputError(f"{where}: labels range over [{low}, {high}], expected {limit}")
    return labels


# ------------------------------------------------------------------- image inputs


def _image_input(specs: list[InputSpec], what: str) -> InputSpec:
    """The single 4-D float input that images can feed."""
    hint = "pass --data with an .npz file holding one array per input"
    if len(specs) != 1:
        raise InputError(f"{what} can only feed a model with one image input; this one has {len(specs)}: {hint}")
    spec = specs[0]
    if len(spec.shape) != 4 or spec.dtype.kind != "f":
        raise InputError(f"{what} needs a 4-D float input (N, C, H, W); {spec.name!r} is "
                         f"{spec.dtype} with shape {list(spec.shape)}: {hint}")
    if not all(spec.shape[1:]):
        raise InputError(f"input {spec.name!r} has no fixed channels, height and width {list(spec.shape)}: "
                         f"pin it with --input-shape {spec.name}=1,3,H,W")
    if spec.shape[1] not in (1, 3):
        raise InputError(f"input {spec.name!r} has {spec.shape[1]} channels; images feed 1 or 3: {hint}")
    return spec


@dataclass(frozen=True)
class _Normalizer:
    """x = (pixels * scale - mean) / std for an input of C channels, H x W pixels."""

    channels: int
    height: int
    width: int
    dtype: np.dtype
    scale: float
    mean: np.ndarray  # [C, 1, 1]
    std: np.ndarray

    @staticmethod
    def build(spec: InputSpec, mean: Sequence[float], std: Sequence[float], scale: float) -> _Normalizer:
        channels, height, width = (int(d) for d in spec.shape[1:])
        mean_c = _per_channel(mean, channels, "mean")
        std_c = _per_channel(std, channels, "std")
        if np.any(std_c <= 0):
            raise InputError(f"std must be positive, got {tuple(std)}")
        if not (math.isfinite(scale) and scale > 0):
            raise InputError(f"scale must be positive, got {scale}")
        return _Normalizer(channels, height, width, spec.dtype, float(scale), mean_c, std_c)

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """HWC (or HW) pixels -> normalised CHW array of the input's dtype."""
        chw = pixels.reshape(self.height, self.width, -1).transpose(2, 0, 1).astype(np.float32)
        return ((chw * np.float32(self.scale) - self.mean) / self.std).astype(self.dtype)


def _per_channel(values: Sequence[float], channels: int, what: str) -> np.ndarray:
    """Per-channel statistics; RGB figures for a grayscale input are averaged."""
    array = np.asarray(values, dtype=np.float32).reshape(-1)
    if array.size == channels or array.size == 1:
        return np.broadcast_to(array, (channels,)).reshape(channels, 1, 1).copy()
    if channels == 1:
        return array.mean(keepdims=True).reshape(1, 1, 1)
    raise InputError(f"{what} has {array.size} values; the input has {channels} channels")


def _center_box(width: int, height: int, out_w: int, out_h: int) -> tuple[float, float, float, float]:
    """Source box that 'resize the shorter side, then center-crop' maps onto out_w x out_h."""
    scale = max(out_w / width, out_h / height)
    crop_w, crop_h = out_w / scale, out_h / scale
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return left, top, left + crop_w, top + crop_h


def _resized_pixels(image, norm: _Normalizer, box: tuple[float, float, float, float]) -> np.ndarray:
    from PIL import Image

    resized = image.resize((norm.width, norm.height), Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized)


# ------------------------------------------------------------------ image folder


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _scan_folder(folder: Path) -> tuple[list[Path], list[int] | None, int]:
    """Image files, their labels (None for a flat folder) and the number of classes."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [_image_files(sub) for sub in classes]
    if any(per_class):
        files = [f for group in per_class for f in group]
        labels = [index for index, group in enumerate(per_class) for _ in group]
        return files, labels, len(classes)
    files = [p for p in _image_files(folder) if p.parent == folder]
    return files, None, 0


def _read_image(path: Path, norm: _Normalizer) -> np.ndarray | None:
    """Normalised CHW array, or None when the file cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.draft(norm.mode, (norm.width, norm.height))  # JPEG: decode at reduced size
            converted = image.convert(norm.mode)
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError):
        return None
    box = _center_box(converted.width, converted.height, norm.width, norm.height)
    return norm(_resized_pixels(converted, norm, box))


def _image_folder_dataset(folder: Path, spec: InputSpec, norm: _Normalizer, num_samples: int,
                          seed: int, num_classes: int | None) -> Dataset:
    files, labels, class_count = _scan_folder(folder)
    if not files:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise InputError(f"{folder}: no images ({kinds}) in it or in its class subfolders")
    if labels is not None and num_classes is not None and class_count > num_classes:
        raise InputError(f"{folder}: {class_count} class subfolders but the model has {num_classes} classes")
    samples, kept, skipped = [], [], []
    for index in np.random.default_rng(seed).permutation(len(files)):
        if len(samples) == num_samples:
            break
        sample = _read_image(files[index], norm)
        if sample is None:
            skipped.append(str(files[index]))
            continue
        samples.append(sample)
        kept.append(index)
    if not samples:
        raise InputError(f"{folder}: none of its {len(files)} image(s) could be read")
    label_array = None if labels is None else np.asarray(labels, dtype=np.int64)[kept]
    return Dataset({spec.name: np.stack(samples)}, label_array, f"images:{folder}", skipped=len(skipped),
                   skipped_files=tuple(skipped))


# --------------------------------------------------------------------- surrogate


@lru_cache(maxsize=1)
def _surrogate_photos() -> tuple:
    """The scikit-image photographs as RGB Pillow images, read from the installed wheel."""
    import importlib.util

    from PIL import Image

    found = importlib.util.find_spec("skimage")
    if found is None or not found.submodule_search_locations:
        raise InputError("the surrogate data needs scikit-image: pip install scikit-image, or pass --data")
    folder = Path(list(found.submodule_search_locations)[0]) / "data"
    photos = []
    for name in SURROGATE_FILES:
        try:
            with Image.open(folder / name) as image:
                image.draft("RGB", (_SURROGATE_MAX_SIDE, _SURROGATE_MAX_SIDE))
                photo = image.convert("RGB")
        except OSError:
            continue  # not in this scikit-image version
        photo.thumbnail((_SURROGATE_MAX_SIDE, _SURROGATE_MAX_SIDE), Image.Resampling.BILINEAR)
        photos.append(photo)
    if not photos:
        raise InputError(f"no surrogate photographs found in {folder}; pass --data")
    return tuple(photos)


def _random_box(rng: np.random.Generator, width: int, height: int) -> tuple[float, float, float, float]:
    """A random crop of 0.2-1.0 of the area with aspect ratio 3/4-4/3 (RandomResizedCrop)."""
    area = width * height
    log_ratio = np.log(_CROP_RATIO)
    for _ in range(10):
        target = area * rng.uniform(*_CROP_AREA)
        ratio = math.exp(rng.uniform(*log_ratio))
        crop_w, crop_h = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if crop_w <= width and crop_h <= height:
            left, top = rng.uniform(0, width - crop_w), rng.uniform(0, height - crop_h)
            return left, top, left + crop_w, top + crop_h
    side = min(width, height)
    return (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2


def _jitter(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation jitter of +-30% on HWC float pixels in [0, 255]."""
    brightness, contrast, saturation = rng.uniform(1 - _JITTER, 1 + _JITTER, size=3)
    gray = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    pixels = pixels * np.float32(brightness)
    gray = gray * np.float32(brightness)
    pixels = (pixels - gray.mean()) * np.float32(contrast) + gray.mean()
    gray = (gray - gray.mean()) * np.float32(contrast) + gray.mean()
    pixels = (pixels - gray[..., None]) * np.float32(saturation) + gray[..., None]
    return np.clip(pixels, 0, 255)


def _surrogate_sample(photo, rng: np.random.Generator, norm: _Normalizer) -> np.ndarray:
    pixels = _resized_pixels(photo, norm, _random_box(rng, photo.width, photo.height))
    pixels = _jitter(pixels.astype(np.float32), rng)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    if norm.channels == 1:
        pixels = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return norm(np.ascontiguousarray(pixels))


def _surrogate_dataset(spec: InputSpec, norm: _Normalizer, num_samples: int, seed: int) -> Dataset:
    photos = _surrogate_photos()
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(photos), size=num_samples)
    samples = np.stack([_surrogate_sample(photos[i], rng, norm) for i in picks])
    return Dataset({spec.name: samples}, None, "surrogate", surrogate=True)


# ------------------------------------------------------------------ range statistics
