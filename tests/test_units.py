import pytest

from fmcompress.errors import InputError
from fmcompress.units import format_bytes, parse_ceiling, parse_size


@pytest.mark.parametrize("text, expected", [
    ("256KB", 262144), ("256KiB", 262144), ("256kb", 262144), ("0.25MB", 262144),
    ("262144", 262144), ("1MiB", 1048576), ("2 KB", 2048), ("100B", 100),
])
def test_sizes_use_the_memory_convention(text, expected):
    assert parse_size(text) == expected
    assert parse_ceiling(text).bytes == expected


def test_relative_ceiling_divides_the_largest_map():
    ceiling = parse_ceiling("4x")
    assert ceiling.is_relative and ceiling.ratio == 4
    assert ceiling.resolve(802816) == 200704
    assert parse_ceiling("2.5X").resolve(1000) == 400


@pytest.mark.parametrize("text", ["0", "-5KB", "abc", "0x", "4y", "1x", "", "5 parsecs", "0.1"])
def test_bad_ceilings_are_input_errors(text):
    with pytest.raises(InputError, match="ceiling"):
        parse_ceiling(text)


def test_format_bytes():
    assert format_bytes(200704) == "196.0 KiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 1024**2) == "3.0 MiB"


def test_light_modules_do_not_import_onnxruntime_or_torch():
    """`import fmcompress.units` (and the package itself) must stay cheap: the API loads on first use."""
    import subprocess
    import sys

    code = ("import sys, fmcompress, fmcompress.units, fmcompress.errors, fmcompress.featuremaps; "
            "print(sorted(m for m in ('onnxruntime', 'torch', 'rich', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
