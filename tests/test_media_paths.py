"""`{"path"}` inputs against a path that is swapped for a symlink while the worker reads it.

The review won this race 4 times in 400 against a resolve-then-open check: the check saw a real
folder under the root, the open followed the symlink that replaced it. Opening one component at a
time beneath the root's descriptor, never following a link, leaves no window."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeq.config.errors import MediaError, UnsafeReference
from pipeq.config.settings import Settings
from pipeq.core.inputs import PathRef
from pipeq.worker.media import MediaLoader

TRIES = 400
INSIDE, OUTSIDE = b"inside the root", b"SECRET outside the root"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "a.bin").write_bytes(OUTSIDE)
    (tmp_path / "media").mkdir()
    return tmp_path / "media"


@pytest.fixture
def loader(root: Path) -> Iterator[MediaLoader]:
    media = MediaLoader(Settings(media_roots=[root]))
    yield media
    media.close()


# A process of its own, so the swaps go on while the reader holds the GIL. renameat2 with
# RENAME_EXCHANGE: both names exist at every instant, only the files behind them trade places.
_FLIPPER = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = sys.argv[1].encode(), sys.argv[2].encode()
print("flipping", flush=True)
while True:
    if libc.renameat2(-100, a, -100, b, 2) != 0:
        sys.exit(f"renameat2: errno {ctypes.get_errno()}")
"""


def _flip(real: Path, link_target: Path) -> Callable[[], None]:
    """Swap `real` with a symlink to `link_target`, back and forth, until the returned stop is
    called."""
    swap = real.with_name(real.name + ".swap")
    swap.symlink_to(link_target)
    flipper = subprocess.Popen(
        [sys.executable, "-c", _FLIPPER, str(real), str(swap)], stdout=subprocess.PIPE
    )
    assert flipper.stdout is not None and flipper.stdout.readline() == b"flipping\n"

    def stop_flipping() -> None:
        flipper.kill()
        flipper.wait(10)

    return stop_flipping


def _read_while_flipping(loader: MediaLoader, path: Path, stop: Callable[[], None]) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    try:
        for _ in range(TRIES):
            try:
                data = loader.fetch(PathRef(path=str(path)))
            except MediaError as exc:
                outcomes[type(exc).__name__] += 1
            else:
                outcomes["outside bytes" if data == OUTSIDE else "inside bytes"] += 1
    finally:
        stop()
    return outcomes


def test_a_folder_swapped_for_a_symlink_never_reads_outside(
    root: Path, loader: MediaLoader
) -> None:
    (root / "d").mkdir()
    (root / "d" / "a.bin").write_bytes(INSIDE)
    stop = _flip(root / "d", root.parent / "outside")
    outcomes = _read_while_flipping(loader, root / "d" / "a.bin", stop)
    print(f"\n{TRIES} reads while a folder flips: {dict(outcomes)}")
    assert outcomes["outside bytes"] == 0, outcomes
    assert outcomes["inside bytes"] > 0, f"the real folder was never read: {outcomes}"


def test_a_file_swapped_for_a_symlink_never_reads_outside(root: Path, loader: MediaLoader) -> None:
    (root / "a.bin").write_bytes(INSIDE)
    stop = _flip(root / "a.bin", root.parent / "outside" / "a.bin")
    outcomes = _read_while_flipping(loader, root / "a.bin", stop)
    print(f"\n{TRIES} reads while a file flips: {dict(outcomes)}")
    assert outcomes["outside bytes"] == 0, outcomes
    assert outcomes["inside bytes"] > 0, f"the real file was never read: {outcomes}"


def test_a_symlink_that_stays_inside_the_root_is_refused_too(
    root: Path, loader: MediaLoader
) -> None:
    # The price of never following links: one that points within the root is refused as well.
    (root / "a.bin").write_bytes(INSIDE)
    (root / "alias.bin").symlink_to(root / "a.bin")
    (root / "folder").symlink_to(root)
    for path in (root / "alias.bin", root / "folder" / "a.bin"):
        with pytest.raises(UnsafeReference, match="symbolic link"):
            loader.fetch(PathRef(path=str(path)))
    assert loader.fetch(PathRef(path=str(root / "a.bin"))) == INSIDE


def test_a_nested_file_under_the_root_is_read(root: Path, loader: MediaLoader) -> None:
    (root / "x" / "y").mkdir(parents=True)
    (root / "x" / "y" / "a.bin").write_bytes(INSIDE)
    assert loader.fetch(PathRef(path=f"{root}/x/./y//a.bin")) == INSIDE
    with pytest.raises(UnsafeReference, match="outside"):
        loader.fetch(PathRef(path=f"{root}/x/../x/y/a.bin"))


def test_paths_are_matched_to_the_root_by_whole_components(root: Path, loader: MediaLoader) -> None:
    """A sibling whose name starts with the root's is outside; so are relative paths."""
    sibling = root.with_name(root.name + "-sibling")
    sibling.mkdir()
    (sibling / "a.bin").write_bytes(OUTSIDE)
    (root / "a.bin").write_bytes(INSIDE)
    for raw in (f"{sibling}/a.bin", "media/a.bin", f"{root.parent}/a.bin", f"/{root}/../x"):
        with pytest.raises(UnsafeReference):
            loader.fetch(PathRef(path=raw))
    assert loader.fetch(PathRef(path=f"//{root}//a.bin")) == INSIDE
