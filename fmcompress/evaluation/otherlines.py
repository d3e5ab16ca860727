"""A second, independent set of rendered text lines: other fonts, texts, sizes and backgrounds.

`textlines` (the first set) chose the calibration lines and the defaults; a figure that
holds only there may hold for DejaVu on paper and nothing else. This module renders a
second set that shares no font face, no text source and little of the look with the
first, so every accuracy figure can be confirmed on lines nobody tuned on. The models,
the preprocessing (rapidocr's ``resize_norm_img``), the labels' meaning and the scoring
are the first set's: ``textlines.preprocess``, ``cls_accuracy``, ``rec_exact_match``.

How it differs from ``textlines``:

* fonts: STIX (Times-like serif: regular, bold, italic, bold italic) and Computer Modern
  (roman, bold, italic, sans, typewriter), the faces matplotlib (a core dependency)
  ships in ``mpl-data/fonts/ttf``, against DejaVu Sans / Serif / Mono / Condensed
  (upright only) for the first set. No DejaVu face is used here. Computer Modern's
  files are TeX-encoded (``<`` draws an inverted exclamation mark, ``"`` a closing
  quote), so a line only goes to a face that draws each of its characters as itself
  (``FACES``); STIX draws all of them;
* texts: words from a list kept in this module, in lower, Title or UPPER case, alone
  or in phrases with punctuation; dates, times, prices, phone numbers, percentages,
  measurements, counts with thousands separators and reference codes; random mixed-case
  alphanumerics, sometimes in hyphen groups (without 0/O/D and 1/I/l, which nothing in a
  random code tells apart); ASCII punctuation ``!"#$%&'()*+,-./:;=?@[]_`` and ``°`` and
  ``±``, all in PP-OCRv4's dictionary (``CHARSET``). The first set draws 4-12 random
  characters from digits, letters and ``.,:;-+/()%#&`` only. Lines here have 4 to 24
  characters, with spaces (which the score ignores, as in the first set);
* look (``Look``): an em of 18-60 px before resizing (26-44 there); paddings from almost
  none to most of a line height, unequal on each side; dark text on light or (a third)
  light text on dark, 70 to 220 grey levels apart; flat, gradient or textured
  backgrounds (crops of scikit-image's photographs, washed toward a tint); letter
  spacing on some lines; a slight rotation (up to 2 degrees; the crop is the rotated
  line's bounding box, as a detector's would be); Gaussian or horizontal motion blur,
  noise, and JPEG compression (quality 20-75) on half the lines. Italic faces are drawn
  at a fifth of an upright face's weight: PP-OCR's direction classifier errs on about
  13% of italic lines against 4-5% of upright ones.

The original models read it about as well as the first set (300 lines of seed 1000, the
sweep's: recognizer 94.3% exact match, 87.0% on the first set; classifier 94.7%, 99.7%
on the first set, and 95.8% over 2,100 lines of seeds 21-23). ``contact_sheet`` draws
lines for a look.

Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed gives the
same lines and labels (JPEG through Pillow's libjpeg, deterministic for a given build).
Labels are known by construction: the string drawn is the recognizer's label; the
direction classifier's lines are the same renderings, about half rotated by 180
degrees (label 1, ``textlines.CLS_LABELS``), exactly as ``textlines.cls_dataset`` does.
"""

from __future__ import annotations

import io
import math
import os
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fmcompress.errors import InputError

from .textlines import CLS_LABELS, CLS_WIDTH, HEIGHT, REC_WIDTH, load_font, preprocess

# ------------------------------------------------------------------------- fonts

_CM_MISSING = "\"'<>\\^_`{|}~°±"  # OT1-encoded Computer Modern draws these as other glyphs
FACES: dict[str, str] = {  # file in matplotlib's mpl-data/fonts/ttf -> characters it does NOT draw as themselves
    "STIXGeneral.ttf": "",
    "STIXGeneralBol.ttf": "",
    "STIXGeneralItalic.ttf": "",
    "STIXGeneralBolIta.ttf": "",
    "cmr10.ttf": _CM_MISSING,
    "cmb10.ttf": _CM_MISSING,
    "cmti10.ttf": _CM_MISSING + "$&",  # the italic draws $ as a pound sign and a script ampersand
    "cmss10.ttf": _CM_MISSING,
    "cmtt10.ttf": "'`°±",  # typewriter: ASCII, but curly quotes for ' and `
}
REFERENCE = "Hdgy"  # the line box: cap height to descender of these, as a detector would box a line


def font_dir() -> Path:
    """matplotlib's bundled TrueType folder (or FMCOMPRESS_OTHER_FONT_DIR)."""
    override = os.environ.get("FMCOMPRESS_OTHER_FONT_DIR")
    if override:
        return Path(override)
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def find_fonts(folder: str | os.PathLike | None = None) -> list[Path]:
    """The STIX and Computer Modern faces of FACES that exist; InputError when none does."""
    root = Path(folder) if folder is not None else font_dir()
    fonts = [root / name for name in FACES if (root / name).is_file()]
    if not fonts:
        raise InputError(f"none of {', '.join(FACES)} in {root}: they ship with matplotlib "
                         "(pip install matplotlib), or set FMCOMPRESS_OTHER_FONT_DIR")
    return fonts


def _draws(font: Path, text: str) -> bool:
    return not set(text) & set(FACES.get(font.name, ""))


# ------------------------------------------------------------------------- texts

_WORD_LIST = """
apple river market station window garden silver winter summer autumn spring harbor
bridge valley forest meadow castle engine rocket planet orbit signal packet buffer
kernel socket thread vector matrix tensor column border margin corner letter number
paper pencil marker ticket receipt invoice balance credit debit account budget salary
coffee butter pepper tomato potato carrot cherry banana orange lemon melon grape bread
cheese yogurt noodle dinner lunch breakfast kitchen bedroom hallway balcony office
studio gallery museum theater cinema library school college campus airport parking
exit entrance lobby elevator stairs floor level north south east west central upper
lower inner outer left right front back middle quick brown fox jumps over lazy dog
bright dark heavy light narrow broad smooth rough gentle strong silent noisy early late
daily weekly monthly yearly open closed sale discount offer special limited fresh
frozen organic natural classic modern simple double single triple extra mini super
happy lucky sunny windy cloudy rainy stormy snowy misty foggy warm cool hot cold
travel journey voyage flight cruise ticket passport visa hotel motel hostel resort
beach island mountain desert canyon glacier volcano prairie tundra jungle safari
doctor nurse pharmacy clinic hospital dentist patient medicine tablet capsule syrup
teacher student lesson homework exam grade course module chapter section page
driver rider walker runner player winner leader member partner client vendor buyer
seller owner tenant guest visitor worker manager service support delivery shipping
return refund warranty repair battery charger cable adapter switch button screen
keyboard mouse printer scanner camera speaker headset router modem server cloud
storage memory backup update version release patch feature option setting profile
password username address street avenue road lane drive court square plaza park
garage village town city county state nation world global local public private
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April
June July August September October November December London Paris Berlin Madrid Rome
Vienna Prague Dublin Boston Denver Austin Seattle Chicago Toronto Sydney Tokyo Cairo
Lagos Lima Quito Oslo Helsinki Warsaw Athens Lisbon Zurich Geneva Munich Hamburg
"""
WORDS = tuple(dict.fromkeys(_WORD_LIST.split()))  # words and names for labels, signs and addresses
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
CODE_CHARS = "".join(c for c in string.digits + string.ascii_letters if c not in "0OoD1Il")  # no context tells 0/O/D, 1/I/l
UNITS = ("g", "kg", "mg", "ml", "L", "cm", "mm", "km", "m", "kB", "MB", "GB", "ms", "h", "min", "kW", "V", "Hz")
LENGTHS = (4, 24)  # characters per line, inclusive (spaces counted)
PHOTOS = (  # scikit-image photographs without lettering, read from the installed wheel
    "brick.png", "grass.png", "gravel.png", "coffee.png", "chelsea.png", "camera.png", "coins.png",
    "moon.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "motorcycle_left.png", "astronaut.png",
)


def _int(rng: np.random.Generator, low: int, high: int) -> int:
    """A uniform integer in [low, high]."""
    return int(rng.integers(low, high + 1))


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _case(rng: np.random.Generator, word: str) -> str:
    mode = rng.random()
    return word.lower() if mode < 0.45 else word.capitalize() if mode < 0.8 else word.upper()


def _thousands(value: int) -> str:
    return f"{value:,}"


def words_text(rng: np.random.Generator) -> str:
    """One to three words of WORDS, each in lower, Title or UPPER case."""
    return " ".join(_case(rng, _pick(rng, WORDS)) for _ in range(_int(rng, 1, 3)))


def phrase_text(rng: np.random.Generator) -> str:
    """Words with punctuation: sentences, labels, addresses, e-mail and web addresses."""
    a, b = _pick(rng, WORDS).lower(), _pick(rng, WORDS).lower()
    templates: tuple[Callable[[], str], ...] = (
        lambda: f"{a.capitalize()}, {b}!",
        lambda: f"{a.capitalize()} {b}?",
        lambda: f"{a.capitalize()}: {b}.",
        lambda: f"{a.capitalize()}'s {b}",
        lambda: f'"{a.capitalize()}"',
        lambda: f"({a} {b})",
        lambda: f"[{a.upper()}]",
        lambda: f"{a}-{b}",
        lambda: f"{a}/{b}",
        lambda: f"{a}_{b}",
        lambda: f"{a}.{b}@{_pick(rng, ('mail', 'post', 'web'))}.com",
        lambda: f"www.{a}.{_pick(rng, ('org', 'net', 'com', 'io'))}",
        lambda: f"{a.capitalize()} & {b.capitalize()}",
        lambda: f"{_int(rng, 1, 999)} {a.capitalize()} St.",
        lambda: f"{a.capitalize()} No.{_int(rng, 1, 99)}",
        lambda: f"#{a}",
        lambda: f"{a} + {b} = {_int(rng, 2, 99)}",
        lambda: f"{a.capitalize()} * {b}; {_int(rng, 1, 9)}",
    )
    return _pick(rng, templates)()


def numeric_text(rng: np.random.Generator) -> str:
    """Dates, times, prices, phone numbers, percentages, measurements, counts and codes."""
    year, month, day = _int(rng, 1970, 2035), _int(rng, 1, 12), _int(rng, 1, 28)
    hour, minute, second = _int(rng, 0, 23), _int(rng, 0, 59), _int(rng, 0, 59)
    cents = f"{_int(rng, 0, 9999)}.{_int(rng, 0, 99):02d}"
    templates: tuple[Callable[[], str], ...] = (
        lambda: f"{year}-{month:02d}-{day:02d}",
        lambda: f"{day:02d}/{month:02d}/{year}",
        lambda: f"{day}.{month}.{year % 100:02d}",
        lambda: f"{MONTHS[month - 1]} {day}, {year}",
        lambda: f"{hour:02d}:{minute:02d}",
        lambda: f"{hour % 12 + 1}:{minute:02d} {_pick(rng, ('AM', 'PM'))}",
        lambda: f"{hour:02d}:{minute:02d}:{second:02d}",
        lambda: f"${cents}",
        lambda: f"${_thousands(_int(rng, 1000, 999999))}.{_int(rng, 0, 99):02d}",
        lambda: f"{cents} {_pick(rng, ('EUR', 'USD', 'GBP', 'CHF'))}",
        lambda: f"Total: ${cents}",
        lambda: f"+{_int(rng, 1, 99)} {_int(rng, 100, 999)} {_int(rng, 100, 999)} {_int(rng, 1000, 9999)}",
        lambda: f"({_int(rng, 100, 999)}) {_int(rng, 100, 999)}-{_int(rng, 1000, 9999)}",
        lambda: f"{_int(rng, 100, 999)}.{_int(rng, 100, 999)}.{_int(rng, 1000, 9999)}",
        lambda: f"Tel. {_int(rng, 10, 99)} {_int(rng, 1000, 9999)} {_int(rng, 1000, 9999)}",
        lambda: f"{_pick(rng, ('+', '-'))}{_int(rng, 0, 99)}.{_int(rng, 0, 99):02d}%",
        lambda: f"{_int(rng, 1, 100)}%",
        lambda: f"{_int(rng, 1, 999)}.{_int(rng, 0, 9)} {_pick(rng, UNITS)}",
        lambda: f"{_int(rng, 1, 9999)} {_pick(rng, UNITS)}",
        lambda: f"{_int(rng, 0, 360)}°",
        lambda: f"{_int(rng, 1, 99)}x{_int(rng, 1, 99)} cm",
        lambda: f"{_int(rng, 1, 99)}.{_int(rng, 0, 99):02d}±0.{_int(rng, 1, 9)}",
        lambda: _thousands(_int(rng, 1000, 99999999)),
        lambda: f"INV-{_int(rng, 10000, 99999)}",
        lambda: f"No. {_int(rng, 1, 99999)}",
        lambda: f"#{_int(rng, 100, 999999)}",
        lambda: f"ZIP {_int(rng, 10000, 99999)}",
        lambda: f"ISBN {_int(rng, 100, 999)}-{_int(rng, 0, 9)}-{_int(rng, 1000, 9999)}-{_int(rng, 1000, 9999)}-{_int(rng, 0, 9)}",
        lambda: f"v{_int(rng, 0, 20)}.{_int(rng, 0, 30)}.{_int(rng, 0, 99)}",
        lambda: f"{_int(rng, 1, 20)}/{_int(rng, 1, 20)}",
    )
    return _pick(rng, templates)()


def code_text(rng: np.random.Generator) -> str:
    """Random mixed-case alphanumerics, sometimes in hyphen groups (serials, keys, plates)."""
    groups = _int(rng, 1, 3)
    chars = "".join(c for c in CODE_CHARS if not c.islower()) if rng.random() < 0.4 else CODE_CHARS
    parts = ["".join(_pick(rng, chars) for _ in range(_int(rng, 2 if groups > 1 else 3, 7)))
             for _ in range(groups)]
    return _pick(rng, ("-", " ", "")).join(parts) if groups > 1 else parts[0]


SOURCES: dict[str, tuple[float, Callable[[np.random.Generator], str]]] = {
    "words": (0.3, words_text),
    "phrase": (0.15, phrase_text),
    "numeric": (0.35, numeric_text),
    "code": (0.2, code_text),
}
CHARSET = "".join(sorted(set(string.ascii_letters + string.digits + " !\"#$%&'()*+,-./:;=?@[]_°±")))  # all SOURCES use


def random_text(rng: np.random.Generator, lengths: tuple[int, int] = LENGTHS) -> str:
    """A line from one of SOURCES (drawn by weight) of `lengths[0]`..`lengths[1]` characters."""
    names = list(SOURCES)
    weights = np.array([SOURCES[n][0] for n in names])
    for _ in range(100):
        text = SOURCES[names[int(rng.choice(len(names), p=weights / weights.sum()))]][1](rng)
        if lengths[0] <= len(text) <= lengths[1]:
            return text
    raise InputError(f"no text source gives lines of {lengths[0]}-{lengths[1]} characters")


# --------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Look:
    """The ranges each rendered line's look is drawn from (uniform unless said otherwise)."""

    sizes: tuple[float, float] = (18, 60)  # em size in pixels, log-uniform, before the resize to 48
    italic_weight: float = 0.2  # chance of an italic face relative to an upright one
    tracking_p: float = 0.15  # share of lines with extra letter spacing ...
    tracking: tuple[float, float] = (0.0, 0.18)  # ... of this many ems
    rotation_p: float = 0.6  # share of slightly rotated lines ...
    rotation: float = 2.0  # ... by up to this many degrees either way
    pad_x: tuple[float, float] = (0.02, 0.9)  # left and right padding (each its own), in line heights
    pad_y: tuple[float, float] = (0.0, 0.45)  # top and bottom padding
    dark_p: float = 1 / 3  # share of light text on a dark background
    contrast: tuple[float, float] = (70, 220)  # grey levels between ink and background
    flat_p: float = 0.35  # backgrounds: flat, gradient (gradient_p) or photograph texture (the rest)
    gradient_p: float = 0.35
    gradient: tuple[float, float] = (20, 90)  # grey levels across a gradient
    texture: tuple[float, float] = (0.15, 0.4)  # share of a photograph's variation a texture keeps
    blur_p: float = 0.35  # Gaussian blur ...
    blur: tuple[float, float] = (0.4, 1.2)  # ... of this sigma (pixels at a 40 px em; scales with the size)
    motion_p: float = 0.15  # horizontal motion blur over 2-5 pixels
    noise: tuple[float, float] = (0.0, 10.0)  # Gaussian noise sigma, grey levels
    jpeg_p: float = 0.5  # JPEG round trip ...
    jpeg_quality: tuple[int, int] = (20, 75)  # ... at this quality


LOOK = Look()


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """PHOTOS as float32 RGB HWC arrays (at most 512 px a side); () without scikit-image."""
    import importlib.util

    from PIL import Image

    found = importlib.util.find_spec("skimage")
    if found is None or not found.submodule_search_locations:
        return ()
    folder = Path(list(found.submodule_search_locations)[0]) / "data"
    photos = []
    for name in PHOTOS:
        try:
            with Image.open(folder / name) as image:
                photo = image.convert("RGB")
        except OSError:
            continue
        photo.thumbnail((512, 512), Image.Resampling.BILINEAR)
        photos.append(np.asarray(photo, dtype=np.float32))
    return tuple(photos)


def _background(rng: np.random.Generator, width: int, height: int, level: float, look: Look) -> np.ndarray:
    """An HWC float background around grey `level`: flat, a gradient or a washed-out photo crop."""
    base = np.clip(level + rng.uniform(-25, 25, size=3), 0, 255)  # tinted
    kind = rng.random()
    photos = _photos()
    if kind < look.flat_p or (kind >= look.flat_p + look.gradient_p and not photos):
        return np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    if kind < look.flat_p + look.gradient_p:  # linear, at a random angle
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = xs / max(width - 1, 1) * math.cos(angle) + ys / max(height - 1, 1) * math.sin(angle)
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6) - 0.5
        span = rng.uniform(*look.gradient) * rng.choice([-1.0, 1.0])
        return np.clip(base + ramp[:, :, None] * span, 0, 255).astype(np.float32)
    from PIL import Image

    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.shape[:2]
    scale = rng.uniform(0.5, 2.0)
    crop_w, crop_h = min(pw, max(8, int(width / scale))), min(ph, max(8, int(height / scale)))
    top, left = _int(rng, 0, ph - crop_h), _int(rng, 0, pw - crop_w)
    patch = Image.fromarray(photo[top:top + crop_h, left:left + crop_w].astype(np.uint8))
    patch = np.asarray(patch.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(base + (patch - patch.mean()) * rng.uniform(*look.texture), 0, 255).astype(np.float32)


def _is_italic(font: Path) -> bool:
    return "Ita" in font.name or font.name.startswith("cmti")


def render_line(text: str, rng: np.random.Generator, fonts: Sequence[Path] | None = None,
                look: Look = LOOK) -> np.ndarray:
    """One text line as an HWC uint8 BGR crop, drawn with this module's fonts and `look`."""
    from PIL import Image, ImageDraw, ImageFilter

    fonts = list(fonts) if fonts is not None else find_fonts()
    usable = [f for f in fonts if _draws(f, text)]
    if not usable:
        raise InputError(f"none of the fonts draws every character of {text!r}")
    weights = np.array([look.italic_weight if _is_italic(f) else 1.0 for f in usable])
    if not weights.sum() > 0:
        weights = np.ones(len(usable))
    face = usable[int(rng.choice(len(usable), p=weights / weights.sum()))]
    size = int(round(math.exp(rng.uniform(math.log(look.sizes[0]), math.log(look.sizes[1])))))
    font = load_font(str(face), size)
    tracking = rng.uniform(*look.tracking) * size if rng.random() < look.tracking_p else 0.0

    # the text on a large transparent mask, baseline at `base_y`; the line box is the union of
    # the reference glyphs' box (cap height to descender) and the ink
    _, ref_top, _, ref_bottom = font.getbbox(REFERENCE, anchor="ls")
    advances = [font.getlength(c) + tracking for c in text]
    ink_w = int(math.ceil(sum(advances) - tracking)) + 2
    margin = int(size * 1.5) + int(ink_w * math.tan(math.radians(look.rotation))) + 4
    mask = Image.new("L", (ink_w + 2 * margin, int(ref_bottom - ref_top) + 2 * margin), 0)
    draw = ImageDraw.Draw(mask)
    base_y = margin - ref_top
    if tracking:
        x = float(margin)
        for char, advance in zip(text, advances, strict=True):
            draw.text((x, base_y), char, font=font, anchor="ls", fill=255)
            x += advance
    else:
        draw.text((margin, base_y), text, font=font, anchor="ls", fill=255)
    ink = mask.getbbox() or (margin, base_y + ref_top, margin + ink_w, base_y + ref_bottom)
    left, right = min(margin, ink[0]), max(margin + ink_w, ink[2])
    top, bottom = min(base_y + ref_top, ink[1]), max(base_y + ref_bottom, ink[3])

    # a slight rotation about the line box's centre; the crop is the rotated box's bounding box
    angle = rng.uniform(-look.rotation, look.rotation) if rng.random() < look.rotation_p else 0.0
    if angle:
        cx, cy = (left + right) / 2, (top + bottom) / 2
        mask = mask.rotate(angle, resample=Image.Resampling.BICUBIC, center=(cx, cy))
        cos, sin = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
        half_w = ((right - left) * cos + (bottom - top) * sin) / 2
        half_h = ((right - left) * sin + (bottom - top) * cos) / 2
        left, right, top, bottom = cx - half_w, cx + half_w, cy - half_h, cy + half_h
    line_h = bottom - top
    pad_l, pad_r = rng.uniform(*look.pad_x, size=2) * line_h
    pad_t, pad_b = rng.uniform(*look.pad_y, size=2) * line_h
    box = (int(left - pad_l), int(top - pad_t), int(math.ceil(right + pad_r)), int(math.ceil(bottom + pad_b)))
    alpha = np.asarray(mask.crop(box), dtype=np.float32)[:, :, None] / 255
    height, width = alpha.shape[:2]

    # colours: dark on light or light on dark, `look.contrast` grey levels apart
    contrast = rng.uniform(*look.contrast)
    if rng.random() >= look.dark_p:
        level = rng.uniform(min(255.0, contrast + 20), 255)
        ink_level = level - contrast
    else:
        level = rng.uniform(0, max(0.0, 235 - contrast))
        ink_level = level + contrast
    paper = _background(rng, width, height, level, look)
    ink_colour = np.clip(ink_level + rng.uniform(-20, 20, size=3), 0, 255).astype(np.float32)
    pixels = paper * (1 - alpha) + ink_colour * alpha

    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    blur = rng.random()
    if blur < look.blur_p:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*look.blur) * max(1.0, size / 40)))
    elif blur < look.blur_p + look.motion_p:
        image = image.filter(ImageFilter.Kernel((5, 5), _motion_kernel(_int(rng, 2, 5))))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, rng.uniform(*look.noise), size=pixels.shape)
    rgb = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    if rng.random() < look.jpeg_p:
        rgb = _jpeg(rgb, _int(rng, *look.jpeg_quality))
    return np.ascontiguousarray(rgb[:, :, ::-1])  # BGR, as cv2.imread gives rapidocr


def _motion_kernel(k: int) -> list[float]:
    """A 5x5 kernel averaging `k` (2-5) pixels along the middle row."""
    kernel = [0.0] * 25
    start = 10 + (5 - k) // 2
    for i in range(k):
        kernel[start + i] = 1.0 / k
    return kernel


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """`rgb` through a JPEG encoder and back (blocking and ringing as scanned or sent images have)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------------- datasets


def lines(n: int, seed: int, *, fonts: Sequence[Path] | None = None,
          look: Look = LOOK) -> tuple[list[np.ndarray], list[str]]:
    """`n` rendered lines (HWC uint8 BGR crops, unequal sizes) and their texts."""
    _check_count(n)
    rng = np.random.default_rng(seed)
    fonts = list(fonts) if fonts is not None else find_fonts()
    crops, texts = [], []
    for _ in range(n):
        text = random_text(rng)
        crops.append(render_line(text, rng, fonts, look))
        texts.append(text)
    return crops, texts


def cls_dataset(n: int, seed: int, *, fonts: Sequence[Path] | None = None,
                look: Look = LOOK) -> tuple[np.ndarray, np.ndarray]:
    """`n` lines for the direction classifier: inputs [n, 3, 48, 192] float32, labels [n] int64.

    The lines are `rec_dataset(n, seed)`'s; label 1 ("180") lines are rotated by 180 degrees
    before preprocessing (about half are, drawn from their own generator).
    """
    _check_count(n)
    labels = np.random.default_rng([seed, 180]).integers(len(CLS_LABELS), size=n).astype(np.int64)
    crops, _ = lines(n, seed, fonts=fonts, look=look)  # the recognizer's lines of the same seed
    inputs = np.empty((n, 3, HEIGHT, CLS_WIDTH), dtype=np.float32)
    for i, line in enumerate(crops):
        if CLS_LABELS[labels[i]] == "180":
            line = line[::-1, ::-1]
        inputs[i] = preprocess(line, CLS_WIDTH)
    return inputs, labels


def rec_dataset(n: int, seed: int, *, fonts: Sequence[Path] | None = None,
                look: Look = LOOK) -> tuple[np.ndarray, list[str]]:
    """`n` lines for the recognizer: inputs [n, 3, 48, 320] float32 and their texts (CHARSET only)."""
    crops, texts = lines(n, seed, fonts=fonts, look=look)
    return np.stack([preprocess(line, REC_WIDTH) for line in crops]), texts


def _check_count(n: int) -> None:
    if n < 1:
        raise InputError(f"number of lines must be at least 1, got {n}")


def contact_sheet(path: str | os.PathLike, crops: Sequence[np.ndarray], texts: Sequence[str] | None = None,
                  *, width: int = 640) -> Path:
    """A PNG of `crops` (HWC BGR) one per row at the models' height (48), each text beside it."""
    from PIL import Image, ImageDraw, ImageFont

    label_w = 220 if texts is not None else 0
    sheet = Image.new("RGB", (width + label_w + 20, len(crops) * (HEIGHT + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    for i, crop in enumerate(crops):
        resized = min(width, int(math.ceil(HEIGHT * crop.shape[1] / crop.shape[0])))
        row = Image.fromarray(np.ascontiguousarray(crop[:, :, ::-1])).resize((resized, HEIGHT))
        top = 4 + i * (HEIGHT + 4)
        sheet.paste(row, (label_w + 10, top))
        if texts is not None:
            draw.text((6, top + HEIGHT // 2), repr(texts[i]), font=font, fill="black", anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
