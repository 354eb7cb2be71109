"""Starting and stopping the appliance's processes outside systemd.

On the appliance systemd runs everything. Development mode (`pacs run`), the integration tests and
the benchmarks need the same processes started for real from the same configuration; this module
is that one place. A child's output goes line by line to its log file and, optionally, to the
console with a prefix, so a developer reads one interleaved log and a test can show the tail.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import psutil

from . import orphans, orthanc_conf
from .config import ConfigError, Settings
from .orthanc import Orthanc
from .web import nginx
from .web.tls import TLSError

# Debian installs Orthanc and nginx in /usr/sbin, which is not on an ordinary user's PATH.
SBIN_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


class StartError(Exception):
    """A process did not come up; the message says why in one line, the log has the rest."""


def port_in_use(port: int, host: str = "0.0.0.0") -> bool:
    """True when something already listens on the port (a bind attempt, not a guess)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def port_owner(port: int) -> str | None:
    """Name and pid of the process listening on a port, when the system lets us see it."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port \
                    and conn.pid:
                return f"{psutil.Process(conn.pid).name()} (pid {conn.pid})"
    except (psutil.Error, OSError):
        pass
    return None


def check_ports_free(ports: dict[str, int], env_file: str = "the env file") -> None:
    """Fail with one clear line naming the setting whose port is taken, and by whom."""
    for key, port in ports.items():
        if port_in_use(port):
            owner = port_owner(port)
            by = f"by {owner}" if owner else "by another program"
            hint = (" (the Debian orthanc service? `systemctl disable --now orthanc`)"
                    if owner and owner.startswith("Orthanc") else "")
            raise ConfigError(f"port {port} ({key}) is already in use {by}{hint}: stop it "
                              f"or set another {key} in {env_file}")


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: nothing may load after fork


def _child_setup(parent: int) -> Callable[[], None]:
    """What a child does between fork and exec.

    It gets SIGTERM when its parent dies, even by kill -9: a crashed `pacs run` must not leave an
    orphan Orthanc holding the DICOM port, and SIGTERM lets Orthanc close its index cleanly.
    (Linux ties this to the thread that forked: children are started from the main thread.)
    Files it creates are private: they hold patient data.
    """

    def setup() -> None:
        os.umask(0o077)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


class Child:
    """A child process writing straight into its own log file (echoed to a console by `pump`).

    The child's stdout and stderr are the log file itself (O_APPEND), never a pipe through us: if
    this process dies, the child can still log (no SIGPIPE) and shut down cleanly.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path,
                 echo: TextIO | None = None, env: dict[str, str] | None = None,
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.name = name
        self.pass_fds = pass_fds
        self.argv = argv
        self.log_path = log_path
        self.echo = echo
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0
        self._echoed = 0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with open(descriptor, "ab") as log:
            self._log_start = self._echoed = log.seek(0, os.SEEK_END)
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # Ctrl-C reaches us, not the child: we stop it
                pass_fds=self.pass_fds, preexec_fn=_child_setup(os.getpid()))

    def pump(self) -> None:
        """Copy the child's new complete log lines to the console, if there is one.

        Called from the supervisor's own loop, not from a thread: with one thread, a kill -9 of
        the supervisor sends each child exactly one death signal (Linux sends it again for every
        thread the child is handed to), and Orthanc takes a second SIGTERM as "die now".
        """
        if not self.echo:
            return
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._echoed)
                data = log.read()
        except OSError:
            return
        complete = data[:data.rfind(b"\n") + 1]
        self._echoed += len(complete)
        try:
            for line in complete.decode("utf-8", errors="replace").splitlines():
                self.echo.write(f"[{self.name}] {line}\n")
            self.echo.flush()
        except (OSError, ValueError):
            self.echo = None  # the console went away; the log file has everything

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait for a clean exit, SIGKILL only if it will not stop."""
        if not self.process:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.pump()
        return self.process.returncode

    def last_lines(self, count: int = 15) -> str:
        """The end of what this run of the child logged."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_start)
                lines = log.read().decode("utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-count:])


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def wait_listening(child: Child, port: int, timeout: float) -> bool:
    """Whether the child, still running, accepts connections on 127.0.0.1:port in time."""

    def listening() -> bool:
        child.pump()
        if not child.running():
            return True
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    return wait_until(listening, timeout) and child.running()


def orthanc_binary() -> str:
    found = shutil.which("Orthanc", path=SBIN_SEARCH_PATH)
    if not found:
        raise StartError("Orthanc is not installed (no Orthanc program on PATH or in /usr/sbin): "
                         "run `make deps` or `apt-get install orthanc`")
    return found


def orthanc_argv(config_file: Path) -> list[str]:
    # --verbose-dicom logs every association with its calling AE title and address.
    return [orthanc_binary(), "--verbose-dicom", str(config_file)]


class StartCancelled(Exception):
    """Asked to stop while still starting (Ctrl-C during start-up)."""


class OrthancChild(Child):
    """Orthanc, which leaves a clean-stop marker when it exits by itself after SIGTERM."""

    def __init__(self, settings: Settings, config_file: Path, lock: int,
                 echo: TextIO | None) -> None:
        super().__init__("orthanc", orthanc_argv(config_file),
                         settings.log_dir / "orthanc.log", echo=echo, pass_fds=(lock,))
        self.settings = settings

    def stop(self, timeout: float = 30.0) -> int | None:
        code = super().stop(timeout)
        if code == 0:
            orphans.mark_clean_stop(self.settings)
        return code


def prepare_start(settings: Settings) -> tuple[int, Path, int]:
    """Before Orthanc starts, under `pacs run` or systemd alike: its folders, the storage lock
    (a descriptor the caller hands to Orthanc), its JSON rendered from the settings, and what a
    power cut hid set aside (SQLite only: a PostgreSQL commit is durable). Returns the lock,
    the configuration file and how many files were set aside."""
    if settings.orthanc_index == "postgresql":
        check_postgresql_plugin()
    try:
        orthanc_conf.prepare_directories(settings)
        lock = orphans.lock_storage(settings)
    except (OSError, orphans.IndexBusy) as exc:
        raise StartError(str(exc)) from exc
    try:
        config_file = orthanc_conf.write(settings)
        set_aside = 0 if settings.orthanc_index == "postgresql" else orphans.collect(settings)
    except OSError as exc:
        os.close(lock)
        raise StartError(str(exc)) from exc
    return lock, config_file, set_aside


def start_orthanc(settings: Settings, echo: TextIO | None = None, timeout: float = 60.0,
                  cancelled: Callable[[], bool] = lambda: False) -> Child:
    """Lock the storage, recover what a power cut hid, start real Orthanc, wait until it answers.

    The storage lock is handed to Orthanc and lives as long as it does. With its index in
    PostgreSQL, Orthanc either runs on that database or `pacs` says why it could not: it never
    comes up on a SQLite index instead.
    """
    postgresql = settings.orthanc_index == "postgresql"
    lock, config_file, _ = prepare_start(settings)
    try:
        child = OrthancChild(settings, config_file, lock, echo)
        child.start()
    except OSError as exc:
        raise StartError(str(exc)) from exc
    finally:
        os.close(lock)
    try:
        client = Orthanc.from_settings(settings, timeout=2.0)

        def up_or_done() -> bool:
            child.pump()
            return cancelled() or not child.running() or client.is_alive()

        if not wait_until(up_or_done, timeout):
            raise StartError(f"Orthanc did not answer on port {settings.http_port} within "
                             f"{timeout:.0f}s; last log lines:\n{child.last_lines()}")
        if cancelled():
            raise StartCancelled()
        if not child.running():
            reason = postgresql_failure(settings, child.last_lines(200)) if postgresql else None
            if reason:
                raise StartError(f"{reason} (log: {child.log_path})")
            raise StartError(f"Orthanc exited at start-up (code {child.process.returncode}); "
                             f"last log lines:\n{child.last_lines()}")
        if postgresql:
            backend = Orthanc.from_settings(settings, timeout=30).system().get(
                "DatabaseBackendPlugin")
            if not backend:
                raise StartError("Orthanc started without its PostgreSQL index "
                                 f"(ORTHANC_INDEX=postgresql): stopped it; see {child.log_path}")
        orphans.readopt(settings, Orthanc.from_settings(settings, timeout=120))
    except BaseException:
        child.stop()
        raise
    return child


def check_postgresql_plugin() -> None:
    """Orthanc skips a plugin file that is missing and starts on SQLite: refuse before that."""
    plugin = orthanc_conf.PLUGINS_DIR / orthanc_conf.POSTGRESQL_INDEX_PLUGIN
    if not plugin.exists():
        raise StartError(f"ORTHANC_INDEX=postgresql needs Orthanc's PostgreSQL plugin ({plugin} "
                         "is missing): run `make deps` or `apt-get install orthanc-postgresql`")


def postgresql_failure(settings: Settings, log: str) -> str | None:
    """One line saying why Orthanc gave up on its PostgreSQL index, from what it logged."""
    place = orthanc_conf.postgresql_place(settings)
    if "locked by another instance" in log:
        return (f"the PostgreSQL index ({place}) is in use by another Orthanc: one Orthanc per "
                "index database")
    errors = [" ".join(line.split("PostgreSQL error:", 1)[1].split())
              for line in log.splitlines() if "PostgreSQL error:" in line]
    if errors or "connecting to the database" in log:
        detail = f": {errors[-1]}" if errors else ""
        return (f"Orthanc could not open its index in PostgreSQL ({place}){detail}; check "
                "that PostgreSQL runs and POSTGRESQL_HOST, POSTGRESQL_PORT, POSTGRESQL_DATABASE, "
                "POSTGRESQL_USER and POSTGRESQL_PASSWORD")
    return None


def nginx_argv(settings: Settings, config_file: Path, *extra: str) -> list[str]:
    found = shutil.which("nginx", path=SBIN_SEARCH_PATH)
    if not found:
        raise StartError("nginx is not installed (no nginx program on PATH or in /usr/sbin): "
                         "run `make deps` or `apt-get install nginx`")
    # -e: nginx logs there even before it has read the configuration.
    return [found, "-c", str(config_file), "-e", str(nginx.error_log(settings)), *extra]


def check_proxy_config(settings: Settings, config_file: Path) -> None:
    """nginx's own test of the rendered configuration; its words on failure."""
    result = subprocess.run(nginx_argv(settings, config_file, "-t", "-q"), capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise StartError("nginx refuses its configuration: "
                         + " ".join((result.stderr or result.stdout).split()))


def prepare_proxy(settings: Settings, appliance: bool = False, hq: bool = False,
                  report: Callable[[Path, nginx.Outcome], None] | None = None) -> list[str]:
    """The site's TLS material made or renewed and nginx's configuration rendered (`report`
    hears of both), then tested by nginx itself: the argv that runs nginx in the foreground."""
    try:
        config_file, outcome = nginx.prepare(settings, appliance, hq)
    except (TLSError, OSError, ValueError, LookupError) as exc:
        raise StartError(f"cannot prepare the HTTPS origin: {exc}") from exc
    if report:
        report(config_file, outcome)
    check_proxy_config(settings, config_file)
    return nginx_argv(settings, config_file, "-g", "daemon off;")


def start_proxy(settings: Settings, echo: TextIO | None = None, timeout: float = 30.0,
                hq: bool = False) -> Child:
    """The HTTPS origin (HQ's with `hq`) started in the foreground, and waited for until
    HTTPS_PORT accepts connections."""
    def report(_config: Path, outcome: nginx.Outcome) -> None:
        if echo and outcome.ca_created:
            echo.write(f"[proxy] created this site's certificate authority; fingerprint "
                       f"(SHA-256) {outcome.ca_fingerprint}\n")

    argv = prepare_proxy(settings, hq=hq, report=report)
    child = Child("proxy", argv,
                  settings.log_dir / "proxy.log", echo=echo)
    try:
        child.start()
    except OSError as exc:
        raise StartError(str(exc)) from exc

    if not wait_listening(child, settings.https_port, timeout):
        child.stop()
        raise StartError(f"nginx did not come up on port {settings.https_port}; see "
                         f"{nginx.error_log(settings)}:\n{child.last_lines()}")
    return child
