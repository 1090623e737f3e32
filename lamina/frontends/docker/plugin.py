"""``lamina serve``: Docker's graph driver plugin (contract §5), one driver for Docker.

Docker (``dockerd --experimental --storage-driver NAME``) finds a legacy plugin by
its socket's name, ``/run/docker/plugins/NAME.sock``, and calls it with HTTP POSTs
(:mod:`lamina.frontends.docker.http` carries them).  :class:`Plugin` answers each call with
one shared :class:`~lamina.driver.Driver`; request and answer fields are Docker's
(moby's ``daemon/graphdriver/proxy.go``):

- ``/Plugin.Activate`` → ``Implements: ["GraphDriver"]``
- ``/GraphDriver.Init`` (``Home``, ``Opts``, ``UIDMaps``, ``GIDMaps``): open the store
- ``.Create``, ``.CreateReadWrite`` (``ID``, ``Parent``, ``MountLabel``, ``StorageOpt``)
- ``.Remove``, ``.Put``, ``.Exists`` → ``Exists``, ``.GetMetadata`` → ``Metadata``,
  ``.Get`` (also ``MountLabel``) → ``Dir``, each with an ``ID``
- ``.Status`` → ``Status`` pairs, ``.Cleanup``, ``.Capabilities`` → ``Capabilities``
- ``.Changes`` → ``Changes`` (``Path``, ``Kind``), ``.DiffSize`` → ``Size``, and
  ``.Diff`` → a tar stream, each with an ``ID`` and a ``Parent``
- ``.ApplyDiff?id=ID&parent=P`` with a tar stream as the body → ``Size``

A failed call is answered with ``{"Err": "<the LaminaError's message>"}``, which
Docker turns into the error it reports.  Two answers follow Docker's own drivers
rather than the library: ``Remove`` of a layer that does not exist succeeds
(overlay2 and vfs remove nothing and say nothing), and ``Exists`` of an id lamina
would refuse is false.

Where the store is.  Docker names the home in ``Init`` (``DATA_ROOT/NAME``); a
``--home`` given to ``lamina serve`` wins over it.  Docker calls ``Init`` only when
it starts, so ``serve`` records that call beside its socket (``NAME.sock.init.json``)
and a restarted ``serve`` opens the same store from it before it answers anything:
a ``serve`` restarted under a running ``dockerd`` carries on where the last one
stopped, with the mount counts the store keeps.

Limits (:class:`~lamina.frontends.docker.http.Limits`: timeouts, workers, connections)
have defaults that suit Docker; each can be set with an environment variable,
``LAMINA_SERVE_BODY_TIMEOUT=SECONDS`` and the like.

Shutdown (SIGTERM or SIGINT): stop accepting and remove the socket; calls that
arrive on connections still open are dropped unanswered (Docker's client calls
again, for 30 s, and so reaches the next ``serve``); calls in progress finish (for
up to :data:`GRACE` seconds); then the driver's ``cleanup()`` unmounts what this
``serve`` mounted and the driver is closed.  A running container keeps its root: it
holds its own copy of the mount, and Docker's next ``Get`` mounts it again.  A
``serve`` that is killed instead leaves what any killed lamina process leaves
(contract §4): the next one to open the store recovers it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast

import lamina
from lamina import errors
from lamina.driver import Driver, IdMap
from lamina.frontends.docker.http import PluginServer
from lamina.frontends.docker.wire import Limits
from lamina.host import fsutil
from lamina.host.signals import stop_signals

log = logging.getLogger("lamina.serve")

DEFAULT_SOCKET = Path("/run/docker/plugins/lamina.sock")
"""Where Docker looks for the plugin it knows as ``lamina``."""
STATE_SUFFIX = ".init.json"
"""Docker's ``Init`` is recorded in ``SOCKET`` + this, for a restart."""
GRACE = 60.0
"""How long a shutdown waits for calls in progress (an apply of a large layer)."""

JsonDoc = dict[str, Any]


# --- the calls -----------------------------------------------------------------------


def _text(req: Mapping[str, Any], key: str) -> str:
    """A string field of a request; absent or null is ``""`` (Go's ``omitempty``)."""
    value = req.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise errors.InvalidArgument(f"request field {key} must be a string, not {value!r}")
    return value


def _storage_opts(req: Mapping[str, Any]) -> dict[str, str] | None:
    value = req.get("StorageOpt")
    if not value:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise errors.InvalidArgument(f"request field StorageOpt must map strings, not {value!r}")
    return cast(dict[str, str], value)


def _id_map(value: Any, what: str) -> IdMap | None:
    """Docker's ``[]idtools.IDMap`` (``container_id``, ``host_id``, ``size``) as tuples."""
    if not value:
        return None
    if not isinstance(value, list):
        raise errors.InvalidArgument(f"{what} must be a list, not {value!r}")
    out = []
    for item in value:
        if not isinstance(item, dict):
            raise errors.InvalidArgument(f"bad {what} entry {item!r}")
        # Go encodes the fields with their json tags; its decoder ignores case.
        fields = {k.lower().replace("_", ""): v for k, v in item.items()}
        try:
            out.append((int(fields["containerid"]), int(fields["hostid"]), int(fields["size"])))
        except (KeyError, TypeError, ValueError):
            raise errors.InvalidArgument(f"bad {what} entry {item!r}") from None
    return out


class Plugin:
    """The graph driver calls, each from a decoded JSON request to a JSON answer.

    The driver is opened by ``Init`` (or, after a restart, from the recorded
    ``Init``) and shared by every call; ``home`` (``serve --home``) overrides the
    home Docker names, and ``options`` are driver options put before Docker's.
    """

    def __init__(
        self,
        *,
        home: Path | None = None,
        backend: str = "auto",
        options: Sequence[str] = (),
        state: Path | None = None,
    ) -> None:
        self.home = home
        self.backend = backend
        self.options = list(options)
        self.state = state
        self._driver: Driver | None = None
        self._opened_with: tuple[Any, ...] | None = None
        self._lock = threading.Lock()
        self.calls: dict[str, Callable[[JsonDoc], JsonDoc]] = {
            "Plugin.Activate": self.activate,
            "GraphDriver.Init": self.init,
            "GraphDriver.Create": self.create,
            "GraphDriver.CreateReadWrite": self.create_rw,
            "GraphDriver.Remove": self.remove,
            "GraphDriver.Get": self.get,
            "GraphDriver.Put": self.put,
            "GraphDriver.Exists": self.exists,
            "GraphDriver.Status": self.status,
            "GraphDriver.GetMetadata": self.metadata,
            "GraphDriver.Cleanup": self.cleanup,
            "GraphDriver.Capabilities": self.capabilities,
            "GraphDriver.Changes": self.changes,
            "GraphDriver.DiffSize": self.diff_size,
        }
        """The JSON-to-JSON calls; ``Diff`` and ``ApplyDiff`` stream and are apart."""

    @property
    def driver(self) -> Driver:
        """The open driver, or ``InvalidArgument`` before Docker's ``Init``."""
        drv = self._driver
        if drv is None:
            raise errors.InvalidArgument(
                "not initialized: Docker has not called GraphDriver.Init yet"
            )
        return drv

    # -- opening ----------------------------------------------------------------

    @property
    def opened(self) -> bool:
        """Whether a store is open (``Init`` was called, or resumed)."""
        return self._driver is not None

    def resume(self) -> None:
        """Open the store named by the recorded ``Init``, if there is one (a restart)."""
        if self.state is None:
            return
        try:
            req = json.loads(self.state.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", self.state, e)
            return
        if not isinstance(req, dict):
            log.warning("ignoring %s: not a JSON object", self.state)
            return
        try:
            self._open(req, record=False)
        except errors.LaminaError as e:
            log.warning("cannot reopen the store Docker named before: %s", e)

    def _open(self, req: JsonDoc, *, record: bool) -> None:
        named = _text(req, "Home")
        if self.home is None and not named:
            raise errors.InvalidArgument("GraphDriver.Init without a Home")
        home = self.home or Path(named)
        opts = req.get("Opts") or []
        if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
            raise errors.InvalidArgument(f"Init's Opts must be a list of strings, not {opts!r}")
        uid_map = _id_map(req.get("UIDMaps"), "UIDMaps")
        gid_map = _id_map(req.get("GIDMaps"), "GIDMaps")
        options = [*self.options, *opts]
        wanted = (str(home), self.backend, tuple(options), repr(uid_map), repr(gid_map))
        with self._lock:
            if self._driver is not None and self._opened_with == wanted:
                return  # Docker restarted: carry on with the same driver and its counts
            drv = lamina.open_driver(home, backend=self.backend, options=options,
                                     uid_map=uid_map, gid_map=gid_map)
            old, self._driver, self._opened_with = self._driver, drv, wanted
            if record and self.state is not None:
                doc = {k: req.get(k) for k in ("Home", "Opts", "UIDMaps", "GIDMaps")}
                fsutil.atomic_write(self.state, json.dumps(doc).encode() + b"\n", mode=0o600)
        if old is not None:
            _release(old)
        log.info("store %s (backend %s)", drv.home, drv.name)

    def close(self) -> None:
        """Give back what this process mounted and close the driver."""
        with self._lock:
            drv, self._driver = self._driver, None
        if drv is not None:
            _release(drv)

    # -- the JSON calls ------------------------------------------------------------

    def activate(self, req: JsonDoc) -> JsonDoc:
        """``/Plugin.Activate``: this plugin is a graph driver."""
        return {"Implements": ["GraphDriver"]}

    def init(self, req: JsonDoc) -> JsonDoc:
        """``Init``: open the store (Docker's ``Home`` unless ``--home`` was given)."""
        self._open(req, record=True)
        return {}

    def create(self, req: JsonDoc) -> JsonDoc:
        """``Create``: a read-only layer (an image layer, filled by ``ApplyDiff``)."""
        self.driver.create(_text(req, "ID"), _text(req, "Parent") or None,
                           storage_opts=_storage_opts(req))
        return {}

    def create_rw(self, req: JsonDoc) -> JsonDoc:
        """``CreateReadWrite``: a container's layer, or its ``<id>-init`` layer."""
        self.driver.create_rw(_text(req, "ID"), _text(req, "Parent") or None,
                              mount_label=_text(req, "MountLabel"),
                              storage_opts=_storage_opts(req))
        return {}

    def remove(self, req: JsonDoc) -> JsonDoc:
        """``Remove``; a layer that is not there is removed already, as Docker's drivers say."""
        with contextlib.suppress(errors.NotFound):
            self.driver.remove(_text(req, "ID"))
        return {}

    def get(self, req: JsonDoc) -> JsonDoc:
        """``Get``: mount the layer's union view (counted) and say where."""
        return {"Dir": str(self.driver.get(_text(req, "ID"), _text(req, "MountLabel")))}

    def put(self, req: JsonDoc) -> JsonDoc:
        """``Put``: give one ``Get`` back."""
        self.driver.put(_text(req, "ID"))
        return {}

    def exists(self, req: JsonDoc) -> JsonDoc:
        """``Exists``; an id lamina would refuse names no layer."""
        try:
            return {"Exists": self.driver.exists(_text(req, "ID"))}
        except errors.InvalidArgument:
            return {"Exists": False}

    def status(self, req: JsonDoc) -> JsonDoc:
        """``Status``: what ``docker info`` shows under the storage driver."""
        drv = self.driver
        return {"Status": [["Backend", drv.name], *[[k, v] for k, v in drv.status()]]}

    def metadata(self, req: JsonDoc) -> JsonDoc:
        """``GetMetadata``: what ``docker inspect`` shows as ``GraphDriver.Data``."""
        return {"Metadata": self.driver.metadata(_text(req, "ID"))}

    def cleanup(self, req: JsonDoc) -> JsonDoc:
        """``Cleanup`` (Docker shuts down): unmount what Docker's ``Get`` mounted."""
        if self._driver is not None:
            self._driver.cleanup()
        return {}

    def capabilities(self, req: JsonDoc) -> JsonDoc:
        """``Capabilities``: lamina's diff is not byte-identical to the tar applied, so
        Docker keeps its tar-split records and re-creates the original tars from them."""
        return {"Capabilities": {"ReproducesExactDiffs": False}}

    def changes(self, req: JsonDoc) -> JsonDoc:
        """``Changes``: what ``docker diff`` prints, as Docker's ``archive.Change``."""
        found = self.driver.changes(_text(req, "ID"), _text(req, "Parent") or None)
        return {"Changes": [{"Path": c.path, "Kind": int(c.kind)} for c in found]}

    def diff_size(self, req: JsonDoc) -> JsonDoc:
        """``DiffSize``: bytes of the layer's changes."""
        return {"Size": self.driver.diff_size(_text(req, "ID"), _text(req, "Parent") or None)}

    # -- the streaming calls --------------------------------------------------------

    def diff(self, req: JsonDoc) -> BinaryIO:
        """``Diff``: the layer's changes as a tar stream (the caller closes it)."""
        return self.driver.diff(_text(req, "ID"), _text(req, "Parent") or None)

    def apply_diff(self, id: str, parent: str, stream: BinaryIO) -> JsonDoc:
        """``ApplyDiff``: the request body into layer ``id`` (made on ``parent`` if missing)."""
        return {"Size": self.driver.apply_diff(id, parent or None, stream)}


def _release(drv: Driver) -> None:
    try:
        drv.cleanup()
    except (errors.LaminaError, OSError) as e:
        log.warning("cleanup of %s: %s", drv.home, e)
    drv.close()


def state_path(socket_path: Path) -> Path:
    """Where ``serve`` records Docker's ``Init`` for a restart (beside the socket)."""
    return socket_path.with_name(socket_path.name + STATE_SUFFIX)


def _raise_fd_limit() -> None:
    """Let the soft limit on open files go up to the hard one (connections are files)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def serve(
    socket_path: Path = DEFAULT_SOCKET,
    *,
    home: Path | None = None,
    backend: str = "auto",
    options: Sequence[str] = (),
    verbose: bool = False,
) -> int:
    """Answer Docker on ``socket_path`` until SIGTERM or SIGINT; return the exit status."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="lamina serve: %(levelname)s: %(message)s")
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    socket_path = socket_path.absolute()
    limits = Limits.from_env()
    _raise_fd_limit()
    plugin = Plugin(home=home, backend=backend, options=options, state=state_path(socket_path))
    with stop_signals() as wait_for_stop:
        # The socket first (Busy if another serve has it), then the store, then calls.
        server = PluginServer(socket_path, plugin, limits)
        try:
            plugin.resume()
            if home is not None and not plugin.opened:
                plugin.init({"Home": str(home)})  # fail now rather than at Docker's first call
            server.start()
            log.info("listening on %s", socket_path)
            wait_for_stop()
            log.info("stopping")
        finally:
            if not server.stop(GRACE):
                log.warning("calls still running after %.0f s; cleaning up anyway", GRACE)
            plugin.close()
    log.info("stopped")
    return 0
