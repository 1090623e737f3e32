"""Fixtures shared by lamina's suites.

- ``backend``: every registered backend (``lamina.registry.backends()``), so a backend that
  registers itself runs the whole conformance suite with no change here; a conformance
  test (or one of a module that says ``EACH_FORMAT = True``) whose stores the fixtures
  open runs again for each other layer format of its backend (:data:`LAYER_FORMATS`:
  ``overlay+dir``), with ``backend_options`` set to pick it.
- ``driver``: a store opened in a fresh home with that backend; cleaned up and closed
  after the test, which then checks that nothing is left mounted under the home.
- ``stores``: for tests that open, close and reopen stores themselves.
- ``corpus_dir``: the corpus of real image layers (``$LAMINA_CORPUS``).
- ``erofs_fsck``: ``fsck.erofs`` (erofs-utils 1.9, in the engines' lab: :mod:`tests.lab`)
  checks every EROFS image the test wrote, at its end.

A test marked ``root`` (most are: layers are chowned) skips when not run as root, and a
missing corpus skips its tests, except in CI (``CI=true``), where both are failures: a
CI that cannot run a test must not pass by skipping it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest

import lamina
import lamina.host.mount
from lamina import errors


def in_ci() -> bool:
    """Whether this run is CI's (which must skip nothing it can be asked to run)."""
    return os.environ.get("CI") == "true"


def lacking(reason: str) -> NoReturn:
    """Skip for want of ``reason`` locally; fail in CI."""
    if in_ci():
        pytest.fail(f"CI must be able to run this: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    """Skip (fail in CI) unless running as root."""
    if os.geteuid() != 0:
        lacking("needs root (layers hold files of other owners, devices, capabilities)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before any fixture runs: a store opened as non-root would fail in confusing ways.
    if item.get_closest_marker("root") is not None:
        require_root()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        from lamina.registry import backends

        # Module scope, so that a module's expensive fixtures are built once per backend.
        # A module that runs a suite against some backends only names them in BACKENDS.
        names = getattr(metafunc.module, "BACKENDS", None) or backends()
        # The conformance suite runs with every layer format; another module says
        # ``EACH_FORMAT = True`` to (the security suite does not yet).
        each = getattr(metafunc.module, "EACH_FORMAT",
                       metafunc.module.__name__.startswith("tests.contract."))
        if "backend_options" not in metafunc.fixturenames or not each:
            metafunc.parametrize("backend", names, scope="module")
            return
        # A store opened by the fixtures runs with each layer format too (overlay's
        # directory layers beside its default EROFS ones: the same contract).
        variants = [(name, opts) for name in names
                    for opts in [(), *LAYER_FORMATS.get(name, {}).values()]]
        ids = [name + next((f"+{k}" for k, v in LAYER_FORMATS.get(name, {}).items()
                            if v == opts), "") for name, opts in variants]
        metafunc.parametrize(("backend", "backend_options"), variants, ids=ids, scope="module")


LAYER_FORMATS: dict[str, dict[str, tuple[str, ...]]] = {
    "overlay": {"dir": ("overlay.layers=dir",)},
}
"""Per backend, the other layer formats the fixtures' stores run with (by the name a
test id carries: ``backend`` ``overlay+dir``), as the driver options that pick them."""

def open_variant(home: Path | str, variant: str) -> lamina.Driver:
    """A store of ``variant``: a backend, or ``BACKEND+FORMAT`` for one of its other
    layer formats (:data:`LAYER_FORMATS`: ``overlay+dir``), as the test ids name them."""
    backend, _, kind = variant.partition("+")
    options = LAYER_FORMATS[backend][kind] if kind else ()
    return lamina.open_driver(home, backend=backend, options=options)


DIR_LAYERS: dict[str, tuple[str, ...]] = {
    name: formats["dir"] for name, formats in LAYER_FORMATS.items() if "dir" in formats}
"""The options that make a backend's read-only layers directories (the applier's), for
the tests of the applier itself (the security suites, the isolated child)."""


def mounts_under(path: Path, *, images: bool = False) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo), leaving out the
    EROFS layers' own (mounted as long as their layer exists) unless ``images``."""
    prefix = str(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if (point == prefix or point.startswith(prefix + "/")) and (
                    images or not is_layer_image(Path(point))):
                found.append(point)
    return found


def is_layer_image(point: Path) -> bool:
    """Whether mount ``point`` is an EROFS layer's own (its ``diff/``, mounted as long
    as the layer exists)."""
    return (point.name == "diff" and point.parent.parent.name == "layers"
            and (point.parent / "layer.erofs").is_file())


def unmount_layer_images(under: Path) -> None:
    """Unmount the EROFS layers' own mounts below ``under``: kept while their layers
    exist, not after a test that leaves its layers to its temporary directory."""
    for point in mounts_under(under, images=True):
        if is_layer_image(Path(point)):
            lamina.host.mount.unmount(point)


Opener = Callable[..., lamina.Driver]
"""``opener(home, **kw) -> Driver``: how a suite opens a store (see ``open_store``)."""


class Stores:
    """Opens stores with one backend and closes whatever the test left open."""

    def __init__(self, backend: str, home: Path, opener: Opener | None = None) -> None:
        self.backend = backend
        self.home = home
        self.opener = opener or functools.partial(lamina.open_driver, backend=backend)
        self._open: list[lamina.Driver] = []

    def open(self, home: Path | None = None, **kw: Any) -> lamina.Driver:
        """``opener(home, **kw)``; a backend that cannot work here is lacking."""
        try:
            drv = self.opener(home or self.home, **kw)
        except errors.Unsupported as e:
            lacking(f"backend {self.backend} cannot work here: {e}")
        self._open.append(drv)
        return drv

    def close(self, drv: lamina.Driver) -> None:
        """Close ``drv`` without a cleanup (as a process that goes away would)."""
        self._open.remove(drv)
        drv.close()

    def reopen(self, drv: lamina.Driver, **kw: Any) -> lamina.Driver:
        """Close ``drv`` and open its home again (which recovers it)."""
        self.close(drv)
        return self.open(drv.home, **kw)

    def finish(self) -> None:
        """``cleanup()`` then ``close()`` every store still open."""
        while self._open:
            drv = self._open.pop()
            drv.cleanup()
            drv.close()


@pytest.fixture(autouse=True)
def _layer_images_unmounted(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test with a ``tmp_path``, the EROFS layers' mounts left in it go (a
    test's layers outlive it in its directory, their mounts must not)."""
    # Asked for here, before the test: then torn down after this fixture's end.
    path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if path is not None:
        unmount_layer_images(path)


@pytest.fixture(scope="session", autouse=True)
def _session_layer_images_unmounted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end, the EROFS layers' mounts left in any of the session's directories."""
    yield
    unmount_layer_images(tmp_path_factory.getbasetemp())


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """Where the test's store lives (not created: opening a store creates it)."""
    return tmp_path / "home"


@pytest.fixture(scope="module")
def backend_options() -> tuple[str, ...]:
    """Driver options every store of the fixtures opens with (a layer format's, see
    :data:`LAYER_FORMATS`); parametrized with ``backend``."""
    return ()


def open_with(home: Path, *, backend: str, extra: tuple[str, ...],
               options: Sequence[str] | Mapping[str, str] = (), **kw: Any) -> lamina.Driver:
    """``lamina.open_driver`` with ``extra`` options before the test's own."""
    if isinstance(options, Mapping):
        merged: Sequence[str] | Mapping[str, str] = {
            **dict(o.split("=", 1) for o in extra), **options}
    else:
        merged = [*extra, *options]
    return lamina.open_driver(home, backend=backend, options=merged, **kw)


@pytest.fixture
def open_store(backend: str, backend_options: tuple[str, ...],
               request: pytest.FixtureRequest) -> Opener:
    """How the suites open a store: ``lamina.open_driver`` with ``backend`` (and its
    layer format's options).  A module that runs the contract suite against another
    driver overrides this fixture (see :mod:`tests.contract`).  Where the stores keep
    EROFS layers (overlay's default), every image they write is read by ``fsck.erofs``
    at the test's end (the ``erofs_fsck`` fixture)."""
    if backend == "overlay" and "overlay.layers=dir" not in backend_options:
        from lamina.backends import erofslayers
        from tests.erofsimages import keeping

        request.getfixturevalue("erofs_fsck")
        monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setattr(erofslayers, "index_tar", keeping(erofslayers.index_tar))
    return functools.partial(open_with, backend=backend, extra=backend_options)


@pytest.fixture
def stores(backend: str, home: Path, open_store: Opener) -> Iterator[Stores]:
    """A :class:`Stores` for ``backend``; after the test, nothing may stay mounted."""
    opened = Stores(backend, home, open_store)
    yield opened
    opened.finish()
    unmount_layer_images(home.parent)
    assert mounts_under(home.parent) == [], "cleanup() left mounts behind"


@pytest.fixture
def driver(stores: Stores) -> lamina.Driver:
    """A store in a fresh home, with ``backend``."""
    return stores.open()


@pytest.fixture
def erofs_fsck(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``fsck.erofs`` (in the lab) reads every EROFS image the test writes through
    :mod:`tests.erofsimages`, at its end (see :func:`tests.erofsimages.fsck_at_end`)."""
    from tests import erofsimages

    with erofsimages.fsck_at_end(tmp_path_factory.mktemp("erofs-kept")):
        yield


def pytest_report_header(config: pytest.Config) -> list[str]:
    from tests import lab

    if not lab.present():
        return [f"lab: none at {lab.location()} (tests that need it skip, or fail in CI)"]
    found = lab.versions()
    return [f"lab: {lab.location()}: " + ", ".join(f"{k} {v}" for k, v in found.items())]


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The corpus of real image layers (``$LAMINA_CORPUS``, else /var/tmp/lamina-corpus)."""
    path = Path(os.environ.get("LAMINA_CORPUS") or "/var/tmp/lamina-corpus")
    if not (path / "MANIFEST").is_file():
        lacking(f"no corpus at {path} (build it with shared/corpus/build-corpus.sh)")
    return path
