"""Output paths of every command (`-o`, `--json`, `--report`, `--plot`): checked before any
work, written through symlinks, with a normal file mode, atomically, never over an input,
and a device, FIFO, socket, folder or unwritable place refused with one line (exit 2)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import fmcompress.compiler
from fmcompress.cli import main
from fmcompress.errors import InputError
from fmcompress.modelio import check_output_path, output_transaction, write_bytes_atomic

FAST = ["--num-samples", "8", "--batch-size", "4", "--epochs", "1", "--block-epochs", "1", "-q"]


def write_tiny_model(path: Path) -> Path:
    """x[N,3,32,32] -> Conv(16) -> Relu -> Conv(16) -> y[N,16,32,32]: at a 32KB ceiling one map
    (64 KiB, k=8) is compressed and the graph output y (64 KiB) is not compressible."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    weights = [numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
               numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
               numpy_helper.from_array((rng.standard_normal((16, 16, 3, 3)) * 0.1).astype(np.float32), "w2"),
               numpy_helper.from_array(np.zeros(16, np.float32), "b2")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 32, 32])],
                              initializer=weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory) -> bytes:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.onnx").read_bytes()


@pytest.fixture
def tiny(tmp_path, tiny_bytes) -> Path:
    path = tmp_path / "tiny.onnx"
    path.write_bytes(tiny_bytes)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if a command starts its real work (the checks must come first)."""
    import fmcompress.api

    def forbidden(*args, **kwargs):
        raise AssertionError("the command started working before checking its outputs")

    for module, name in ((fmcompress.compiler, "compile_model"), (fmcompress.compiler, "verify_pair"),
                         (fmcompress.api, "analyze")):
        monkeypatch.setattr(module, name, forbidden)


@pytest.fixture
def umask():
    """umask(value) for the rest of the test."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, code: int = 2, contains: str = "", warnings: bool = False) -> str:
    """Exactly one `error: ...` line on stderr (after `warning: ...` lines when `warnings`)."""
    assert result.exit_code == code, (result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines(keepends=True)
    if warnings:
        lines = [line for line in lines if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("\n"), result.stderr
    assert "Traceback" not in result.output
    assert contains in lines[0], result.stderr
    return lines[0]


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# --- symlinks are written through --------------------------------------------------------


@pytest.mark.slow
def test_compile_writes_through_symlinks_to_their_targets(tiny, tmp_path):
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "model.onnx").write_bytes(b"old model")
    (tmp_path / "out.onnx").symlink_to(targets / "model.onnx")
    (tmp_path / "r.json").symlink_to(targets / "new.json")  # dangling: the target is created
    result = invoke("compile", tiny, "--ceiling", "32KB", "-o", tmp_path / "out.onnx", "--json",
                    tmp_path / "r.json", *FAST)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.onnx").is_symlink() and (tmp_path / "r.json").is_symlink()
    assert os.readlink(tmp_path / "out.onnx") == str(targets / "model.onnx")
    onnx.checker.check_model(onnx.load(str(targets / "model.onnx")))
    assert json.loads((targets / "new.json").read_text())["ceiling_bytes"] == 32768
    assert listing(targets) == {"model.onnx", "new.json"}  # no temporary files left


def test_analyze_json_through_a_symlink(tiny, tmp_path):
    (tmp_path / "a.json").symlink_to("real.json")  # relative link
    result = invoke("analyze", tiny, "--ceiling", "32KB", "--json", tmp_path / "a.json", "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a.json").is_symlink()
    assert json.loads((tmp_path / "real.json").read_text())["ceiling_bytes"] == 32768


# --- devices, FIFOs, sockets and folders are refused before any work ----------------------


def _special(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":  # bound by a relative name: AF_UNIX paths are short
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(kind)
        finally:
            os.chdir(cwd)
    elif kind == "device-link":  # a symlink to /dev/null: written through, it is a device
        path.symlink_to("/dev/null")
    elif kind == "folder":
        path.mkdir()
    return path


SPECIAL = {"fifo": "is a FIFO", "socket": "is a socket", "device-link": "is a character device",
           "folder": "directory"}


@pytest.mark.parametrize("kind", SPECIAL)
@pytest.mark.parametrize("option", ["-o", "--json", "--report-file"])
def test_compile_refuses_special_outputs_before_any_work(tiny, tmp_path, no_work, kind, option):
    target = _special(tmp_path, kind)
    before = {p: os.lstat(p) for p in tmp_path.iterdir()}
    if option == "--report-file":  # --report DIR whose report.json is the special file
        report = tmp_path / "rep"
        report.mkdir()
        target.rename(report / "report.json")
        target = report / "report.json"
        before = {p: os.lstat(p) for p in tmp_path.iterdir()}
        args = ["-o", tmp_path / "m.onnx", "--report", report]
    else:
        args = [option, target] + (["-o", tmp_path / "m.onnx"] if option != "-o" else [])
    result = invoke("compile", tiny, "--ceiling", "32KB", *args, *FAST)
    message = assert_one_line_error(result)
    assert SPECIAL[kind] in message or (kind == "folder" and "is a directory" in message)
    after = {p: os.lstat(p) for p in tmp_path.iterdir()}
    assert after.keys() == before.keys()
    assert all(stat.S_IFMT(after[p].st_mode) == stat.S_IFMT(before[p].st_mode) for p in before)
    assert kind != "device-link" or os.readlink(target) == "/dev/null"


@pytest.mark.parametrize("kind", ["fifo", "socket", "device-link"])
def test_analyze_and_verify_refuse_special_outputs(tiny, tmp_path, no_work, kind):
    target = _special(tmp_path, kind)
    for args in (["analyze", tiny, "--json", target], ["analyze", tiny, "--plot", target],
                 ["verify", tiny, tiny, "--json", target]):
        assert_one_line_error(invoke(*args), contains=SPECIAL[kind])
    assert stat.S_IFMT(os.lstat(target).st_mode) != stat.S_IFREG


def test_report_that_is_a_file_is_refused(tiny, tmp_path, no_work):
    (tmp_path / "rep").write_text("keep me")
    assert_one_line_error(invoke("compile", tiny, "--ceiling", "32KB", "--report", tmp_path / "rep"),
                          contains="is a file")
    assert (tmp_path / "rep").read_text() == "keep me"


# --- file modes ---------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_new_outputs_get_the_umask_mode(tiny, tmp_path, umask, mask):
    umask(mask)
    out, report = tmp_path / "m.onnx", tmp_path / "rep"
    result = invoke("compile", tiny, "--ceiling", "32KB", "-o", out, "--json", tmp_path / "r.json",
                    "--report", report, *FAST)
    assert result.exit_code == 0, result.output
    written = [out, tmp_path / "r.json", report / "report.json", report / "report.md", report / "memory.png"]
    assert {p.name: mode_of(p) for p in written} == {p.name: 0o666 & ~mask for p in written}
    assert mode_of(report) == 0o777 & ~mask


def test_replaced_outputs_keep_their_mode(tiny, tmp_path, umask):
    umask(0o022)
    out, js = tmp_path / "m.onnx", tmp_path / "a.json"
    for path, mode in ((out, 0o600), (js, 0o664)):
        path.write_bytes(b"old")
        path.chmod(mode)
    assert invoke("compile", tiny, "--ceiling", "32KB", "-o", out, *FAST).exit_code == 0
    assert invoke("analyze", tiny, "--json", js, "-q").exit_code == 0
    assert (mode_of(out), mode_of(js)) == (0o600, 0o664)
    assert out.read_bytes() != b"old" and json.loads(js.read_text())["source"] == str(tiny)


# --- missing parents: created, only once everything has passed ----------------------------


def test_missing_parent_folders_are_created(tiny, tmp_path):
    out, js, report = tmp_path / "a" / "b" / "m.onnx", tmp_path / "c" / "r.json", tmp_path / "d" / "e" / "rep"
    result = invoke("compile", tiny, "--ceiling", "32KB", "-o", out, "--json", js, "--report", report, *FAST)
    assert result.exit_code == 0, result.output
    assert out.is_file() and js.is_file() and (report / "memory.png").is_file()


def test_a_failure_while_writing_leaves_no_output_and_no_new_folder(tiny, tmp_path, monkeypatch):
    def failing_report(result, folder):
        write_bytes_atomic(b"{}", Path(folder) / "report.json")
        raise InputError("cannot write report.md: No space left on device")

    monkeypatch.setattr(fmcompress.compiler, "write_report", failing_report)
    before = listing(tmp_path)
    result = invoke("compile", tiny, "--ceiling", "32KB", "-o", tmp_path / "new" / "m.onnx", "--json",
                    tmp_path / "r.json", "--report", tmp_path / "x" / "rep", *FAST)
    assert_one_line_error(result, contains="No space left on device", warnings=True)
    assert listing(tmp_path) == before  # no model, no JSON, no folders, no temporary files


def test_a_parent_that_is_a_file_fails_before_any_work(tiny, tmp_path, no_work):
    (tmp_path / "file").write_text("x")
    for option in ("-o", "--json"):
        assert_one_line_error(invoke("compile", tiny, "--ceiling", "32KB", option, tmp_path / "file" / "m.onnx"),
                              contains="not a folder")
    assert_one_line_error(invoke("compile", tiny, "--ceiling", "32KB", "--report", tmp_path / "file" / "r"),
                          contains="not a folder")
    assert_one_line_error(invoke("analyze", tiny, "--json", tmp_path / "file" / "a" / "b.json"),
                          contains="not a folder")
    assert (tmp_path / "file").read_text() == "x"


# --- unwritable destinations ----------------------------------------------------------------


def _as_nobody(function):
    """Run `function()` as an unprivileged user (root writes anywhere); returns its result."""
    if os.geteuid() != 0:
        return function()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, run, send back the result
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        except OSError as exc:
            payload = ("no privileges to drop", repr(exc))
        else:
            try:
                payload = ("ok", function())
            except BaseException as exc:  # everything goes back to the parent
                payload = ("error", repr(exc))
        with os.fdopen(write, "wb") as pipe:
            pipe.write(pickle.dumps(payload))
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    if status == "no privileges to drop":
        pytest.skip(f"cannot run as an unprivileged user: {value}")
    if status == "error":
        raise AssertionError(value)
    return value


@pytest.fixture
def world_dir(tiny_bytes):
    """A folder every user may write (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="fmc-outputs-"))
    folder.chmod(0o777)
    (folder / "tiny.onnx").write_bytes(tiny_bytes)
    (folder / "tiny.onnx").chmod(0o644)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        with contextlib.suppress(OSError):
            path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(folder, ignore_errors=True)


def test_an_unwritable_folder_fails_before_any_work(world_dir, no_work):
    locked = world_dir / "locked"
    locked.mkdir()
    (locked / "old.onnx").write_bytes(b"old")
    locked.chmod(0o555)
    model = world_dir / "tiny.onnx"

    def run_all():
        outcomes = []
        for args in (["compile", model, "--ceiling", "32KB", "-o", locked / "m.onnx"],
                     ["compile", model, "--ceiling", "32KB", "-o", locked / "old.onnx"],
                     ["compile", model, "--ceiling", "32KB", "-o", world_dir / "ok.onnx", "--json", locked / "a.json"],
                     ["compile", model, "--ceiling", "32KB", "--report", locked / "sub" / "rep"],
                     ["analyze", model, "--json", locked / "a.json"],
                     ["verify", model, model, "--json", locked / "v.json"]):
            result = invoke(*args)
            outcomes.append((result.exit_code, result.stdout, result.stderr))
        return outcomes

    for code, stdout, stderr in _as_nobody(run_all):
        assert (code, stdout) == (2, "") and stderr.count("\n") == 1, stderr
        assert stderr.startswith("error: cannot write ") and "permission denied" in stderr, stderr
    assert sorted(p.name for p in locked.iterdir()) == ["old.onnx"]
    assert (locked / "old.onnx").read_bytes() == b"old"


def test_a_read_only_existing_file_is_not_replaced(world_dir, no_work):
    model, out = world_dir / "tiny.onnx", world_dir / "out.json"
    out.write_text("protected")
    out.chmod(0o444)
    code, stderr = _as_nobody(lambda: (lambda r: (r.exit_code, r.stderr))(invoke("analyze", model, "--json", out)))
    assert code == 2 and stderr == f"error: cannot write {out}: permission denied\n"
    assert out.read_text() == "protected"


# --- outputs never overwrite an input, nor each other --------------------------------------


def test_outputs_may_not_be_the_input_by_symlink_or_hard_link(tiny, tmp_path, no_work, tiny_bytes):
    (tmp_path / "soft.onnx").symlink_to(tiny)
    os.link(tiny, tmp_path / "hard.onnx")
    for args in (["compile", tiny, "--ceiling", "32KB", "-o", tmp_path / "soft.onnx"],
                 ["compile", tiny, "--ceiling", "32KB", "-o", tmp_path / "hard.onnx"],
                 ["compile", tiny, "--ceiling", "32KB", "--json", tiny],
                 ["compile", tiny, "--ceiling", "32KB", "--plan-only", "--json", tmp_path / "hard.onnx"],
                 ["analyze", tiny, "--json", tmp_path / "soft.onnx"],
                 ["analyze", tiny, "--plot", tiny],
                 ["verify", tiny, tmp_path / "hard.onnx", "--json", tmp_path / "soft.onnx"]):
        assert_one_line_error(invoke(*args), contains="would overwrite the input")
    assert tiny.read_bytes() == tiny_bytes and (tmp_path / "soft.onnx").is_symlink()
    assert os.stat(tiny).st_nlink == 2


def test_calibration_data_is_an_input_too(tiny, tmp_path, no_work):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 3, 32, 32), np.float32))
    before = data.read_bytes()
    assert_one_line_error(invoke("compile", tiny, "--ceiling", "32KB", "--data", data, "--json", data),
                          contains="would overwrite the input")
    assert data.read_bytes() == before


def test_two_outputs_may_not_be_the_same_file(tiny, tmp_path, no_work):
    (tmp_path / "link.json").symlink_to(tmp_path / "a.json")
    assert_one_line_error(invoke("compile", tiny, "--ceiling", "32KB", "-o", tmp_path / "a.json", "--json",
                                 tmp_path / "link.json"), contains="are the same file")
    assert_one_line_error(invoke("analyze", tiny, "--json", tmp_path / "a.png", "--plot", tmp_path / "a.png"),
                          contains="are the same file")
    assert_one_line_error(invoke("compile", tiny, "--ceiling", "32KB", "--json", tmp_path / "rep" / "report.json",
                                 "--report", tmp_path / "rep"), contains="are the same file")
    assert listing(tmp_path) == {"tiny.onnx", "link.json"}


# --- the helpers themselves -------------------------------------------------------------------


def test_check_output_path_accepts_what_can_be_written(tmp_path):
    (tmp_path / "existing").write_text("x")
    (tmp_path / "folder").mkdir()
    assert check_output_path(tmp_path / "new.onnx") == tmp_path / "new.onnx"
    assert check_output_path(tmp_path / "existing", "file") == tmp_path / "existing"
    assert check_output_path(tmp_path / "a" / "b" / "c.json") == tmp_path / "a" / "b" / "c.json"
    assert check_output_path(tmp_path / "folder", "dir") == tmp_path / "folder"
    assert check_output_path(tmp_path / "new-folder", "dir") == tmp_path / "new-folder"
    with pytest.raises(InputError, match="would overwrite the input"):
        check_output_path(tmp_path / "existing", inputs=[None, tmp_path / "folder" / ".." / "existing"])
    with pytest.raises(ValueError):
        check_output_path(tmp_path / "x", "pipe")
    assert listing(tmp_path) == {"existing", "folder"}  # checking writes nothing


def test_write_bytes_atomic_refuses_a_device_even_without_the_cli(tmp_path):
    (tmp_path / "null").symlink_to("/dev/null")
    with pytest.raises(InputError, match="character device"):
        write_bytes_atomic(b"data", tmp_path / "null")
    assert os.readlink(tmp_path / "null") == "/dev/null" and listing(tmp_path) == {"null"}


def test_output_transaction_lands_all_or_nothing(tmp_path):
    with output_transaction():
        write_bytes_atomic(b"1", tmp_path / "one")
        write_bytes_atomic(b"2", tmp_path / "sub" / "two")
        assert listing(tmp_path) - {"sub"} and not (tmp_path / "one").exists()  # only temporary files yet
    assert (tmp_path / "one").read_bytes() == b"1" and (tmp_path / "sub" / "two").read_bytes() == b"2"
    with pytest.raises(RuntimeError), output_transaction():
        write_bytes_atomic(b"new", tmp_path / "one")
        write_bytes_atomic(b"3", tmp_path / "deep" / "er" / "three")
        raise RuntimeError("later failure")
    assert (tmp_path / "one").read_bytes() == b"1"
    assert listing(tmp_path) == {"one", "sub", "sub/two"}
