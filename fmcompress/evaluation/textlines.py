"""Rendered text lines with labels known by construction, and PP-OCR's cls / rec scored on them.

Real trained models need real-looking data to say anything about accuracy; text
lines can be rendered with the fonts a machine has, so the label of every sample
is exact. This module renders dark text on a light background (DejaVu fonts,
several sizes, margins, colour, blur, noise and contrast jitter), preprocesses it
exactly as rapidocr-onnxruntime feeds PP-OCR, and scores the two PP-OCR models
whose outputs are easy to judge:

* the direction classifier (``ppocr-cls``, input [N, 3, 48, 192]): each line is
  rotated 0 or 180 degrees, the label is the index of that angle in the model's
  label list ``("0", "180")``; accuracy is argmax == label (rapidocr's
  ``ClsPostProcess``);
* the recognizer (``ppocr-rec``, input [N, 3, 48, 320]): random strings of 4-12
  characters; the output [N, T, classes] is decoded by CTC greedy decoding
  (argmax per step, merge repeats, drop blank 0) with the dictionary stored in
  the model's ``character`` metadata, blank prepended and space appended
  (rapidocr's ``CTCLabelDecode``); the score is exact-match string accuracy.

Preprocessing (rapidocr's ``resize_norm_img``): the crop is BGR (rapidocr reads
images with OpenCV and never swaps channels), resized to height 48 keeping its
aspect ratio (width ``ceil(48 * w / h)``, at most the input width) with OpenCV's
bilinear rule (half-pixel centres, no antialiasing; reimplemented here in numpy,
within one grey level of cv2.resize, which rounds its weights to 11 bits),
scaled to ``(x / 255 - 0.5) / 0.5`` in CHW and zero-padded on the right to the
input width. Only numpy, Pillow and onnxruntime are needed (no torch, no OpenCV).

Labels are exact by construction; the recognizer's figure is exact-match string
accuracy with spaces ignored (PaddleOCR's RecMetric default: the model reads crop
margins as spaces). The charset leaves out O/o/I/l, which DejaVu draws like 0 and 1.

``save_npz`` writes what ``fmcompress compile --data X.npz`` reads: one array
under the model's input name (``x``) and, for cls, integer ``labels``. Recognizer
texts are not class labels and never go into the file.
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx

from fmcompress.errors import InputError
from fmcompress.metrics import DICTIONARY_KEY, ctc_dictionary, ctc_labels
from fmcompress.ortrun import ort_session, run_ort

from .thirdparty import real_model

ModelLike = onnx.ModelProto | bytes | str | os.PathLike

HEIGHT = 48
CLS_WIDTH = 192
REC_WIDTH = 320
CLS_LABELS = ("0", "180")  # rapidocr config.yaml, Cls.label_list
INPUT_NAME = "x"  # the input name of both PP-OCR models
BLANK = 0  # CTC blank index (rapidocr's CTCLabelDecode.get_ignored_tokens)

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")  # Debian/Ubuntu: fonts-dejavu-core
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansCondensed.ttf", "DejaVuSansMono.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerifCondensed.ttf", "DejaVuSansMono-Bold.ttf",
)
# Digits, Latin letters and punctuation. O/o (zero) and I/l (one) are left out: DejaVu draws
# them alike and a random string gives no context, so their labels would be noise.
AMBIGUOUS = "OoIl"
DEFAULT_CHARSET = "".join(c for c in string.digits + string.ascii_letters if c not in AMBIGUOUS) + ".,:;-+/()%#&"
LENGTHS = (4, 12)  # characters per line, inclusive
FONT_SIZES = (26, 44)  # pixels, inclusive; lines are rendered at this size and resized to height 48


# ------------------------------------------------------------------------- fonts


def find_fonts(folder: str | os.PathLike | None = None) -> list[Path]:
    """The DejaVu faces used for rendering; InputError when none is installed."""
    root = Path(folder) if folder is not None else Path(os.environ.get("FMCOMPRESS_FONT_DIR", FONT_DIR))
    fonts = [root / name for name in FONT_FILES if (root / name).is_file()]
    if not fonts:
        raise InputError(f"no DejaVu fonts in {root}: install fonts-dejavu-core (apt-get install "
                         "fonts-dejavu-core) or set FMCOMPRESS_FONT_DIR")
    return fonts


@lru_cache(maxsize=512)
def load_font(path: str, size: int):
    """A TrueType face at a size, loaded once (both sets of lines render through it)."""
    from PIL import ImageFont

    return ImageFont.truetype(path, size)


# --------------------------------------------------------------------- rendering


def random_text(rng: np.random.Generator, charset: str = DEFAULT_CHARSET,
                lengths: tuple[int, int] = LENGTHS) -> str:
    """A random string of `lengths[0]`..`lengths[1]` characters drawn from `charset`."""
    length = int(rng.integers(lengths[0], lengths[1] + 1))
    return "".join(charset[i] for i in rng.integers(len(charset), size=length))


def render_line(text: str, rng: np.random.Generator, fonts: Sequence[Path] | None = None,
                sizes: tuple[int, int] = FONT_SIZES) -> np.ndarray:
    """One text line as an HWC uint8 BGR crop (as a detector would cut it), jittered by `rng`."""
    from PIL import Image, ImageDraw, ImageFilter

    fonts = list(fonts) if fonts is not None else find_fonts()
    size = int(rng.integers(sizes[0], sizes[1] + 1))
    font = load_font(str(fonts[int(rng.integers(len(fonts)))]), size)
    ascent, descent = font.getmetrics()
    left, _, right, _ = font.getbbox(text, anchor="ls")
    pad_left, pad_right = (rng.uniform(0.1, 0.5, size=2) * size).astype(int)
    pad_top, pad_bottom = (rng.uniform(0.0, 0.25, size=2) * size).astype(int)
    width = right - left + pad_left + pad_right
    height = ascent + descent + pad_top + pad_bottom
    paper = rng.uniform(175, 255) + rng.uniform(-15, 15, size=3)  # light, slightly tinted
    ink = rng.uniform(0, 80) + rng.uniform(-15, 15, size=3)  # dark
    colour = tuple(int(v) for v in np.clip(paper, 0, 255))
    image = Image.new("RGB", (width, height), colour)
    draw = ImageDraw.Draw(image)
    draw.text((pad_left - left, pad_top + ascent), text, font=font, anchor="ls",
              fill=tuple(int(v) for v in np.clip(ink, 0, 255)))
    blur = rng.uniform(0.0, 1.0)
    if blur > 0.3:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float32)
    contrast = rng.uniform(0.7, 1.1)
    pixels = (pixels - pixels.mean()) * contrast + pixels.mean()
    pixels = pixels + rng.normal(0.0, rng.uniform(0.0, 6.0), size=pixels.shape)
    rgb = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb[:, :, ::-1])  # BGR, as cv2.imread gives rapidocr


def resize_bilinear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """OpenCV's ``cv2.resize(image, (width, height))`` (INTER_LINEAR) for HWC uint8, in numpy."""
    src_h, src_w = image.shape[:2]

    def taps(dst: int, src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(dst) + 0.5) * (src / dst) - 0.5
        low = np.floor(pos)
        frac = pos - low
        low = low.astype(int)
        frac = np.where(low < 0, 0.0, frac)
        low = np.clip(low, 0, src - 1)
        high = np.clip(low + 1, 0, src - 1)
        frac = np.where(low >= src - 1, 0.0, frac)
        return low, high, frac

    y0, y1, fy = taps(height, src_h)
    x0, x1, fx = taps(width, src_w)
    data = image.astype(np.float64)
    rows = data[y0] * (1 - fy)[:, None, None] + data[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def preprocess(image: np.ndarray, width: int, height: int = HEIGHT) -> np.ndarray:
    """rapidocr's resize_norm_img: HWC uint8 BGR -> CHW float32 [3, height, width], right-padded with 0."""
    h, w = image.shape[:2]
    resized_w = min(width, int(math.ceil(height * w / float(h))))
    resized = resize_bilinear(image, resized_w, height).astype(np.float32)
    chw = (resized.transpose(2, 0, 1) / 255 - 0.5) / 0.5
    padded = np.zeros((3, height, width), dtype=np.float32)
    padded[:, :, :resized_w] = chw
    return padded


# ---------------------------------------------------------------------- datasets


def cls_dataset(n: int, seed: int, *, charset: str = DEFAULT_CHARSET,
                fonts: Sequence[Path] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`n` lines for the direction classifier: inputs [n, 3, 48, 192] float32, labels [n] int64.

    Label 1 ("180") lines are rotated by 180 degrees before preprocessing; about half are.
    """
    _check_count(n)
    rng = np.random.default_rng(seed)
    fonts = list(fonts) if fonts is not None else find_fonts()
    inputs = np.empty((n, 3, HEIGHT, CLS_WIDTH), dtype=np.float32)
    labels = rng.integers(len(CLS_LABELS), size=n).astype(np.int64)
    for i in range(n):
        line = render_line(random_text(rng, charset), rng, fonts)
        if CLS_LABELS[labels[i]] == "180":
            line = line[::-1, ::-1]
        inputs[i] = preprocess(line, CLS_WIDTH)
    return inputs, labels


def rec_dataset(n: int, seed: int, *, charset: str | None = None,
                fonts: Sequence[Path] | None = None) -> tuple[np.ndarray, list[str]]:
    """`n` lines for the recognizer: inputs [n, 3, 48, 320] float32 and their texts.

    The charset defaults to the characters of DEFAULT_CHARSET that the installed
    recognizer's dictionary holds (all of them for PP-OCRv4).
    """
    _check_count(n)
    if charset is None:
        charset = default_rec_charset()
    rng = np.random.default_rng(seed)
    fonts = list(fonts) if fonts is not None else find_fonts()
    inputs = np.empty((n, 3, HEIGHT, REC_WIDTH), dtype=np.float32)
    texts = []
    for i in range(n):
        text = random_text(rng, charset)
        inputs[i] = preprocess(render_line(text, rng, fonts), REC_WIDTH)
        texts.append(text)
    return inputs, texts


def default_rec_charset(model: ModelLike | None = None) -> str:
    """DEFAULT_CHARSET restricted to the recognizer's dictionary (the real ppocr-rec by default)."""
    known = set(rec_dictionary(model))
    chars = "".join(c for c in DEFAULT_CHARSET if c in known)
    if not chars:
        raise InputError("the recognizer's dictionary holds none of the characters the fonts render")
    return chars


def save_npz(path: str | os.PathLike, inputs: np.ndarray, labels: np.ndarray | None = None,
             input_name: str = INPUT_NAME) -> Path:
    """Write an .npz that `fmcompress compile --data` reads: `input_name` -> inputs, optional integer labels."""
    path = Path(path)
    arrays = {input_name: np.ascontiguousarray(inputs, dtype=np.float32)}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu":
            raise InputError(f"labels must be integers (class indices), got dtype {labels.dtype}; "
                             "recognizer texts are not labels")
        arrays["labels"] = labels.astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def _check_count(n: int) -> None:
    if n < 1:
        raise InputError(f"number of lines must be at least 1, got {n}")


# -------------------------------------------------------------------- evaluation


def rec_dictionary(model: ModelLike | None = None) -> list[str]:
    """The recognizer's CTC classes: blank, the metadata dictionary, then space (rapidocr's order)."""
    dictionary = ctc_dictionary(_load(model if model is not None else real_model("ppocr-rec")))
    if dictionary is None:
        raise InputError(f"the model has no {DICTIONARY_KEY!r} metadata (the CTC dictionary); "
                         "pass dictionary= explicitly")
    return dictionary


def ctc_greedy_decode(probs: np.ndarray, dictionary: Sequence[str]) -> list[str]:
    """Best-path CTC decoding of [N, T, classes]: argmax per step, merge repeats, drop blank 0."""
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise InputError(f"CTC decoding needs [N, T, classes] scores, got shape {list(probs.shape)}")
    if probs.shape[2] != len(dictionary):
        raise InputError(f"the model scores {probs.shape[2]} classes but the dictionary has {len(dictionary)}")
    return ["".join(dictionary[i] for i in ctc_labels(best, BLANK)) for best in probs.argmax(axis=2)]


def recognize(model: ModelLike, inputs: np.ndarray, *, dictionary: Sequence[str] | None = None,
              batch_size: int = 32, threads: int | None = None) -> list[str]:
    """The strings a recognizer reads from preprocessed lines [N, 3, 48, W]."""
    proto = _load(model)
    dictionary = list(dictionary) if dictionary is not None else rec_dictionary(proto)
    return [text for probs in _run(proto, inputs, batch_size, threads)
            for text in ctc_greedy_decode(probs, dictionary)]


def rec_exact_match(model_or_path: ModelLike, inputs: np.ndarray, texts: Sequence[str], *,
                    dictionary: Sequence[str] | None = None, batch_size: int = 32,
                    threads: int | None = None, ignore_space: bool = True) -> float:
    """Share of lines whose greedy-decoded string equals the rendered text exactly.

    Spaces are ignored by default, as PaddleOCR's RecMetric does (ignore_space=True):
    the recognizer often reads the margins of a crop as leading or trailing spaces.
    """
    return float(rec_hits(model_or_path, inputs, texts, dictionary=dictionary, batch_size=batch_size,
                          threads=threads, ignore_space=ignore_space).mean())


def rec_hits(model_or_path: ModelLike, inputs: np.ndarray, texts: Sequence[str], *,
             dictionary: Sequence[str] | None = None, batch_size: int = 32,
             threads: int | None = None, ignore_space: bool = True) -> np.ndarray:
    """Per line, whether the recognizer reads it exactly ([N] bool; `rec_exact_match` is the mean)."""
    if len(inputs) != len(texts):
        raise InputError(f"{len(inputs)} inputs but {len(texts)} texts")
    read = recognize(model_or_path, inputs, dictionary=dictionary, batch_size=batch_size, threads=threads)
    return exact_matches(read, texts, ignore_space=ignore_space)


def exact_match(read: Sequence[str], texts: Sequence[str], *, ignore_space: bool = True) -> float:
    """Share of equal strings (spaces removed from both first when `ignore_space`)."""
    return float(exact_matches(read, texts, ignore_space=ignore_space).mean())


def exact_matches(read: Sequence[str], texts: Sequence[str], *, ignore_space: bool = True) -> np.ndarray:
    """Per pair, whether the strings are equal ([N] bool; spaces removed first when `ignore_space`)."""
    if len(read) != len(texts):
        raise InputError(f"{len(read)} read strings but {len(texts)} texts")
    if not texts:
        raise InputError("no texts to compare")

    def clean(text: str) -> str:
        return text.replace(" ", "") if ignore_space else text

    return np.array([clean(a) == clean(b) for a, b in zip(read, texts, strict=True)], dtype=bool)


def classify(model: ModelLike, inputs: np.ndarray, *, batch_size: int = 32,
             threads: int | None = None) -> np.ndarray:
    """The argmax class of a classifier over preprocessed inputs, [N] int64."""
    scores = np.concatenate(list(_run(_load(model), inputs, batch_size, threads)))
    return scores.reshape(len(scores), -1).argmax(axis=1)


def cls_accuracy(model_or_path: ModelLike, inputs: np.ndarray, labels: np.ndarray, *,
                 batch_size: int = 32, threads: int | None = None) -> float:
    """Share of lines whose argmax angle class equals the label."""
    return float(cls_hits(model_or_path, inputs, labels, batch_size=batch_size, threads=threads).mean())


def cls_hits(model_or_path: ModelLike, inputs: np.ndarray, labels: np.ndarray, *,
             batch_size: int = 32, threads: int | None = None) -> np.ndarray:
    """Per line, whether the argmax angle class equals the label ([N] bool; `cls_accuracy` is the mean)."""
    labels = np.asarray(labels)
    if len(inputs) != len(labels):
        raise InputError(f"{len(inputs)} inputs but {len(labels)} labels")
    return classify(model_or_path, inputs, batch_size=batch_size, threads=threads) == labels


def _run(model: onnx.ModelProto, inputs: np.ndarray, batch_size: int, threads: int | None):
    """The first output over `inputs`, one array per batch (a model with a fixed batch runs in chunks)."""
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    session = ort_session(model, threads)
    name = session.get_inputs()[0].name
    for start in range(0, len(inputs), batch_size):
        batch = np.ascontiguousarray(inputs[start:start + batch_size], dtype=np.float32)
        yield run_ort(session, [{name: batch}])[0]


def _load(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load(os.fspath(model))
