"""The project's one atomic-write helper: whole-or-nothing files and directories, even when the writer is killed.

The crash tests run a writer in a child process that SIGKILLs itself just before its N-th file-system
step (fsync, rename, exchange, removal), for every N, and check what a reader finds afterwards.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.core import atomic

ROOT = Path(__file__).resolve().parents[1]

_WRITER = r"""
import importlib.util, os, shutil, signal, sys
from pathlib import Path

kill_at, kind, target, swap, source = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4], sys.argv[5]
spec = importlib.util.spec_from_file_location("atomic", source)  # the module alone: no torch import per run
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
steps = 0

def killing(fn):
    def step(*args, **kwargs):
        global steps
        steps += 1
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return step

os.replace, os.fsync, shutil.rmtree = killing(os.replace), killing(os.fsync), killing(shutil.rmtree)
atomic._exchange = killing(atomic._exchange) if swap == "exchange" else (lambda a, b: False)
if kind == "file":
    with atomic.atomic_open(target) as f:
        f.write("new\n" * 1000)
else:
    with atomic.atomic_directory(target) as tmp:
        for i in range(3):
            (tmp / f"part{i}.txt").write_text(f"new {i}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"n" * 4096)
print("steps", steps)
"""

OLD_DIR = {"part0.txt": "old 0", "part1.txt": "old 1"}
NEW_DIR = {"part0.txt": "new 0", "part1.txt": "new 1", "part2.txt": "new 2", "sub/weights.bin": "n" * 4096}


def _run_writer(kill_at: int, kind: str, target: Path, swap: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _WRITER, str(kill_at), kind, str(target), swap, atomic.__file__],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def _tree(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _make_old(kind: str, target: Path) -> None:
    if kind == "file":
        target.write_text("old\n" * 10)
    else:
        target.mkdir()
        for name, text in OLD_DIR.items():
            (target / name).write_text(text)


def _state(kind: str, target: Path) -> str:
    """'old' or 'new' when the reader finds one whole version; anything else is a defect."""
    if kind == "file":
        text = target.read_text() if target.is_file() else None
        return {"old\n" * 10: "old", "new\n" * 1000: "new"}.get(text, f"corrupt: {text!r:.40}")
    if not target.is_dir():
        return "missing"
    tree = _tree(target)
    return "old" if tree == OLD_DIR else "new" if tree == NEW_DIR else f"corrupt: {sorted(tree)}"


@pytest.mark.parametrize(("kind", "swap"), [("file", "exchange"), ("directory", "exchange"), ("directory", "rename")])
def test_a_writer_killed_at_any_step_leaves_the_old_or_the_new_version(tmp_path: Path, kind: str, swap: str) -> None:
    probe = tmp_path / "probe"
    _make_old(kind, probe)
    full = _run_writer(0, kind, probe, swap)
    assert full.returncode == 0, full.stderr[-2000:]
    steps = int(re.search(r"steps (\d+)", full.stdout).group(1))
    assert steps >= 3, full.stdout  # fsyncs and at least one rename were intercepted
    assert _state(kind, probe) == "new"

    seen = set()
    for kill_at in range(1, steps + 1):
        case = tmp_path / f"kill{kill_at}"
        case.mkdir()
        target = case / "out"
        _make_old(kind, target)
        out = _run_writer(kill_at, kind, target, swap)
        assert out.returncode == -signal.SIGKILL, (kill_at, out.returncode, out.stderr[-2000:])
        state = _state(kind, target)
        if swap == "rename" and state == "missing":  # the only gap of the fallback: between its two renames
            atomic.recover_directory(target)  # what the next write (or a careful reader) does first
            state = _state(kind, target)
            assert state == "old", kill_at
        assert state in ("old", "new"), (kill_at, state)
        seen.add(state)
        # the next write to the same target succeeds and leaves no temporary behind
        assert _run_writer(0, kind, target, swap).returncode == 0
        assert _state(kind, target) == "new"
        assert sorted(p.name for p in case.iterdir()) == ["out"], kill_at
    assert seen == {"old", "new"}  # the kills fell both before and after the switch


def test_an_exception_inside_the_block_keeps_the_old_version_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "model"
    _make_old("directory", target)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.atomic_directory(target) as tmp:
            (tmp / "part0.txt").write_text("half")
            raise RuntimeError("boom")
    assert _tree(target) == OLD_DIR
    file = tmp_path / "data.jsonl"
    file.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.atomic_open(file) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert file.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "model"]


def test_a_new_directory_a_suffix_kept_for_format_detection_and_a_writer_that_wrote_nothing(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "new"
    with atomic.atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("a")
    assert _tree(target) == {"a.txt": "a"}
    with atomic.atomic_file(tmp_path / "clip.mp4") as tmp:
        assert tmp.suffix == ".mp4" and tmp.parent == tmp_path  # PyAV picks the container from the suffix
        tmp.write_bytes(b"x")
    assert (tmp_path / "clip.mp4").read_bytes() == b"x"
    with pytest.raises(FileNotFoundError, match="produced no file"):
        with atomic.atomic_file(tmp_path / "nothing.bin") as tmp:
            tmp.unlink()
    assert not (tmp_path / "nothing.bin").exists()
    with pytest.raises(ValueError, match="mode must be"):
        with atomic.atomic_open(tmp_path / "x", "a"):
            pass


def test_append_durably_appends(tmp_path: Path) -> None:
    journal = tmp_path / "train.jsonl"
    atomic.append_durably(journal, ["a\n"])
    atomic.append_durably(journal, ["b\n", "c\n"])
    assert journal.read_text() == "a\nb\nc\n"


def test_every_writer_in_the_project_goes_through_the_helper() -> None:
    """No module renames files by hand: `os.replace`, `os.rename` and `Path.rename` live in the helper only."""
    pattern = re.compile(r"\bos\.(replace|rename)\(|\.rename\(")
    offenders = []
    for package in ("mmpo", "datamodules", "augment", "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "atomic.py" and path.parent.name == "core":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
