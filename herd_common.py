"""herd_common.py: what the Herd router (herd.py) and node agent (herd_node.py) share.

Nothing here runs at import: no environment reads, no logging set-up, no event loop,
no database; only a Python older than 3.11, or a missing h11, is refused in one line
(both programs import this module first, so that the refusal comes before anything else
can fail). It holds, in the order data flows:

    config table and loader   per role, a table of settings (name, default, help, group)
                              and one of fixed values; --help prints the settings
    logging                   JSONL file lines with fixed keys, a readable console form
    JSON and error bodies     strict JSON, its shape gauged on the bytes before it is
                              parsed; Ollama's {"error": ...} and OpenAI's {"error": {...}}
    HTTP server on h11        an asyncio protocol per client connection: keep-alive,
                              pipelining, 100-continue, limits, hang-up detection,
                              heads refused before their bodies, bodies streamed to
                              their handler (blob uploads) or spooled, TLS
    HTTP client on h11        an asyncio protocol per node connection: connect /
                              first-byte / chunk timeouts, a pool; the Relay that
                              passes a node's answer to a client chunk by chunk
    model names               Ollama's name:tag canonical form
    scoring                   elimination and the nine signals, as pure functions
    metrics                   counters and histograms in the Prometheus text format
    trace store               the trace contract (statuses, columns) and SQLite
                              request_traces: batched writes on one thread, and every
                              query the router makes; the learned_speed table
    node snapshot             hardware, memory, CPU and Ollama state
    heartbeats                the agent-router contract: node id rule, build, check
                              every field (Fields), typed reading, signing (HMAC)
    settings                  each program's table: the router's FLEET_*, the agent's
                              FLEET_NODE_*
(The service installer, --install-service, comes early: it runs instead of a program.)
"""

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import difflib
import hashlib
import hmac
import http
import ipaddress
import itertools
import json
import logging
import logging.handlers
import math
import os
import platform
import re
import signal
import socket
import sqlite3
import statistics
import sys
import shutil
import tempfile
import textwrap
import threading
import time
import urllib.parse
from dataclasses import dataclass

# Both programs run on asyncio.timeout and TaskGroup, new in 3.11: on an older Python the
# router would start, then answer every request with a 500. They import this module
# first, so this line is what the user sees; for that, it and both scripts must still
# parse on older Pythons (Python compiles a whole file before it runs any of it), down
# to 3.8: test_herd checks it.
MIN_PYTHON = (3, 11)


def python_refusal(version_info, executable):
    """The one line that refuses a Python older than MIN_PYTHON, or None."""
    if tuple(version_info[:2]) >= MIN_PYTHON:
        return None
    return (f"Herd needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer; this is "
            f"{'.'.join(str(n) for n in version_info[:3])} ({executable or 'python'})")


if python_refusal(sys.version_info, sys.executable):  # pragma: no cover - old Pythons
    sys.exit(python_refusal(sys.version_info, sys.executable))

try:
    import h11
except ImportError:  # pragma: no cover - a friendly line instead of a traceback
    sys.exit("Herd needs h11, psutil and zeroconf: pip install h11 psutil zeroconf")

VERSION = "0.1.0"
SERVER_HEADER = b"herd/" + VERSION.encode()
MDNS_SERVICE_TYPE = "_fleet-manager._tcp.local."
DEFAULT_ROUTER_PORT = 11435
OLLAMA_PORT = 11434  # Ollama's default listen address is 127.0.0.1:11434 (OLLAMA_HOST)
# Said wherever one program is found where the other should be: the usual mix-up.
PORTS_HINT = (f"Ollama listens on port {OLLAMA_PORT}, the Herd router on "
              f"{DEFAULT_ROUTER_PORT}")

####################################################################################
# Config
####################################################################################


@dataclass(frozen=True)
class Setting:
    """One FLEET_* variable: a user setting has the --help and README group it is listed
    under; a fixed value (group "") is a developer's tunable, never read from the
    environment, kept in this table form so that tests can still set it."""
    name: str
    default: object
    help: str
    group: str = ""


class ConfigError(ValueError):
    """A setting whose value cannot be used; the message is one line for the user."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(setting, raw):
    kind = type(setting.default)
    text = raw.strip()
    try:
        if kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except ValueError:
        raise ConfigError(f"{setting.name}={raw!r} is not a valid {kind.__name__} "
                          f"(default {setting.default!r}): {setting.help}") from None
    return raw


class Config:
    """Frozen settings; FLEET_HOLD_TIMEOUT is read as cfg.hold_timeout."""

    def __init__(self, values, sources):
        self.__dict__.update(values)  # plain attributes: read on every request
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "sources", dict(sources))

    def __setattr__(self, attr, value):
        raise AttributeError("Config is read-only")

    def as_dict(self):
        return dict(self._values)


def _attr_name(name, prefix):
    for p in (prefix, "FLEET_"):
        if name.startswith(p):
            return name[len(p):].lower()
    return name.lower()


def load_config(table, environ, prefix, overrides=None, fixed=(), tuned=None):
    """Read each setting once from environ, flags in overrides win; the fixed values
    (`fixed`) take their defaults, or what a test gives in `tuned` (by name), never the
    environment's. Raises ConfigError."""
    values, sources = {}, {}
    overrides, tuned = overrides or {}, tuned or {}
    for setting in table:
        attr = _attr_name(setting.name, prefix)
        if overrides.get(attr) is not None:
            values[attr], sources[attr] = _coerce(setting, str(overrides[attr])), "flag"
        elif setting.name in environ:
            values[attr], sources[attr] = _coerce(setting, environ[setting.name]), "env"
        else:
            values[attr], sources[attr] = setting.default, "default"
    for setting in fixed:
        attr = _attr_name(setting.name, prefix)
        if setting.name in tuned:
            values[attr] = _coerce(setting, str(tuned[setting.name]))
        else:
            values[attr] = setting.default
        sources[attr] = "fixed"
    for setting in (*table, *fixed):
        value = values[_attr_name(setting.name, prefix)]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{setting.name} must not be negative: {value}")
    return Config(values, sources)


def shown_default(setting):
    """A default as it would be written in the environment: true, not True."""
    if isinstance(setting.default, bool):
        return "true" if setting.default else "false"
    return setting.default if setting.default != "" else '""'


def format_settings_help(table, width=None):
    """The user settings as --help prints them: under their groups, each name with its
    default, then its help indented, every line wrapped to the terminal's width."""
    width = max(40, width or shutil.get_terminal_size().columns) - 1
    lines = ["settings (environment variables):"]
    for group in dict.fromkeys(s.group for s in table):
        lines += ["", f"{group}:"]
        for s in (s for s in table if s.group == group):
            shown = "" if "(default:" in s.help else f" (default: {shown_default(s)})"
            lines += textwrap.wrap(f"{s.name}{shown}", width, initial_indent="  ",
                                   subsequent_indent="      ")
            lines += textwrap.wrap(s.help, width, initial_indent="      ",
                                   subsequent_indent="      ")
    return "\n".join(lines)


def in_group(group, settings):
    """`settings` as listed under `group` in --help and the README."""
    return [dataclasses.replace(s, group=group) for s in settings]


DATA_DIR = "~/.fleet-manager"  # both programs' default data folder (the product's own)

LOG_SETTINGS = [
    Setting("FLEET_LOG_LEVEL", "DEBUG", "level written to the JSONL log file"),
    Setting("FLEET_CONSOLE_LOG_LEVEL", "INFO", "level printed on the terminal"),
]


def check_log_level(name, value):
    """Raise ConfigError unless value is a logging level name."""
    if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"{name}={value!r} is not a log level (DEBUG, INFO, WARNING, ERROR)")
    return value.upper()


def expand_dir(path):
    return os.path.abspath(os.path.expanduser(path))


def run_program(prog, environ, args, load, log_file, run):
    """A program's main(): settings (one clear line if bad), logs (first a warning for
    each FLEET_* variable it ignores by mistake: cfg.misnamed), then run(cfg)."""
    try:
        cfg = load(environ, args)
    except (ConfigError, OSError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    # A data folder that cannot be made or written still runs the program: the logs,
    # the traces and what is learned then say so and make do (setup_logging, TraceStore).
    with contextlib.suppress(OSError):
        os.makedirs(cfg.data_dir, exist_ok=True)
    setup_logging(cfg.data_dir, log_file, cfg.log_level, cfg.console_log_level)
    for line in cfg.misnamed:  # said once, before anything else is
        logging.getLogger("herd.settings").warning(line, extra={"event": "misnamed_setting"})
    release_freed_memory()
    return_large_blocks()
    return asyncio.run(run(cfg))


def release_freed_memory():
    """Give the heap the compiler freed back to the OS (glibc only).

    Python compiles the script it runs from source each time (no .pyc for __main__);
    for the router that leaves about 4 MB of freed but resident heap. malloc_trim
    returns it. Elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (musl, for one): nothing to trim


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters


def return_large_blocks():
    """From now on, give large blocks back to the OS when they are freed (glibc only).

    glibc raises its mmap threshold to the largest block freed (up to 32 MB) and keeps
    twice that free at the top of its heap: after a 60 MB request body the router
    stayed 5 to 50 MB larger, as it happened. Fixed thresholds give it back: a block
    of a megabyte or more is mapped, and unmapped when freed; at most 2 MiB is kept
    free at the heap's top. Elsewhere this does nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 2 << 20)
    except (OSError, AttributeError):
        pass  # not glibc


async def repeat(step, interval, log, what):
    """Run `step()` every `interval` seconds (counted from each start) until cancelled.
    A step that fails is logged with its traceback, and the next one runs on time: a
    background duty must not die of one bad reading."""
    while True:
        started = time.monotonic()
        try:
            result = step()
            if asyncio.iscoroutine(result):
                await result
        except Exception:
            log.exception(f"{what} failed; trying again in {interval:g}s")
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


class TaskSet:
    """The named tasks a program owns: one that fails is logged with its traceback, and
    stop() cancels every one and waits for it."""

    def __init__(self, log):
        self.log = log
        self.tasks = set()

    def spawn(self, coro, name):
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task):
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error(f"task {task.get_name()} failed", exc_info=task.exception())

    async def stop(self, reason):
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel(msg=reason)
        await asyncio.gather(*tasks, return_exceptions=True)


def stop_signal():
    """An event set by SIGTERM or SIGINT (call inside the running loop). Windows' loops
    have no add_signal_handler: there Ctrl-C (SIGINT) and Ctrl-Break (SIGBREAK, also what
    a console's close sends) are caught with signal.signal, whose handler runs in the
    main thread between bytecodes and hands the stop to the loop. (Task Scheduler's
    "End" kills the process outright: nothing can be caught then.)"""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    except NotImplementedError:
        def caught(signum, frame):
            loop.call_soon_threadsafe(stop.set)
        for sig in (signal.SIGINT, getattr(signal, "SIGBREAK", None), signal.SIGTERM):
            if sig is not None:
                signal.signal(sig, caught)
    return stop


####################################################################################
# Running at boot: --install-service, --uninstall-service, --service-status
#
# Each program installs itself as the machine's own service manager runs programs: a
# systemd unit on Linux (system-wide as root, the user's own otherwise), a LaunchAgent
# on macOS, a Task Scheduler task on Windows. It is started as it was installed: this
# interpreter (a venv's, if that is what ran it), this script, from this folder (which
# holds dashboard.html), with the FLEET_* settings given now. Those go into a file only
# the service's user can read, since some are secrets; the unit itself is world-readable.
####################################################################################

SERVICES = {  # program -> (service name, launchd label, description)
    "herd": ("herd", "com.herd.router", "Herd router: one endpoint for the fleet"),
    "herd_node": ("herd-node", "com.herd.node", "Herd node agent"),
}
STOP_MARGIN_S = 15  # past a program's own stop time (its drain or grace) for systemd


class ServiceError(Exception):
    """Installing or removing the service cannot be done here, and why."""


class Service:
    """One program's service on this machine. Everything it touches is a seam a test
    sets: the platform, the root of the file system, the home folder, the user, and the
    runner of the service manager's commands."""

    def __init__(self, prog, script, settings, *, stop_s, platform=sys.platform, root="/",
                 home=None, euid=None, user=None, run=None, python=sys.executable):
        self.name, self.label, self.description = SERVICES[prog]
        self.prog, self.script = prog, os.path.abspath(script)
        self.settings = dict(settings)  # NAME -> value, written for the service
        self.stop_s = stop_s
        self.platform, self.root = platform, root
        self.home = home or os.path.expanduser("~")
        self.euid = os.geteuid() if euid is None and hasattr(os, "geteuid") else euid
        self.user = user or os.environ.get("SUDO_USER") or _login_name()
        self.run = run or _run_command
        self.python = python

    # -- where -------------------------------------------------------------------------

    @property
    def system_wide(self):
        return self.platform.startswith("linux") and self.euid == 0

    def _path(self, *parts):
        return os.path.join(self.root, *(p.lstrip("/") for p in parts))

    def files(self):
        """(the service's own file, the settings file) for this machine."""
        if self.platform.startswith("linux"):
            if self.system_wide:
                return (self._path("/etc/systemd/system", f"{self.name}.service"),
                        self._path("/etc/herd", f"{self.name}.env"))
            return (os.path.join(self.home, ".config/systemd/user", f"{self.name}.service"),
                    os.path.join(self.home, ".config/herd", f"{self.name}.env"))
        if self.platform == "darwin":  # the settings live in the plist, made 0600
            plist = os.path.join(self.home, "Library/LaunchAgents", f"{self.label}.plist")
            return plist, plist
        if self.platform == "win32":
            folder = os.path.join(os.environ.get("LOCALAPPDATA") or self.home, "herd")
            return None, os.path.join(folder, f"{self.name}.cmd")
        raise ServiceError(f"no service manager Herd knows on {self.platform}: start "
                           f"{os.path.basename(self.script)} from your own start-up script")

    # -- what ----------------------------------------------------------------------------

    def unit(self):
        """The systemd unit: after the network and Ollama's own service (Ollama's
        installer names it ollama.service), restarted if it fails, and given longer to
        stop than the program takes to drain."""
        _, env_file = self.files()
        lines = ["[Unit]", f"Description={self.description}",
                 "After=network-online.target ollama.service",
                 "Wants=network-online.target", "", "[Service]", "Type=simple",
                 f"WorkingDirectory={_systemd_quote(os.path.dirname(self.script))}",
                 f"ExecStart={_systemd_quote(self.python)} {_systemd_quote(self.script)}",
                 f"EnvironmentFile={_systemd_quote(env_file)}",
                 "Restart=on-failure", "RestartSec=5",
                 f"TimeoutStopSec={int(self.stop_s + STOP_MARGIN_S)}"]
        if self.system_wide:
            lines.append(f"User={self.user}")
        lines += ["", "[Install]",
                  f"WantedBy={'multi-user.target' if self.system_wide else 'default.target'}"]
        return "\n".join(lines) + "\n"

    def env_file(self):
        """The settings as systemd's EnvironmentFile reads them."""
        return "".join(f'{name}="{_env_escape(value)}"\n'
                       for name, value in sorted(self.settings.items()))

    def launchd_log(self):
        """Where launchd writes the program's console: its own logs folder."""
        folder = self.settings.get("FLEET_DATA_DIR" if self.prog == "herd" else
                                   "FLEET_NODE_DATA_DIR", DATA_DIR)
        return os.path.join(expand_dir(folder), "logs", f"{self.name}.launchd.log")

    def plist(self):
        import plistlib
        logs = self.launchd_log()
        return plistlib.dumps({
            "Label": self.label, "ProgramArguments": [self.python, self.script],
            "WorkingDirectory": os.path.dirname(self.script),
            "EnvironmentVariables": dict(self.settings), "RunAtLoad": True,
            "KeepAlive": {"SuccessfulExit": False}, "ExitTimeOut": int(self.stop_s +
                                                                       STOP_MARGIN_S),
            "StandardOutPath": logs, "StandardErrorPath": logs})

    def windows_script(self):
        """The task's .cmd: the settings, then the program, from its folder."""
        import ntpath  # Windows' own path rules, whichever machine writes the file
        lines = ["@echo off", f'cd /d "{ntpath.dirname(self.script)}"']
        lines += [f'set "{name}={_cmd_escape(value)}"'
                  for name, value in sorted(self.settings.items())]
        lines.append(f'"{self.python}" "{self.script}"')
        return "\r\n".join(lines) + "\r\n"

    def windows_command(self):
        _, script = self.files()
        return ["schtasks", "/Create", "/TN", f"Herd\\{self.name}", "/TR", f'"{script}"',
                "/SC", "ONLOGON", "/RL", "LIMITED", "/F"]

    # -- doing it --------------------------------------------------------------------

    def install(self):
        """Write and start the service; returns what was done, a line each."""
        own, settings_file = self.files()
        if self.platform.startswith("linux"):
            self._need_systemd()
            _write_private(settings_file, self.env_file())
            _write(own, self.unit(), 0o644)
            if self.system_wide:
                self._give_to_user(settings_file)
            said = [f"wrote {own}", f"wrote {settings_file} (mode 600: it may hold secrets)"]
            said += self._systemctl("daemon-reload") + self._systemctl(
                "enable", "--now", self.name)
            if not self.system_wide:
                said.append(f"a user's services stop when they log out unless lingering "
                            f"is on: loginctl enable-linger {self.user}")
            return said
        if self.platform == "darwin":
            # launchd opens the log before the program runs: its folder must be there
            os.makedirs(os.path.dirname(self.launchd_log()), exist_ok=True)
            _write_private(own, self.plist())
            uid = self.euid if self.euid is not None else os.getuid()
            return [f"wrote {own} (mode 600: it may hold secrets)"] + self._do(
                ["launchctl", "bootstrap", f"gui/{uid}", own])
        _write_private(settings_file, self.windows_script())
        return [f"wrote {settings_file}"] + self._do(self.windows_command())

    def uninstall(self):
        own, settings_file = self.files()
        said = []
        if self.platform.startswith("linux"):
            self._need_systemd()
            said += self._systemctl("disable", "--now", self.name)
        elif self.platform == "darwin":
            uid = self.euid if self.euid is not None else os.getuid()
            said += self._do(["launchctl", "bootout", f"gui/{uid}/{self.label}"], check=False)
        else:
            said += self._do(["schtasks", "/Delete", "/TN", f"Herd\\{self.name}", "/F"],
                             check=False)
        for path in dict.fromkeys(p for p in (own, settings_file) if p):
            if os.path.exists(path):
                os.remove(path)
                said.append(f"removed {path}")
        if self.platform.startswith("linux"):
            said += self._systemctl("daemon-reload")
        return said

    def status(self):
        """What is installed, and what the service manager says of it."""
        own, settings_file = self.files()
        said = [f"{path}: {'present' if os.path.exists(path) else 'not installed'}"
                for path in dict.fromkeys(p for p in (own, settings_file) if p)]
        if self.platform.startswith("linux"):
            scope = [] if self.system_wide else ["--user"]
            for verb in ("is-enabled", "is-active"):
                code, out = self.run(["systemctl", *scope, verb, self.name])
                said.append(f"systemctl {' '.join(scope + [verb])}: {out.strip() or code}")
        elif self.platform == "darwin":
            uid = self.euid if self.euid is not None else os.getuid()
            code, _ = self.run(["launchctl", "print", f"gui/{uid}/{self.label}"])
            said.append(f"launchd: {'loaded' if code == 0 else 'not loaded'}")
        else:
            code, out = self.run(["schtasks", "/Query", "/TN", f"Herd\\{self.name}"])
            said.append(f"Task Scheduler: {'installed' if code == 0 else 'not installed'}")
        return said

    def _need_systemd(self):
        if not os.path.isdir(self._path("/run/systemd/system")):
            raise ServiceError("systemd is not running here (/run/systemd/system is "
                               "missing): start the program from your own init script")

    def _give_to_user(self, path):
        """The settings file belongs to the service's user, who alone may read it."""
        import pwd
        try:
            entry = pwd.getpwnam(self.user)
        except KeyError:
            raise ServiceError(f"no user {self.user!r} here to run the service as") from None
        with contextlib.suppress(PermissionError):  # a test's root is no real one
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _systemctl(self, *args):
        return self._do(["systemctl", *([] if self.system_wide else ["--user"]), *args])

    def _do(self, command, check=True):
        code, out = self.run(command)
        if code != 0 and check:
            raise ServiceError(f"{' '.join(command)} failed ({code}): {out.strip()}")
        return [f"ran {' '.join(command)}" + ("" if code == 0 else f" ({code})")]


def service_settings(table, cfg, environ):
    """The settings to carry into a service: each one given now (environment or flag),
    as text, and the OLLAMA_* variables set here (Ollama's, which the agent reads)."""
    out = {}
    for setting in table:
        attr = _attr_name(setting.name, "FLEET_NODE_")  # either program's attribute
        if cfg.sources.get(attr) not in ("env", "flag"):
            continue
        value = getattr(cfg, attr, None)
        # As it was written, where it was (a file's @path, not the keys read from it);
        # a flag's, or another name's (FLEET_NODE_SERVER_URL), as read.
        out[setting.name] = environ.get(setting.name) or (
            ("true" if value else "false") if isinstance(value, bool) else str(value))
    out.update((k, environ[k]) for k in OLLAMA_SETTING_VARS if k in environ)
    return out


def service_asked(args):
    return args.install_service or args.uninstall_service or args.service_status


def service_main(prog, args, environ, load, table, script, stop_s, extra=None):
    """A program's main() for the service flags: its settings checked as a start would
    check them, then carried into the service (`extra(cfg)`: more to carry)."""
    try:
        cfg = load(environ, args)
    except (ConfigError, OSError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    settings = {**(extra(cfg) if extra else {}), **service_settings(table, cfg, environ)}
    return service_command(prog, args, Service(prog, script, settings, stop_s=stop_s(cfg)))


def service_command(prog, args, service):
    """Run the --install-service, --uninstall-service or --service-status asked for;
    prints what was done; returns the exit status."""
    try:
        if args.install_service:
            said = service.install()
        elif args.uninstall_service:
            said = service.uninstall()
        else:
            said = service.status()
    except (ServiceError, OSError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    print("\n".join(said))
    return 0


def add_service_flags(parser):
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--install-service", action="store_true",
                       help="run at boot: a systemd unit (as root, system-wide), a "
                            "LaunchAgent (macOS) or a Task Scheduler task (Windows), with "
                            "the FLEET_* settings given now")
    group.add_argument("--uninstall-service", action="store_true",
                       help="remove what --install-service made")
    group.add_argument("--service-status", action="store_true",
                       help="say what is installed and whether it runs")


def _login_name():
    with contextlib.suppress(Exception):
        import getpass
        return getpass.getuser()
    return "root"


def _run_command(command):
    import subprocess
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return 127, str(e)
    return done.returncode, done.stdout + done.stderr


def _write(path, text, mode):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)


def _write_private(path, data):
    """Write a file only its owner can read, from its first byte (made 0600, never
    readable by others in between)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def _systemd_quote(text):
    """A path for a unit line: its % and $ escaped (systemd expands specifiers and
    variables there), quoted when it holds a space (systemd splits on them)."""
    if any(c in text for c in "\n\"\\"):
        raise ServiceError(f"{text!r}: a path with a quote, backslash or newline")
    text = text.replace("%", "%%").replace("$", "$$")
    return f'"{text}"' if " " in text else text


def _env_escape(value):
    if "\n" in value:
        raise ServiceError("a setting's value holds a newline")
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")


def _cmd_escape(value):
    if any(c in value for c in '\r\n"'):
        raise ServiceError("a setting's value holds a quote or a newline")
    return value.replace("%", "%%")


####################################################################################
# Logging: JSONL to a daily file, readable lines to the terminal
####################################################################################

_LOG_CONTEXT = ("model", "node_id", "request_id", "event", "status", "client", "url",
                "error", "elapsed_ms", "inputs")


class JsonLineFormatter(logging.Formatter):
    """One compact JSON object per line; compact so `grep '"level":"ERROR"'` works."""

    _second, _stamp = None, ""  # the last second formatted (one a request is common)

    def timestamp(self, created):
        """RFC 3339 in UTC with milliseconds: 2026-11-22T14:00:01.234+00:00."""
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}+00:00"

    def format(self, record):
        entry = {
            "ts": self.timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _LOG_CONTEXT:
            value = record.__dict__.get(key)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


class ConsoleFormatter(logging.Formatter):
    """`12:00:01 INFO  herd.fleet  node online  node_id=mac-studio`."""

    def format(self, record):
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(f"{k}={record.__dict__[k]}" for k in _LOG_CONTEXT
                          if record.__dict__.get(k) is not None and k != "event")
        # What a client or node sent can carry control characters (a terminal's escape
        # sequences, a forged second line): shown escaped, as the JSONL file does.
        line = printable(f"{stamp} {record.levelname:<7} {record.name:<12} "
                         f"{record.getMessage()}")
        extras = printable(extras)
        if extras:
            line += "  " + extras
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def printable(text):
    """`text` with control characters written as \\xNN escapes."""
    if not CONTROL_CHARS.search(text):
        return text
    return CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class LogFileHandler(logging.handlers.TimedRotatingFileHandler):
    """The JSONL log file. A write that fails (a full disk) is said once on stderr,
    not with a traceback for every line (logging's own handleError)."""

    failed = False

    def handleError(self, record):
        if not self.failed:
            self.failed = True
            error = sys.exc_info()[1]
            print(f"herd: cannot write the log file {self.baseFilename} ({error}); the "
                  f"terminal still gets the log", file=sys.stderr)


def setup_logging(data_dir, file_name, file_level, console_level):
    """Root logger 'herd': JSONL file under data_dir/logs, daily rotation, 30 kept. A
    folder that cannot hold the file (read-only, or not a folder) leaves the terminal
    log alone, said in one warning line."""
    root = logging.getLogger("herd")
    # No lower than a handler wants: a record nobody writes is never built (a per-request
    # debug line otherwise costs CPU even when both handlers drop it).
    root.setLevel(min(logging.getLevelName(file_level), logging.getLevelName(console_level)))
    # Facts no line of ours shows, each looked up for every record (the logging HOWTO's
    # "Optimization" section names these switches): about 10 us off a request's line.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(console_level)
    console.setFormatter(ConsoleFormatter())
    root.addHandler(console)
    log_dir = os.path.join(data_dir, "logs")
    try:
        os.makedirs(log_dir, exist_ok=True)
        file_handler = LogFileHandler(os.path.join(log_dir, file_name), when="midnight",
                                      backupCount=30, encoding="utf-8")
    except OSError as e:
        root.warning(f"cannot write logs in {log_dir} ({e.strerror or e}); logging to "
                     f"the terminal only", extra={"event": "log_file_refused"})
        return root
    file_handler.setLevel(file_level)
    file_handler.setFormatter(JsonLineFormatter())
    root.addHandler(file_handler)
    return root


####################################################################################
# JSON bodies and errors in each API's own shape
####################################################################################

JSON_TYPE = b"application/json; charset=utf-8"


def dump_json(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


def ollama_error_body(message):
    return dump_json({"error": message})


def openai_error_type(status):
    """Ollama's OpenAI layer derives the error type from the status code; a 504 (a
    node's or the router's time-out) is "timeout"."""
    return {400: "invalid_request_error", 404: "not_found_error",
            401: "authentication_error", 403: "permission_error",
            413: "invalid_request_error",
            429: "rate_limit_error", 504: "timeout"}.get(status, "api_error")


def openai_error_body(status, message, code=None, error_type=None):
    """OpenAI's error object; `error_type` names it when its status alone does not (an
    agent's tool that timed out is "timeout", as OpenAI's own 504s say)."""
    return dump_json({"error": {"message": message,
                                "type": error_type or openai_error_type(status),
                                "param": None, "code": code}})


def anthropic_error_type(status):
    """Ollama's Anthropic layer, like Anthropic's API, names the error by its status."""
    return {400: "invalid_request_error", 401: "authentication_error",
            403: "permission_error", 404: "not_found_error", 413: "request_too_large",
            429: "rate_limit_error", 503: "overloaded_error",
            529: "overloaded_error"}.get(status, "api_error")


def anthropic_error_body(status, message):
    return dump_json({"type": "error", "error": {"type": anthropic_error_type(status),
                                                 "message": message}})


def api_of(path):
    """The API a path speaks, which decides the shape of its errors: "anthropic"
    (/v1/messages), "responses" (OpenAI's Responses), "openai" (the rest of /v1) or
    "ollama"."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path == "/v1/responses" or path.startswith("/v1/responses/"):
        return "responses"
    return "openai" if path.startswith("/v1/") else "ollama"


def error_body(api, status, message, code=None):
    """An error in the shape the clients of `api` parse."""
    if api == "anthropic":
        return anthropic_error_body(status, message)
    if api in ("openai", "responses"):
        return openai_error_body(status, message, code)
    return ollama_error_body(message)


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def parse_json_body(body, shape=None):
    """Decode a request body as a JSON object; raise ValueError with Ollama's wording.

    Strict JSON: NaN and Infinity (which Python's json accepts and then writes back out,
    breaking every client that reads it) are refused. So is a body whose JSON shape
    (see JsonShape; `shape` is the one the server gauged as the body arrived) is beyond
    the limits: the parser, in C, holds the event loop for as long as it builds."""
    if not body:
        raise ValueError("missing request body")
    if shape is None:
        shape = JsonShape()
        shape.feed(body, last=True)
    if (refusal := shape.refusal()) is not None:
        raise ValueError(refusal[1])
    try:
        obj = json.loads(body, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"invalid JSON: {e}") from None
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply") from None
    except ValueError as e:  # a NaN or Infinity, or an integer too long to read
        raise ValueError(f"invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError("request body must be a JSON object")
    return obj


# What a JSON body may hold. json.loads builds every value in C without letting go of
# the event loop: 28 MB of empty arrays took it 3 s and 1.5 GB, and walking them in
# Python 18 s more. The shape is therefore gauged on the bytes, at C speed, before any
# parsing: at the limits below the parser takes about 50 ms at worst.
MAX_JSON_DEPTH = 64  # no API nests this deep; deeper exhausts the stack re-encoding it
MAX_JSON_ITEMS = 1 << 18  # commas and brackets outside strings, about one per value:
# Ollama's `context` (one token id a value) of a 128k context fits, with room
MAX_JSON_CONTAINERS = 1 << 14  # arrays and objects: what handlers walk in Python (one
# conversation digest a message: 65,000 messages held the loop 150 ms); a long agent
# conversation with its tools has a few thousand
# Reading an integer of n digits costs about n squared: Python's own limit of 4300
# digits still lets 28 MB of such numbers take 0.7 s. Numbers longer than a 64-bit one
# may hold MAX_LONG_DIGITS digits in all (a few such numbers, at most 1.5 ms).
LONG_NUMBER = re.compile(rb"0{21,}")  # on the text with every digit made a 0
MAX_LONG_DIGITS = 1 << 16
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # 1 and -1 as signed bytes
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")


class JsonShape:
    """The shape of a JSON text gauged on its bytes as they arrive, in pieces of any
    size: its commas and brackets outside strings, how deep its brackets nest and the
    digits of its long numbers, found with bytes.count, split, translate and
    itertools.accumulate (C speed, no Python step per value). A string's escaped
    quotes and backslashes are dropped first, so what is inside strings is told from
    what is outside as the parser tells it (for text that is not JSON the figures are
    rough, and the parser refuses it anyway)."""

    def __init__(self):
        self.items = self.containers = 0
        self.level = self.deepest = 0  # bracket depth at the end of what was fed, and most
        self.in_string = False
        self.carry = b""  # a backslash that ends a piece: it escapes the next one's first
        self.digits = 0  # the digits that end what was fed, outside strings
        self.long_digits = 0  # digits in numbers longer than 20 digits

    def feed(self, data, last=False):
        """Take the next piece of the text (`last`: nothing follows it)."""
        if last and self._within_limits(data):
            return
        if self.refusal() is not None:
            return  # refused already: the rest need not be looked at
        data = self.carry + data
        self.carry = b""
        if b"\\" in data:
            tail = len(data) - len(data.rstrip(b"\\"))
            if tail % 2:  # an escape split across two pieces
                data, self.carry = data[:-1], b"\\"
            data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
        parts = data.split(b'"')
        outside = b"".join(parts[1::2] if self.in_string else parts[::2])
        if len(parts) % 2 == 0:
            self.in_string = not self.in_string
        self._gauge_brackets(outside)
        self._gauge_numbers(outside)

    def _within_limits(self, data):
        """Is the text, with `data` its last piece, within every limit whatever its
        strings hold? Few brackets and commas in all, and too short for long numbers to
        add up: most bodies, told with three counts."""
        return self.items == 0 and not (self.in_string or self.carry or self.digits or
                                        self.long_digits) and \
            len(data) <= MAX_LONG_DIGITS and \
            data.count(b"[") + data.count(b"{") + data.count(b",") <= MAX_JSON_DEPTH

    def _gauge_brackets(self, outside):
        steps = outside.translate(_BRACKET_STEPS, _NOT_BRACKETS)  # +1 opens, -1 closes
        self.items += outside.count(b",") + len(steps)
        self.containers += steps.count(1)
        if steps:
            steps = memoryview(steps).cast("b")
            self.deepest = max(self.deepest, max(itertools.accumulate(steps,
                                                                      initial=self.level)))
            self.level += sum(steps)

    def _gauge_numbers(self, outside):
        """Count the digits of long numbers; a run of digits at the end of the piece is
        carried into the next one, where it may go on."""
        zeros = b"0" * self.digits + outside.translate(_DIGITS_AS_ZERO)
        ended = zeros.rstrip(b"0")
        self.digits = min(len(zeros) - len(ended), MAX_LONG_DIGITS + 1)
        self.long_digits += sum(map(len, LONG_NUMBER.findall(ended)))

    def refusal(self):
        """(status, why) for a text the parser should not be given, so far, or None:
        400 for nesting too deep, 413 for more than the limits allow."""
        if self.deepest > MAX_JSON_DEPTH:
            return 400, f"invalid JSON: nested too deeply (more than {MAX_JSON_DEPTH} levels)"
        if self.items > MAX_JSON_ITEMS:
            return 413, (f"request body holds more than {MAX_JSON_ITEMS} JSON values "
                         f"(commas and brackets)")
        if self.containers > MAX_JSON_CONTAINERS:
            return 413, (f"request body holds more than {MAX_JSON_CONTAINERS} JSON arrays "
                         f"and objects")
        if self.long_digits + self.digits > MAX_LONG_DIGITS:
            return 413, (f"request body holds more than {MAX_LONG_DIGITS} digits in numbers "
                         f"longer than 20 digits")
        return None


# Model names as Ollama writes them: [host[:port]/][namespace/]name[:tag], at most a few
# hundred characters. Anything else (control characters, spaces, quotes, megabytes) is
# refused before it reaches a queue, a header, a metric label or a trace row.
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._\-]*(?::[0-9]{1,5})?"
                           r"(?:/[A-Za-z0-9_][A-Za-z0-9._\-]*){0,3}"
                           r"(?::[A-Za-z0-9_][A-Za-z0-9._\-]*)?")
MODEL_NAME_MAX = 256


def check_model_name(name, field="model"):
    """Raise ValueError unless `name` is a plausible model name; returns it stripped."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{field} is required")
    name = name.strip()
    if len(name) > MODEL_NAME_MAX or not MODEL_NAME_RE.fullmatch(name):
        shown = name[:60] + ("..." if len(name) > 60 else "")
        raise ValueError(f"{field} {shown!r} is not a valid model name")
    return name


####################################################################################
# HTTP server on h11
#
# Theory: each client connection is an asyncio protocol. h11 parses every request, a
# fresh parser per request fed what the last one left over (pipelined bytes). A head
# the handler's check_head() refuses (no key) is answered before any of its body is
# read, and 100 Continue goes out only to a head that passed. The body is read whole
# (it is JSON that routing needs) up to a size limit, by a deadline that grows with
# what has come (a minimum rate), its JSON shape gauged as it arrives (JsonShape), and
# past a megabyte spooled to a temporary file rather than held. A path listed in
# `stream_limits` (blob uploads: gigabytes) is the exception: its handler starts with
# the head and reads the body as it arrives from a BodyStream, which stops reading
# from the client while it holds a megabyte, so the body is never held whole. The
# handler runs as a task of its own and answers through send_response() or
# start_response(), send_chunks() ... end_response(). Responses are framed here, not
# by h11.send(), which re-validates every header of every response: 130 us a response,
# more than h11 takes to parse the request (our headers are either ours or ones h11
# already parsed; values are still checked for CR, LF and NUL). After a complete response on a
# keep-alive connection the next request is parsed; anything else closes the
# connection. The protocol sees a client hang up the moment it happens, so a handler
# that watches for it (watch_client) is cancelled at once, not at its next write; that
# needs no reader task per request. With TLS, the socket is accepted plain: the router
# counts it, and its first bytes are looked at (peeked, not read) before the handshake
# starts, so that plain HTTP sent to the TLS port gets a plain answer that says so.
####################################################################################

# RFC 9110 7.6.1: hop-by-hop headers belong to one connection, never forwarded. Host,
# Content-Length and Expect are set anew for the next hop: an Ollama bound to loopback
# answers 403 to a Host header that is not one of its own names.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding",
                        b"upgrade", b"proxy-connection", b"host", b"content-length",
                        b"expect"})
BAD_HEADER_VALUE = re.compile(rb"[\x00\r\n]")
# Plain HTTP where TLS was expected: a request line's method (a TLS record starts 0x16),
# and its Host header, to name the https URL in the answer (checked: it is echoed).
HTTP_REQUEST_LINE = re.compile(rb"[A-Z]{1,16}(?: |\Z)")
HOST_HEADER = re.compile(rb"\r\nhost:[ \t]*((?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])"
                         rb"(?::[0-9]{1,5})?)[ \t]*\r\n", re.I)


def end_to_end_headers(headers, also_drop=()):
    """Headers minus hop-by-hop ones, including any the Connection header names."""
    drop = HOP_BY_HOP.union(also_drop)
    for k, v in headers:
        if k == b"connection":
            drop = drop.union(t.strip().lower() for t in v.split(b","))
    return [(k, v) for k, v in headers if k not in drop]


def forwarded_length(request):
    """The Content-Length a streamed body goes on to the next hop with, or None to send
    it chunked. The client's framing is never the next hop's: RFC 9112 6.3 has
    Transfer-Encoding override Content-Length, and an intermediary that forwards such a
    request must drop its Content-Length (the chunks say how long the body is)."""
    if request.header("transfer-encoding") is not None:
        return None
    length = request.header("content-length")
    return int(length) if length is not None else None


class Request:
    """One parsed HTTP request with its whole body (or, streamed, its BodyStream)."""

    __slots__ = ("method", "target", "path", "query", "headers", "body", "client", "stream",
                 "shape")

    def __init__(self, event, body, client):
        self.method = event.method.decode("ascii", "replace").upper()
        self.target = event.target.decode("ascii", "replace")
        path, _, query = self.target.partition("?")
        self.path = path.rstrip("/") or "/"  # routes, and so limits, are looked up by it
        self.query = urllib.parse.parse_qs(query) if query else {}
        # A plain list: h11's Headers goes through __getitem__ on every iteration.
        self.headers = list(event.headers)
        self.body = body
        self.client = client
        self.stream = None  # a BodyStream for a body read as it arrives (body is b"")
        self.shape = None  # the body's JsonShape, gauged as it arrived

    def header(self, name):
        """The first value of a header (name in lower case), or None."""
        key = name.encode() if isinstance(name, str) else name
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return None


def wants_keep_alive(http_version, headers):
    """RFC 9112 9.3: HTTP/1.1 keeps the connection unless the client says close; like
    h11, an HTTP/1.0 client gets one response per connection. A request framed both
    by Content-Length and chunked is answered, then the connection closes (RFC 9112
    6.3: such a request may be an attempt at request smuggling)."""
    if http_version != b"1.1":
        return False
    names = {k for k, _ in headers}
    if b"transfer-encoding" in names and b"content-length" in names:
        return False
    return not any(k == b"connection" and b"close" in v.lower() for k, v in headers)


def response_head(status, headers):
    """The status line and header block; a value with CR, LF or NUL is refused."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))]
    for name, value in headers:
        if BAD_HEADER_VALUE.search(value):
            raise ValueError(f"header {name.decode('latin-1')} has a forbidden character")
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"\r\n")
    return b"".join(lines)


class BodyTooLarge(ValueError):
    """A streamed request body went past its limit."""


class BodyStream:
    """A request body read as it arrives, for a handler that passes it on (a blob
    upload): receive() gives the next piece, b'' at the end. While it holds HIGH_WATER
    bytes the connection stops reading from the client, so a slow node slows the client
    down instead of filling the router's memory."""

    HIGH_WATER = 1 << 20

    def __init__(self, conn, limit):
        self.conn, self.limit = conn, limit
        self.pieces = collections.deque()
        self.buffered = self.size = 0
        self.done = False  # the whole body has arrived (it may not all be taken yet)
        self.error = None  # why the body cannot arrive whole: raised by receive()
        self._waiter = None

    def feed(self, data):
        self.size += len(data)
        if self.size > self.limit:
            return self.fail(BodyTooLarge(f"request body larger than {self.limit} bytes"))
        self.pieces.append(data)
        self.buffered += len(data)
        if self.buffered > self.HIGH_WATER:
            self.conn.pause_body()
        self._wake()

    def finish(self):
        self.done = True
        self._wake()

    def fail(self, error):
        if not self.done and self.error is None:
            self.error = error
            self._wake()

    def _wake(self):
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def receive(self, timeout):
        """The next piece of the body, b'' at its end; TimeoutError when the client
        sends nothing for `timeout` seconds, the failure if it cannot arrive whole."""
        self.conn.send_continue()
        while not self.pieces:
            if self.error is not None:
                raise self.error
            if self.done:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            finally:
                self._waiter = None
        data = self.pieces.popleft()
        self.buffered -= len(data)
        if self.buffered <= self.HIGH_WATER // 2:
            self.conn.resume_body()
        return data


# A body read whole must keep coming: as Apache's mod_reqtimeout has it (body=20,
# MinRate=500), a first allowance of time that each byte received extends. Ours asks
# far more than 500 B/s (any LAN, Wi-Fi or VPN link sends a megabyte a second) and
# ends every body by BODY_DEADLINE_S whatever its rate; a sender that trickles one
# byte every 20 s can no longer hold a connection and a buffer for ever.
BODY_GRACE_S = 10.0
MIN_BODY_RATE = 64 << 10  # bytes a second, on average, after BODY_GRACE_S
BODY_DEADLINE_S = 300.0
# A body sent a byte at a time costs the router a parser pass per byte (an 11 MB one
# took 15 s of CPU): after its first SMALL_READS reads it must average MIN_READ bytes.
SMALL_READS, MIN_READ = 4096, 128


class WholeBody:
    """A request body read whole for its handler (JSON that routing needs), gauged as it
    arrives (JsonShape). Past SPOOL_AT it goes to a temporary file (in TMPDIR, with no
    name), written by a worker thread while the connection stops reading if a write is
    behind: a slow client's large body costs disk for a while, not the router's heap
    for good. read() gives it back whole to the handler."""

    SPOOL_AT = 1 << 20
    GAUGE_AT = 1 << 16  # bytes gauged at a time: a body in small reads is not a pass each

    def __init__(self, conn, limit, now):
        self.conn, self.limit, self.started = conn, limit, now
        self.size = self.reads = self.gauged = 0
        self.shape = JsonShape()
        self.buf = bytearray()  # what has not gone to the spool; `gauged` bytes of it gauged
        self.spool = None  # the temporary file, made by the first write
        self.writing = None  # the write in progress (a future)
        self.discarded = False

    @property
    def due(self):
        """When the body must have ended, at the rate it has come so far."""
        return self.started + min(BODY_DEADLINE_S,
                                  BODY_GRACE_S + self.size / MIN_BODY_RATE)

    def add(self, data):
        """Take a piece; (status, why, counter) if the body is refused, else None."""
        self.size += len(data)
        self.reads += 1
        if self.size > self.limit:
            return 413, f"request body larger than {self.limit} bytes", "bodies_too_large"
        if self.reads > SMALL_READS and self.size < self.reads * MIN_READ:
            return 400, (f"request body sent in pieces too small ({self.size} bytes in "
                         f"{self.reads} reads)"), "bodies_too_slow"
        self.buf += data
        if len(self.buf) - self.gauged >= self.GAUGE_AT:
            self._gauge()
            if (refusal := self.shape.refusal()) is not None:
                return *refusal, "bodies_too_large"
        if len(self.buf) >= self.SPOOL_AT:
            if self.writing is None:
                self._write()
            else:
                self.conn.pause_body()  # the disk is behind the client: wait for it
        return None

    def _gauge(self, last=False):
        if self.gauged < len(self.buf):
            self.shape.feed(bytes(self.buf[self.gauged:]), last)
            self.gauged = len(self.buf)

    def held(self):
        """The whole body if it is all in memory (gauged to its end), else None."""
        if self.spool is not None or self.writing is not None:
            return None
        self._gauge(last=True)
        return bytes(self.buf)

    def _write(self):
        self._gauge()
        data, self.buf, self.gauged = bytes(self.buf), bytearray(), 0
        self.writing = asyncio.get_running_loop().run_in_executor(None, self._write_out, data)
        self.writing.add_done_callback(self._written)

    def _write_out(self, data):  # in a worker thread
        if self.spool is None:
            self.spool = tempfile.TemporaryFile(prefix="herd-body-")
        self.spool.write(data)

    def _written(self, writing):
        self.writing = None
        if self.discarded:
            return self._close_spool()
        if writing.exception() is not None:
            return  # read() raises it
        if len(self.buf) >= self.SPOOL_AT:
            self._write()
        self.conn.resume_body()

    async def read(self):
        """The whole body, from its spool; OSError if that could not be written or read."""
        self._gauge(last=True)
        try:
            while self.writing is not None:
                writing = self.writing
                await asyncio.wait([writing])
                if writing.exception() is not None:
                    raise writing.exception()
            rest, self.buf = bytes(self.buf), bytearray()
            return await asyncio.to_thread(self._read_back, rest)
        except asyncio.CancelledError:
            self.discard()  # shutdown: the spool goes now
            raise

    def _read_back(self, rest):  # in a worker thread
        with self.spool:
            self.spool.write(rest)
            self.spool.seek(0)
            return self.spool.read()

    def discard(self):
        """The body will not be read (the client left, or it was refused)."""
        self.discarded = True
        self.buf = bytearray()
        if self.writing is None:
            self._close_spool()

    def _close_spool(self):
        if self.spool is not None and not self.spool.closed:
            asyncio.get_running_loop().run_in_executor(None, self.spool.close)


class _ResponseWriting:
    """HttpConnection's writing half: response heads and bodies, whole or chunk by
    chunk, with the transport's flow control (a client that reads slowly pauses the
    writer, not the router's memory), and the refusals the connection makes itself."""

    def _begin_response(self, request, http_version=b"1.1"):
        self.head_only = request is not None and request.method == "HEAD"
        self.http11 = http_version == b"1.1"
        self.keep_alive = request is not None and wants_keep_alive(http_version,
                                                                   request.headers)
        self.response_started = self.response_done = False
        self.takes_raw_chunks = False  # the body goes out chunked (see start_response)
        self.extra_headers = ()  # the handler's headers for every response (CORS)
        self._watching = False

    def pause_writing(self):
        self._write_paused = True

    def resume_writing(self):
        self._write_paused = False
        self._wake_drain(None)

    def _wake_drain(self, error):
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(error) if error else waiter.set_result(None)

    async def drain(self):
        """Wait while the client's socket buffer is full; raise if the client is gone."""
        if self.client_gone:
            raise ConnectionResetError("client disconnected")
        if self._write_paused:  # the relay and the handler may both wait
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            try:
                await waiter
            finally:
                self._drain_waiters.remove(waiter)

    async def _write(self, data):
        if self.client_gone:
            raise ConnectionResetError("client disconnected")
        self.transport.write(data)
        if self._write_paused:
            await self.drain()

    def _head(self, status, content_type, extra, length):
        headers = [(b"server", SERVER_HEADER)]
        if content_type:
            headers.append((b"content-type", content_type))
        if length is not None and status != 204:  # RFC 9110 8.6: none on a 204
            headers.append((b"content-length", b"%d" % length))
        elif self.takes_raw_chunks:
            headers.append((b"transfer-encoding", b"chunked"))
        for name, value in (*extra, *self.extra_headers):
            if name == b"connection" and b"close" in value.lower():
                self.keep_alive = False
            else:
                headers.append((name, value))
        if self._stream is not None and not self._stream.done:
            self.keep_alive = False  # the rest of the body would be read as a request
        if not self.keep_alive:
            headers.append((b"connection", b"close"))
        head = response_head(status, headers)
        self.response_started = True
        return head

    async def send_response(self, status, body=b"", content_type=JSON_TYPE, headers=()):
        """A whole response with Content-Length (HEAD gets the headers only)."""
        head = self._head(status, content_type, headers, len(body))
        self.response_done = True
        await self._write(head if self.head_only else head + body)

    async def send_json(self, status, obj, headers=()):
        await self.send_response(status, dump_json(obj), JSON_TYPE, headers)

    async def start_response(self, status, content_type, headers=(), length=None,
                             first_chunks=b""):
        """Send the status line and headers, with the body's first complete chunks
        (see ChunkedBody) in the same write; the rest follows with send_*().

        With no length the body is chunked for an HTTP/1.1 client, and for HTTP/1.0
        delimited by closing the connection (RFC 9112 6.3)."""
        if length is None:
            self.takes_raw_chunks = self.http11 and not self.head_only
            self.keep_alive = self.keep_alive and self.http11
        head = self._head(status, content_type, headers, length)
        await self._write(head + self._body_bytes(first_chunks) if first_chunks else head)

    def _body_bytes(self, raw):
        """Complete chunks as they go to this client: as they are, unframed, or nothing."""
        if self.takes_raw_chunks:
            return raw
        return b"" if self.head_only else unframe_chunks(raw)

    async def send_chunks(self, raw):
        """Send complete chunks, framing included (see ChunkedBody)."""
        data = self._body_bytes(raw)
        if data:
            await self._write(data)

    def relay_write(self, raw):
        """Write complete chunks now, as they are (the Relay's fast path, from a node's
        data_received); returns the bytes waiting in the client's buffer."""
        if self.client_gone or self.transport.is_closing():
            return 0  # the client is gone: its handler is being cancelled
        self.transport.write(raw)
        return self.transport.get_write_buffer_size()

    async def send_data(self, data):
        """Send a piece of the body (framed here when the body is chunked)."""
        await self.send_chunks(frame_chunk(data))

    async def end_response(self):
        self.response_done = True
        if self.takes_raw_chunks:
            await self._write(b"0\r\n\r\n")

    # -- refusals the connection makes itself --------------------------------------

    def _refuse_too_large(self):
        self._refuse_body(413, f"request body larger than {self._limit} bytes",
                          "bodies_too_large")

    def _refuse_body(self, status, message, counter):
        """Refuse a request part-way through its body (too large, its JSON beyond the
        limits, too slow), in the shape of the API its path belongs to."""
        self.counters[counter] += 1
        if self._whole is not None:
            self._whole.discard()
            self._whole = None
        self._refuse(status, error_body(api_of(self._request.path), status, message))

    def _refuse(self, status, body, headers=(), content_type=JSON_TYPE):
        """Answer a request we will not handle, and close. Closing at once would reset
        the connection if the client is still sending (its request, a body we refuse),
        and a reset can destroy the answer before the client reads it: so our side is
        shut and what comes is read and dropped, for a second at most (a lingering
        close, as web servers do it)."""
        self.transport.write(response_head(status, [
            (b"server", SERVER_HEADER), (b"content-type", content_type),
            (b"content-length", b"%d" % len(body)), *headers,
            (b"connection", b"close")]) + body)
        self._linger()


class _TlsStart:
    """HttpConnection's TLS: the connection is accepted plain, its first bytes looked
    at, and a ClientHello upgraded in place (plain HTTP to a TLS port gets a clear 400)."""

    def _await_hello(self, sock):
        """Wait, reading nothing, for the client's first bytes: a peek shows whether
        they are a TLS ClientHello or plain HTTP. The whole handshake has
        HANDSHAKE_TIMEOUT from here."""
        self._read_paused = True
        self.transport.pause_reading()
        self._arm_timer(self.HANDSHAKE_TIMEOUT)
        try:
            self._peek = sock.dup()  # the transport owns the socket's own descriptor
            self._loop.add_reader(self._peek.fileno(), self._read_hello)
        except (OSError, NotImplementedError):  # no descriptor left, or no add_reader
            self._stop_peeking()
            self._read_paused = False
            self._secure_task = self._loop.create_task(self._start_tls(),
                                                       name=f"tls {self.client}")

    def _read_hello(self):
        try:
            first = self._peek.recv(2048, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            first = b""
        self._stop_peeking()
        if first[:1] == b"\x16":  # a TLS handshake record: the ClientHello
            self._read_paused = False
            self._secure_task = self._loop.create_task(self._start_tls(),
                                                       name=f"tls {self.client}")
            return
        if HTTP_REQUEST_LINE.match(first):
            return self._refuse_plain_http(first)
        self.close()

    def _stop_peeking(self):
        if self._peek is not None:
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_reader(self._peek.fileno())
            self._peek.close()
            self._peek = None

    def _refuse_plain_http(self, first):
        """Plain HTTP sent to the TLS port: a plain 400 that names the right URL, as
        nginx answers it ("The plain HTTP request was sent to HTTPS port")."""
        found = HOST_HEADER.search(first)
        if found:
            where = found.group(1).decode("ascii")
        else:
            host, port = self.transport.get_extra_info("sockname")[:2]
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        body = f"this router speaks https: use https://{where}/\n".encode()
        self._refuse(400, body, content_type=b"text/plain; charset=utf-8")

    async def _start_tls(self):
        raw = self.transport
        left = max(0.1, self._since + self._timeout - self._loop.time())
        try:
            transport = await self._loop.start_tls(raw, self, self.tls, server_side=True,
                                                   ssl_handshake_timeout=left)
        except OSError as e:  # ssl.SSLError, a reset, the handshake timing out
            transport, error = None, e
        else:
            error = ConnectionResetError("closed during the TLS handshake")
        finally:
            self._secure_task = None
        if transport is None:  # asyncio may or may not call connection_lost: see to it
            raw.abort()
            return self._lost(error)
        self.transport, self.handshaking = transport, False
        if self.on_secure:
            self.on_secure(self)
        self._arm_timer(self.idle_timeout)


class _Deadlines:
    """HttpConnection's clock: a connection idle, slow to send a head or a body, or
    lingering after a refusal is closed on time."""

    def _linger(self):
        """Shut our side, read and drop what the client still sends, close in a second
        (or at once when the server has too many lingering already: `lingers`)."""
        if not self.lingers:
            return self.close()
        self._lingering = True
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
        if self.transport.can_write_eof():
            with contextlib.suppress(OSError):  # the client reset the connection meanwhile
                self.transport.write_eof()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(1.0, self.close)

    def _arm_timer(self, timeout, since=None):
        """Close the connection if nothing arrives for `timeout` seconds (idle between
        requests, or stuck in a body), or, with `since`, when `timeout` seconds have
        passed since then (a request head, a TLS handshake); a body being read must
        also keep to its rate (WholeBody.due). A handler at work disarms it."""
        self._timeout, self._since = timeout, self._loop.time() if since is None else since
        deadline = self._due()
        if self._timer is None or self._timer.when() > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._check_timer)

    def _due(self):
        due = self._since + self._timeout
        return due if self._whole is None else min(due, self._whole.due)

    def _check_timer(self):
        self._timer = None
        if self._timeout is None or self.task is not None or self._lingering:
            return
        now = self._loop.time()
        if self._whole is not None and self._whole.due <= now:
            return self._refuse_body(408, (
                f"request body too slow: {self._whole.size} bytes in "
                f"{now - self._whole.started:.0f}s (a body must come at "
                f"{MIN_BODY_RATE >> 10} KiB/s after its first {BODY_GRACE_S:g}s, and "
                f"whole within {BODY_DEADLINE_S:g}s)"), "bodies_too_slow")
        if self._due() > now:
            self._timer = self._loop.call_at(self._due(), self._check_timer)
        else:
            if self._head_since is not None:
                self.counters["header_timeouts"] += 1
            self.close()


class HttpConnection(_ResponseWriting, _TlsStart, _Deadlines, asyncio.Protocol):
    """Server side of one client connection: parse requests, run the handler, respond.

    `check_head(request)` (optional) may refuse a request from its head, before its body
    is read: it returns (status, body, headers) or None. With `tls` (an SSLContext) the
    connection is accepted plain and upgraded once its first bytes show a TLS
    ClientHello; `on_secure(conn)` is called when the handshake is done. The classes
    above are its parts: writing responses, starting TLS, keeping deadlines."""

    HOLD_LIMIT = 1 << 20  # pipelined bytes held while a request is answered
    HANDSHAKE_TIMEOUT = 10.0  # from accept to a finished TLS handshake (asyncio's is 60 s)

    def __init__(self, handler, *, max_body, idle_timeout, read_timeout, header_timeout=10.0,
                 body_limits=None, stream_limits=None, log=None, on_open=None, on_close=None,
                 counters=None, check_head=None, tls=None, on_secure=None):
        self.handler, self.log, self.on_open, self.on_close = handler, log, on_open, on_close
        self.check_head, self.tls, self.on_secure = check_head, tls, on_secure
        self.handshaking = tls is not None  # until the TLS handshake is done
        self.lingers = True  # a refusal reads and drops for a second (see _refuse)
        self.max_body, self.body_limits = max_body, body_limits or {}  # path -> bytes
        self.stream_limits = stream_limits or {}  # path prefix -> bytes, body streamed
        self.idle_timeout, self.read_timeout = idle_timeout, read_timeout
        self.header_timeout = header_timeout  # for a whole request head, not per byte
        self.counters = counters if counters is not None else collections.Counter()
        self._limit = max_body
        self._head_since = None  # loop time the first byte of a request head came
        self.transport = None
        self.client = "?"
        self.client_gone = False
        self.task = None  # the handler of the request being answered
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()
        self._parser = h11.Connection(h11.SERVER, max_incomplete_event_size=65536)
        self._request_head = self._request = None  # the h11 event and its Request
        self._whole = None  # the WholeBody being read
        self._peek = None  # with TLS: a duplicate of the socket, to peek at the first bytes
        self._secure_task = None  # with TLS: the handshake
        self._stream = None  # the BodyStream of the request being answered, if streamed
        self._continued = False
        self._held = 0
        self._read_paused = self._write_paused = False
        self._drain_waiters = []
        self._timer, self._timeout, self._since = None, None, 0.0
        self._aborted = self._lingering = False
        self._begin_response(None)

    # -- connection events --------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        if self._aborted:
            return transport.abort()  # shut down between accept and this call
        peer = transport.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.client_ip = peer[0] if isinstance(peer, tuple) else self.client
        if self.client_ip.startswith("::ffff:") and "." in self.client_ip:
            self.client_ip = self.client_ip[7:]  # an IPv4 client of an IPv6 socket
        refusal = self.on_open(self) if self.on_open else None
        if self._aborted:
            return
        if refusal and self.tls is not None:
            self.handshaking = False  # counted as refused, not as a failed handshake
            return self.close()  # no handshake yet: nothing can be said that it would read
        if refusal:  # too many connections: say so and close, before reading anything
            return self._refuse(503, ollama_error_body(refusal))
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            return self._await_hello(sock)
        self._arm_timer(self.idle_timeout)

    def data_received(self, data):
        if self._aborted or self._lingering or self.closed.done():
            return  # refused: what the client still sends is read and dropped
        stream = self._stream
        if stream is not None and stream.error is not None:
            return  # a streamed body refused half-way: dropped; the answer closes
        self._parser.receive_data(data)
        if self.task is None:
            if self._request_head is None and self._head_since is None:
                self._head_since = self._loop.time()
            return self._read_request()
        if stream is not None and not stream.done:
            return self._read_body_stream()
        self._held += len(data)  # a pipelined request: parsed after this response
        if self._held > self.HOLD_LIMIT and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self):
        if self._lingering:
            return False
        if self.task is not None and self._watching:
            return False  # as in Ollama (Go's server), a client's EOF cancels its request
        self._parser.receive_data(b"")
        if self._stream is not None and not self._stream.done:
            self._read_body_stream()  # a body cut short: its reader hears why
        if self.task is None:
            self._read_request()
        # Answer what is being answered; the next cycle then closes. asyncio's TLS
        # closes after an EOF whatever this says (and warns of a True).
        return self.tls is None

    def connection_lost(self, exc):
        self._lost(exc)

    def _lost(self, exc):
        if self.closed.done():
            return  # after a failed TLS handshake, asyncio may still call connection_lost
        self.client_gone = True
        self._stop_peeking()
        if self.handshaking and not self._aborted:
            self.counters["handshakes_failed"] += 1  # silent, not TLS, or a failed handshake
        if self._whole is not None:
            self._whole.discard()
        if self._stream is not None:
            self._stream.fail(ConnectionResetError("client disconnected"))
        if self.task is not None and self._watching:
            self.task.cancel(msg="client disconnected")
        self._wake_drain(ConnectionResetError("client disconnected"))
        if self._timer is not None:
            self._timer.cancel()
        self.closed.set_result(None)
        if self.on_close:
            self.on_close(self)

    # -- reading requests ---------------------------------------------------------

    def _read_request(self):
        """Parse what has arrived; start the handler once a request is complete."""
        parser = self._parser
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as e:
                return self._refuse(getattr(e, "error_status_hint", 400),
                                    ollama_error_body(f"malformed HTTP request: {e}"))
            kind = type(event)
            if event is h11.NEED_DATA:
                if parser.they_are_waiting_for_100_continue and not self._continued:
                    self._continued = True  # the head passed: the body may come
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if self._request_head is not None:  # the body: per read, and its rate
                    return self._arm_timer(self.read_timeout)
                if self._head_since is not None:  # the head: one deadline for all of it
                    return self._arm_timer(self.header_timeout, self._head_since)
                return self._arm_timer(self.idle_timeout)
            if kind is h11.Request:
                if self._take_head(event):
                    return
            elif kind is h11.Data:
                refusal = self._whole.add(event.data)
                if refusal is not None:
                    return self._refuse_body(*refusal)
            elif kind is h11.EndOfMessage:
                return self._start_handler()
            else:  # ConnectionClosed: the client is done with us
                return self.close()

    def _take_head(self, event):
        """A request head: refused here, before any of its body is read, if the body is
        too large or check_head() says no; else its body is read whole, or its handler
        starts with a BodyStream. True when refused or handed over."""
        self._request_head, self._head_since = event, None
        request = self._request = Request(event, b"", self.client)
        path = request.path  # limits follow the routes: /heartbeat/ is /heartbeat
        streamed = next((p for p in self.stream_limits if path.startswith(p)), None)
        self._limit = self.stream_limits[streamed] if streamed is not None \
            else self.body_limits.get(path, self.max_body)
        length, chunked = None, False
        for k, v in request.headers:
            if k == b"content-length":
                length = v
            elif k == b"transfer-encoding":
                chunked = True
        if length is not None and int(length) > self._limit:
            self._refuse_too_large()
            return True
        if self.check_head is not None and (chunked or length not in (None, b"0")):
            refusal = self.check_head(request)
            if refusal is not None:
                self.counters["refused_before_body"] += 1
                self._refuse(*refusal)
                return True
        if streamed is not None:
            self._start_handler(BodyStream(self, self._limit))
            self._read_body_stream()
            return True
        self._whole = WholeBody(self, self._limit, self._loop.time())
        return False

    def _start_handler(self, stream=None):
        head, request, whole = self._request_head, self._request, self._whole
        self._request_head = self._request = self._whole = None
        self._timeout = None
        if whole is not None and self._read_paused:  # paused for the spool: read on, to
            self._read_paused = False  # see the client hang up while it is answered
            self.transport.resume_reading()
        if whole is not None and (body := whole.held()) is not None:
            request.body, request.shape, whole = body, whole.shape, None
        request.stream = self._stream = stream
        self._begin_response(request, head.http_version)
        self.task = self._loop.create_task(self._answer(request, whole))

    def _read_body_stream(self):
        """Pass what has arrived of a streamed body to its BodyStream."""
        stream = self._stream
        while not stream.done and stream.error is None:
            try:
                event = self._parser.next_event()
            except h11.RemoteProtocolError as e:
                return stream.fail(ConnectionError(f"request body: {e}"))
            kind = type(event)
            if event is h11.NEED_DATA:
                return
            if kind is h11.Data:
                stream.feed(event.data)
                if stream.error is not None:
                    self.counters["bodies_too_large"] += 1
            elif kind is h11.EndOfMessage:
                stream.finish()
            else:
                stream.fail(ConnectionResetError("the client closed before the body ended"))

    def pause_body(self):
        if not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_body(self):
        if self._read_paused and (self._stream is not None or self._whole is not None) \
                and not self._lingering:
            self._read_paused = False
            self.transport.resume_reading()

    def waits_for_continue(self):
        """Is the client holding its body back until it hears 100 Continue?"""
        return self._parser.they_are_waiting_for_100_continue and not self._continued

    def send_continue(self):
        """100 Continue, once, for a client that waits for it before sending its body
        (a streamed body is asked for only when its handler reads it)."""
        if self.waits_for_continue() and not self.response_started:
            self._continued = True
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def _answer(self, request, whole=None):
        reuse = False
        try:
            if whole is None or await self._take_body(request, whole):
                await self.handler(request, self)
            reuse = self.response_done and self.keep_alive and not self.client_gone and \
                (self._stream is None or self._stream.done)
        except asyncio.CancelledError:
            if not self.client_gone or asyncio.current_task().uncancel():
                raise  # shutdown; the finally clause closes
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            if self.log:
                self.log.exception("request handler failed", extra={"client": self.client})
            if not self.response_started and not self.client_gone:
                self.keep_alive = False
                with contextlib.suppress(Exception):
                    await self.send_response(500, error_body(api_of(request.path), 500,
                                                             "internal router error"))
        finally:
            self.task = None
            if reuse:
                self._next_cycle()
            elif self._stream is not None and not self._stream.done and not self.client_gone:
                self._linger()  # answered before the body ended: let the answer be read
            else:
                self.close()

    async def _take_body(self, request, whole):
        """Give the request its body from the spool; False once a 503 is sent because
        the spool failed (a full disk)."""
        try:
            request.body, request.shape = await whole.read(), whole.shape
        except OSError as e:
            await self.send_response(503, error_body(api_of(request.path), 503, (
                f"the router could not keep the request body: {e.strerror or e}")))
            return False
        return True

    def _next_cycle(self):
        """A fresh parser for the next request, fed what the client sent meanwhile."""
        leftover, eof = self._parser.trailing_data
        self._parser = h11.Connection(h11.SERVER, max_incomplete_event_size=65536)
        if leftover:
            self._parser.receive_data(leftover)
        if eof:
            self._parser.receive_data(b"")
        self._held, self._continued, self._stream = 0, False, None
        self._head_since = self._loop.time() if leftover else None
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
        self._read_request()

    # -- client hang-up -------------------------------------------------------------

    def watch_client(self):
        """From now on, the client hanging up cancels the handler at once."""
        self._watching = True
        if self.client_gone:
            self.task.cancel(msg="client disconnected")

    def close(self):
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self):
        """Drop the connection at once (shutdown, once handlers are stopped)."""
        self._aborted = True
        if self.transport is not None:
            self.transport.abort()


def reason_phrase(status):
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


# -- multipart/form-data, read as it arrives ---------------------------------------------
# RFC 7578 (on RFC 2046 5.1): parts separated by CRLF "--" boundary, each with its own
# header block; the last delimiter ends in "--". An audio upload is one such part among
# small text fields (model, language, response_format), and is never held whole here.

FORM_BOUNDARY_RE = re.compile(r'boundary=(?:"([^"]{1,70})"|([^;\s]{1,70}))', re.I)
DISPOSITION_PARAM_RE = re.compile(r';\s*([A-Za-z*]+)=(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


def form_boundary(content_type):
    """The boundary of a multipart/form-data Content-Type; ValueError if it is none."""
    if not (content_type or "").lower().startswith("multipart/form-data"):
        raise ValueError("the body must be multipart/form-data (a file and its fields)")
    found = FORM_BOUNDARY_RE.search(content_type)
    if not found:
        raise ValueError("multipart/form-data without a boundary")
    return (found.group(1) or found.group(2)).encode("latin-1")


class FormPart:
    """One part's head: its field name, its file name (None for a plain field), type."""

    __slots__ = ("name", "filename", "content_type")

    def __init__(self, head):
        self.name, self.filename, self.content_type = "", None, "text/plain"
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key == "content-type":
                self.content_type = value.strip()
            elif key == "content-disposition":
                for k, quoted, bare in DISPOSITION_PARAM_RE.findall(value):
                    v = quoted.replace('\\"', '"') if quoted else bare
                    if k.lower() == "name":
                        self.name = v
                    elif k.lower() == "filename":
                        self.filename = v


class FormReader:
    """multipart/form-data fed as it arrives; feed() returns events: ("part", FormPart),
    ("data", bytes), ("end", None) after each part, ("done", None) after the last."""

    MAX_HEAD = 16384  # one part's header block

    def __init__(self, boundary):
        self.delimiter = b"\r\n--" + boundary
        self.buf = bytearray(b"\r\n")  # so the first delimiter reads like the others
        self.state = "preamble"  # preamble, head, body, done

    def feed(self, data):
        self.buf += data
        events = []
        while self.state != "done":
            if self.state == "head":
                end = self.buf.find(b"\r\n\r\n")
                if end > self.MAX_HEAD or end < 0 and len(self.buf) > self.MAX_HEAD:
                    raise ValueError("a form part's header is too long")
                if end < 0:
                    break
                events.append(("part", FormPart(bytes(self.buf[:end]))))
                del self.buf[:end + 4]
                self.state = "body"
                continue
            at = self.buf.find(self.delimiter)
            after = at + len(self.delimiter)
            if at < 0 or len(self.buf) < after + 2:
                # A delimiter may straddle two reads: keep its length back.
                keep = len(self.delimiter) + 2
                if at < 0 and len(self.buf) > keep:
                    if self.state == "body":
                        events.append(("data", bytes(self.buf[:-keep])))
                    del self.buf[:-keep]
                break
            if self.state == "body":
                if at:
                    events.append(("data", bytes(self.buf[:at])))
                events.append(("end", None))
            if self.buf[after:after + 2] == b"--":
                self.state = "done"
                events.append(("done", None))
                self.buf.clear()
                break
            line_end = self.buf.find(b"\r\n", after)
            if line_end < 0:  # transport padding after the boundary, then CRLF
                del self.buf[:at]
                break
            del self.buf[:line_end + 2]
            self.state = "head"
        return events


####################################################################################
# HTTP client on h11 (the upstream side)
####################################################################################


class UpstreamError(Exception):
    """A backend failed; `phase` says when: connect, send, first_byte or body; or how:
    "status" (it answered a 5xx), "timeout" (it answered that it timed out), "herd"
    (a Herd program answered where Ollama should: http_json)."""

    def __init__(self, phase, message, closed=False):
        super().__init__(message)
        self.phase = phase
        self.closed = closed  # the peer closed or reset the connection


def split_url(url):
    """'http://host:port/base' -> (host, port, base path); https:// too (port 443)."""
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"only http:// and https:// URLs are supported: {url}")
    if not parts.hostname:
        raise ValueError(f"no host in URL: {url}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"bad port in URL: {url}") from None
    return parts.hostname, port, parts.path.rstrip("/")


def is_https(url):
    return url.lower().startswith("https://")


# RFC 9112 7.1: chunk-size [ chunk-ext ] CRLF; 15 hex digits is already absurd.
CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r\n")


class ChunkedBody:
    """Split a chunked body (RFC 9112 7.1) at chunk boundaries, keeping its framing.

    A relay can then pass complete chunks on byte for byte, with no decode and
    re-encode per chunk (h11 costs about 35 us a chunk doing that), and a broken
    stream always stops on a boundary, where an error chunk can still follow.
    """

    MAX_LINE = 4096

    def __init__(self, initial=b""):
        self.buf = bytearray(initial)  # the start of a chunk not complete yet
        self.done = False
        self.count = 0  # data chunks passed so far (Ollama streams a token a chunk)
        # A list to gather each complete chunk's data into as it is scanned, for a
        # reader that wants the body unframed (a translation), with no second walk
        # over the chunks; None: not gathered.
        self.payloads = None

    def feed(self, data):
        """Add one read; return the complete data chunks so far (b'' if none). A read
        of whole chunks, the usual case, is passed on as it is, uncopied."""
        if self.buf:
            self.buf += data
            return self.take()
        end = self._scan(data)
        if end < len(data):
            self.buf += data[end:]
            return data[:end]
        return data

    def take(self):
        """The complete data chunks buffered so far, framing included (b'' if none)."""
        end = self._scan(self.buf)
        if not end:
            return b""
        out = bytes(self.buf[:end])
        del self.buf[:end]
        return out

    def _scan(self, buf):
        """Where the complete data chunks at the start of `buf` end; notes the end of
        the body (the last chunk, trailer fields, an empty line) in `done`."""
        pos, size_of_buf, payloads = 0, len(buf), self.payloads
        while not self.done:
            line = CHUNK_SIZE_LINE.match(buf, pos)
            if line is None:
                if buf.find(b"\r\n", pos) >= 0:
                    raise ValueError(f"bad chunk size line {bytes(buf[pos:pos + 20])!r}")
                if size_of_buf - pos > self.MAX_LINE:
                    raise ValueError("chunk size line too long")
                break
            size, start = int(line.group(1), 16), line.end()
            if size == 0:
                tail = buf[start:]
                self.done = tail[:2] == b"\r\n" or b"\r\n\r\n" in tail
                break
            end = start + size + 2
            if end > size_of_buf:
                break
            if buf[end - 2] != 13 or buf[end - 1] != 10:  # CR LF
                raise ValueError("chunk not followed by CRLF")
            if payloads is not None:
                payloads.append(buf[start:end - 2])
            pos = end
            self.count += 1
        return pos


def frame_chunk(data):
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def unframe_chunks(raw, count=None):
    """The payload of complete chunks taken by ChunkedBody.take() (of the first `count`)."""
    out, pos = [], 0
    while pos < len(raw) and (count is None or len(out) < count):
        eol = raw.index(b"\r\n", pos)
        size = int(raw[pos:eol].split(b";", 1)[0], 16)
        out.append(raw[eol + 2:eol + 2 + size])
        pos = eol + size + 4
    return b"".join(out)


def unframe_last_chunks(raw, count):
    """The payload of the last `count` chunks of `raw` (complete chunks, framing
    included, as ChunkedBody.take() gives them), found from its end: an answer's last
    events are read without walking the thousands of chunks that may come before."""
    pieces, end = [], len(raw)
    while end > 0 and len(pieces) < count:
        start = _chunk_start(raw, end)
        if start is None:
            break  # not whole chunks here (never so from ChunkedBody): what was found
        pieces.append(raw[raw.index(b"\r\n", start) + 2:end - 2])
        end = start
    return b"".join(reversed(pieces))


CRLFS_IN_CHUNK = 16  # walking back, a chunk holding more is not looked for further


def _chunk_start(raw, end):
    """Where the chunk ending at `end` (after its data's CRLF) starts, or None: at the
    CRLF, walking back, after which its size line's size reaches exactly to `end`
    (the data itself may hold CRLFs; NDJSON and SSE from Ollama hold none)."""
    eol = raw.rfind(b"\r\n", 0, end - 2)
    for _ in range(CRLFS_IN_CHUNK):
        if eol < 0:
            break
        before = raw.rfind(b"\r\n", 0, eol)
        start = before + 2 if before >= 0 else 0
        line = CHUNK_SIZE_LINE.fullmatch(raw, start, eol + 2)
        if line is not None and eol + 2 + int(line.group(1), 16) + 2 == end:
            return start
        eol = before
    return None


class Upstream(asyncio.Protocol):
    """One connection to a backend, as an asyncio protocol: exchanges run one after
    another on it (keep-alive), each phase with its own time-out.

    h11 parses the response head, and any body that is not chunked. A chunked body is
    split at chunk boundaries by ChunkedBody instead, so that a Relay can pass complete
    chunks on byte for byte; while one runs (`relay` is set), every read goes to it.
    """

    HIGH_WATER = 256 * 1024  # bytes unread, or queued towards the client, before pausing
    ONE_WRITE = 1 << 20  # a request body below this goes out in one write with its head

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.transport = None
        self.h11 = h11.Connection(h11.CLIENT)
        self.reused = False
        self.closed = False  # either side closed the connection
        self._loop = asyncio.get_running_loop()
        self._lost = None  # the error the connection was lost with, if any
        self._waiter = None  # a reader waiting for bytes
        self._unread, self._read_paused = 0, False
        self._chunked = None  # ChunkedBody, once a chunked body is being read
        self._said_close = False
        self.last_progress = self._loop.time()  # when bytes last came (loop time)
        self.relay = None  # the Relay that takes every read while it runs
        self._write_paused, self._drained = False, None  # a request body being sent

    @classmethod
    async def connect(cls, host, port, timeout, tls=None):
        """Connect, over TLS when `tls` (an ssl.SSLContext) is given."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, up = await loop.create_connection(
                    lambda: cls(host, port), host, port, ssl=tls,
                    server_hostname=host if tls else None)
        except TimeoutError:
            raise UpstreamError("connect", f"connect to {host}:{port} timed out "
                                           f"after {timeout:g}s") from None
        except OSError as e:  # ssl.SSLError is one too: its reason says what failed
            if tls is not None and getattr(e, "reason", None):
                raise UpstreamError("connect", f"TLS with {host}:{port} failed: "
                                               f"{e.reason}") from None
            raise UpstreamError("connect", f"cannot connect to {host}:{port}: "
                                           f"{e.strerror or e}") from None
        return up

    # -- connection events ----------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                      socket.TCP_NODELAY, 1)

    def data_received(self, data):
        self.last_progress = self._loop.time()
        if self.relay is not None:
            return self.relay.on_data(data)
        if self._chunked is None:
            self.h11.receive_data(data)
        else:
            self._chunked.buf += data
        self._unread += len(data)
        if self._unread > self.HIGH_WATER:
            self.pause_reading()
        self._wake()

    def eof_received(self):
        self._peer_gone(None)
        return False

    def connection_lost(self, exc):
        self._peer_gone(exc)

    def pause_writing(self):
        self._write_paused = True

    def resume_writing(self):
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _peer_gone(self, exc):
        if self._lost is None:
            self._lost = exc
        self.closed = True
        self.resume_writing()
        if self._chunked is None:
            self.h11.receive_data(b"")
        if self.relay is not None:
            self.relay.on_error(self.death("body"))
        self._wake()

    def _wake(self):
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _died(self, phase, error):
        where = {"first_byte": "before answering", "send": "while the request was sent"}
        where = where.get(phase, "in the middle of the response")
        detail = f" ({error})" if error else ""
        return f"{self.host}:{self.port} closed the connection {where}{detail}"

    def death(self, phase):
        """The error to raise for a node that hung up during `phase`."""
        return UpstreamError(phase, self._died(phase, self._lost), True)

    def pause_reading(self):
        if not self._read_paused and not self.closed:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self):
        if self._read_paused and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()

    # -- the request ------------------------------------------------------------------

    async def send_request(self, method, target, headers, body):
        if self.closed:
            raise UpstreamError("send", f"{self.host}:{self.port} closed the connection "
                                        f"before we sent the request", True)
        host = f"{self.host}:{self.port}".encode() if ":" not in self.host \
            else f"[{self.host}]:{self.port}".encode()
        all_headers = [(b"host", host), (b"content-length", b"%d" % len(body))]
        all_headers.extend(headers)
        head = self.h11.send(h11.Request(method=method, target=target, headers=all_headers))
        body = b"".join(self.h11.send_with_data_passthrough(h11.Data(data=body))) \
            if body else b""  # content-length framing: the body itself, not a copy
        end = self.h11.send(h11.EndOfMessage())
        if len(body) < self.ONE_WRITE:
            return self._write(head + body + end)
        # A large body goes in pieces, each in a step of the loop of its own: not copied
        # whole to be joined to its head, nor in one step that holds up other clients.
        self._write(head)
        view = memoryview(body)
        for at in range(0, len(body), self.ONE_WRITE):
            self._write(view[at:at + self.ONE_WRITE])
            await asyncio.sleep(0)
        self._write(end)

    def send_head(self, method, target, headers, length=None):
        """Send a request head whose body follows in send_body() calls and end_body()
        (chunked when its length is not known)."""
        host = f"{self.host}:{self.port}".encode() if ":" not in self.host \
            else f"[{self.host}]:{self.port}".encode()
        framing = (b"content-length", b"%d" % length) if length is not None \
            else (b"transfer-encoding", b"chunked")
        self._write(self.h11.send(h11.Request(method=method, target=target,
                                              headers=[(b"host", host), framing, *headers])))

    async def send_body(self, data, timeout):
        """Send a piece of the body, waiting while the node reads slower than it comes."""
        self._write(self.h11.send(h11.Data(data=data)))
        if self._write_paused and not self.closed:
            self._drained = self._loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._drained
            except TimeoutError:
                raise UpstreamError("send", f"{self.host}:{self.port} took no data for "
                                            f"{timeout:g}s") from None
            finally:
                self._drained = None
        if self.closed:
            raise UpstreamError("send", self._died("send", self._lost), True)

    def end_body(self):
        self._write(self.h11.send(h11.EndOfMessage()))

    def _write(self, data):
        if self.closed:
            raise UpstreamError("send", self._died("send", self._lost), True)
        self.transport.write(data)

    # -- the response -----------------------------------------------------------------

    async def _wait_for_data(self, timeout, phase):
        """Wait for more bytes; UpstreamError if none come for `timeout` seconds."""
        if self.closed:
            raise UpstreamError(phase, self._died(phase, self._lost), True)
        self._unread = 0
        self.resume_reading()
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, _time_out, waiter)
        try:
            await waiter
        except TimeoutError:
            what = "no response" if phase == "first_byte" else "no data"
            raise UpstreamError(phase, f"{self.host}:{self.port} sent {what} for "
                                       f"{timeout:g}s") from None
        finally:
            timer.cancel()
            self._waiter = None

    async def _next_event(self, timeout, phase):
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                if self.closed:  # h11's view of a hang-up mid-message: say what it means
                    raise UpstreamError(phase, self._died(phase, self._lost), True) from None
                raise UpstreamError(phase, f"{self.host}:{self.port} sent bad HTTP: {e}") \
                    from None
            if event is not h11.NEED_DATA:
                return event
            await self._wait_for_data(timeout, phase)

    async def receive_head(self, timeout):
        """Wait for the status line and headers (skipping 1xx)."""
        while True:
            event = await self._next_event(timeout, "first_byte")
            if type(event) is h11.Response:
                headers = list(event.headers)  # see Request
                self._said_close = any(k == b"connection" and b"close" in v.lower()
                                       for k, v in headers)
                return event.status_code, headers
            if type(event) is h11.ConnectionClosed:
                raise UpstreamError("first_byte", self._died("first_byte", None), True)

    async def receive_data(self, timeout):
        """The next piece of the body, or b'' at its end."""
        event = await self._next_event(timeout, "body")
        if type(event) is h11.Data:
            return event.data
        if type(event) is h11.EndOfMessage:
            return b""
        raise UpstreamError("body", self._died("body", None), True)

    @staticmethod
    def is_chunked(headers):
        return any(k == b"transfer-encoding" and b"chunked" in v.lower() for k, v in headers)

    @property
    def chunked_body(self):
        """The ChunkedBody being read (after the first receive_chunks), else None."""
        return self._chunked

    async def receive_chunks(self, timeout):
        """Complete chunks of a chunked body with their framing; b'' at its end.

        Call after receive_head() on a chunked response; from here on h11 is out of
        the way (what it buffered past the head is taken over).
        """
        body = self._chunked
        if body is None:
            body = self._chunked = ChunkedBody(self.h11.trailing_data[0])
        while True:
            try:
                out = body.take()
            except ValueError as e:
                raise UpstreamError("body", f"bad chunked body from {self.host}: {e}") from None
            if out or body.done:
                return out
            await self._wait_for_data(timeout, "body")

    async def read_body(self, timeout, limit=64 << 20):
        chunks, size = [], 0
        while data := await self.receive_data(timeout):
            size += len(data)
            if size > limit:
                raise UpstreamError("body", f"response from {self.host} exceeds {limit} bytes")
            chunks.append(data)
        return b"".join(chunks)

    # -- keep-alive -----------------------------------------------------------------------

    def close(self):
        """Close at once; for a generating Ollama a closed socket is the cancel signal."""
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    @property
    def reusable(self):
        """Did the last exchange end cleanly, leaving the connection open for another?"""
        if self.closed or self.h11.our_state is not h11.DONE:
            return False
        if self._chunked is not None:  # the body went through ChunkedBody, not h11
            return self._chunked.done and self.h11.their_http_version == b"1.1" and \
                not self._said_close
        return self.h11.their_state is h11.DONE

    def reset(self):
        """Ready the connection for its next exchange."""
        self.h11 = h11.Connection(h11.CLIENT)
        self._chunked = None
        self.reused = True


class Relay:
    """One answer passed from a node's connection to a client's, chunk by chunk.

    It owns both ends while it runs: it reads the node's first chunks, then either lets
    every later read of a chunked body go straight from the node's data_received to
    the client (the fast path: no task wakes per chunk, which would cost ~60 us each),
    or, for an HTTP/1.0 client or a body that is not chunked, loops one read at a time.
    A client that reads slowly pauses reading from the node; a node silent for the
    chunk time-out, or one that hangs up, fails the relay with UpstreamError.

    The connection flags it relies on:
      client.response_started  the head went out: no other node may answer any more
      client.takes_raw_chunks  the client's body is chunked (HTTP/1.1, not HEAD), so
                               the node's framing passes through byte for byte
      client.client_gone       the client hung up; its handler is being cancelled
      up.closed                the node's connection is done (never reused)
      up.relay                 set only while the fast path runs; the node's reads go
                               nowhere else then
    """

    HIGH_WATER = 256 * 1024  # bytes queued towards the client before the node waits
    says_otherwise = False  # does a subclass say the answer otherwise (_pass, _end)?

    def __init__(self, up, client, timeout):
        self.up, self.client, self.timeout = up, client, timeout
        self._loop = asyncio.get_running_loop()
        self.chunked = False
        self.prev = self.last = b""  # the last two reads that reached the client
        self.chunks = 0
        self._done = self._stall_timer = self._resume_task = None

    @property
    def last_progress(self):
        """Loop time of the last byte from the node (or the client's last drain)."""
        return self.up.last_progress

    @property
    def tail(self):
        """The answer's end as it reached the client: whole chunks, framing included
        (two reads, a few hundred KB at most; read once, when the answer ends)."""
        return self.prev + self.last

    @property
    def chunks_seen(self):
        """Chunks of the answer so far: the node's chunk frames when it streams chunked
        (several may come in one read), else reads."""
        body = self.up.chunked_body if self.chunked else None
        return body.count if body is not None else self.chunks

    def _note(self, data):
        self.prev, self.last = self.last, data
        self.chunks += 1

    async def _receive(self):
        """The next complete chunks, framed (b'' at the end of the body)."""
        if self.chunked:
            return await self.up.receive_chunks(self.timeout)
        data = await self.up.receive_data(self.timeout)
        return frame_chunk(data) if data else b""

    async def first(self, headers):
        """The node's first complete chunks, read before the client hears anything."""
        self.chunked = self.up.is_chunked(headers)
        data = await self._receive()
        if data:
            self._note(data)
        return data

    async def rest(self):
        """Relay what follows the first chunks; UpstreamError if the node fails."""
        if not self.chunks:
            return  # an empty body
        if self.chunked and self.client.takes_raw_chunks:
            await self._run_fast_path()
            return await self.client.drain()
        while data := await self._receive():
            data = self._pass(data) if self.says_otherwise else data
            if not self.client.client_gone and data:  # send_chunks writes before a wait
                self._note(data)
            await self.client.send_chunks(data)
        await self._send_last()

    async def _send_last(self):
        last = self._end() if self.says_otherwise else b""
        if last and not self.client.client_gone:
            self._note(last)
            await self.client.send_chunks(last)

    def _pass(self, framed):
        """What the client gets of the node's complete chunks: them, as they are. (A
        subclass may say them otherwise: the router's translation of an answer.)"""
        return framed

    def _end(self):
        """What the client gets once the node's body has ended: nothing more."""
        return b""

    # -- the fast path: the node's reads go to the client from data_received ---------

    async def _run_fast_path(self):
        body = self.up.chunked_body
        if body.done:
            return await self._send_last()
        self._done = self._loop.create_future()
        self._stall_timer = self._loop.call_later(self.timeout, self._check_stall)
        self.up.relay = self
        try:
            if body.buf:
                self.on_data(b"")  # bytes that came with the first chunks
            if self.up.closed:
                self.on_error(self.up.death("body"))
            self.up.resume_reading()
            await self._done
        finally:
            self.up.relay = None
            self._stall_timer.cancel()
            if self._resume_task is not None:
                self._resume_task.cancel()

    def on_data(self, data):
        """One read from the node (called by Upstream.data_received)."""
        try:
            out = self.up.chunked_body.feed(data)
        except ValueError as e:
            return self.on_error(UpstreamError("body", f"bad chunked body from "
                                                       f"{self.up.host}: {e}"))
        done = self.up.chunked_body.done
        if self.says_otherwise:
            try:
                out = (self._pass(out) if out else b"") + (self._end() if done else b"")
            except UpstreamError as e:
                return self.on_error(e)
        if out and not self.client.client_gone:  # else its handler is being cancelled
            self._note(out)
            if self.client.relay_write(out) > self.HIGH_WATER:
                self._wait_for_client()
        if done and not self._done.done():
            self._done.set_result(None)

    def on_error(self, error):
        """The node failed (hung up, stalled, sent bad framing): end the relay."""
        if self._done is not None and not self._done.done():
            self._done.set_exception(error)
        self.up.close()

    def _wait_for_client(self):
        self.up.pause_reading()

        async def resume():
            with contextlib.suppress(ConnectionError):
                await self.client.drain()
            self._resume_task = None
            self.up.last_progress = self._loop.time()
            if self.up.relay is self:
                self.up.resume_reading()
        self._resume_task = self._loop.create_task(resume(), name="relay backpressure")

    def _check_stall(self):
        if self._done.done():
            return
        idle = self._loop.time() - self.up.last_progress
        if self._resume_task is not None:  # a slow client is no stalled node (the reaper
            idle = 0.0                     # watches the request as a whole)
        if idle >= self.timeout:
            return self.on_error(UpstreamError(
                "body", f"{self.up.host}:{self.up.port} sent no data for {self.timeout:g}s"))
        self._stall_timer = self._loop.call_later(self.timeout - idle, self._check_stall)


def _time_out(waiter):
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class UpstreamPool:
    """Idle keep-alive connections to each backend, so a request skips the connect."""

    def __init__(self, max_idle=16, max_idle_s=30.0):
        self.max_idle, self.max_idle_s = max_idle, max_idle_s
        self.idle = {}  # (host, port) -> deque of (Upstream, time it went idle)

    async def connect(self, host, port, timeout):
        """An idle connection to host:port if one is alive, else a new one."""
        idle = self.idle.get((host, port))
        now = time.monotonic()
        while idle:
            up, since = idle.pop()
            if now - since < self.max_idle_s and not up.closed:
                return up
            up.close()
        return await Upstream.connect(host, port, timeout)

    def release(self, up):
        """Keep `up` for the next request if its exchange ended cleanly; else close it."""
        if not up.reusable:
            return up.close()
        idle = self.idle.setdefault((up.host, up.port), collections.deque())
        if len(idle) >= self.max_idle:
            return up.close()
        up.reset()
        idle.append((up, time.monotonic()))

    def close_all(self):
        for idle in self.idle.values():
            for up, _ in idle:
                up.close()
        self.idle.clear()


async def http_call(url, method, path, body=None, *, headers=(), timeout=10.0, tls=None,
                    sign=None):
    """A whole request to url+path; returns (status, headers, body bytes). `timeout`
    bounds the whole exchange, not only each read: a peer that trickles its answer a
    byte at a time cannot hold the caller (an agent's heartbeat) for longer. An https://
    URL is verified with `tls` (an ssl.SSLContext), else the system's certificates; with
    `sign` (a fleet token) the request carries sign_request()'s headers."""
    host, port, base = split_url(url)
    if is_https(url) and tls is None:
        import ssl  # only for https: the module costs memory a plain router never uses
        tls = ssl.create_default_context()
    payload = dump_json(body) if isinstance(body, (dict, list)) else (body or b"")
    hdrs = [(b"accept", b"application/json"), (b"user-agent", b"herd/" + VERSION.encode())]
    if payload and not any(k == b"content-type" for k, _ in headers):
        hdrs.append((b"content-type", b"application/json"))
    hdrs.extend(headers)
    if sign:
        hdrs.extend(sign_request(sign, method, base + path, payload))
    up, phase = None, "connect"
    try:
        async with asyncio.timeout(timeout):
            up = await Upstream.connect(host, port, timeout, tls if is_https(url) else None)
            phase = "first_byte"
            await up.send_request(method.encode(), (base + path).encode(), hdrs, payload)
            status, resp_headers = await up.receive_head(timeout)
            phase = "body"
            return status, resp_headers, await up.read_body(timeout)
    except TimeoutError:
        raise UpstreamError(phase, f"{host}:{port} did not answer {method} {path} whole "
                                   f"within {timeout:g}s") from None
    finally:
        if up is not None:
            up.close()


def from_herd(headers):
    """Did a Herd program (the router, an agent) send this answer? Its Server header
    says so; Ollama sends none."""
    return any(k == b"server" and v.startswith(b"herd/") for k, v in headers)


async def http_json(url, method, path, body=None, *, headers=(), timeout=10.0,
                    expect_ollama=False):
    """http_call that expects a JSON answer; raises UpstreamError on non-2xx, and with
    `expect_ollama` when a Herd program answers instead (phase "herd": a URL with the
    router's port where Ollama's belongs; the router answers much as Ollama does)."""
    status, resp_headers, data = await http_call(url, method, path, body, headers=headers,
                                                 timeout=timeout)
    if expect_ollama and from_herd(resp_headers):
        raise UpstreamError("herd", f"{url} answers as the Herd router, not as Ollama: "
                                    f"{PORTS_HINT}")
    if status >= 300:
        raise UpstreamError("status", f"{method} {path} answered {status}: "
                                      f"{data[:200].decode('utf-8', 'replace')}")
    return read_json_answer(data, f"{method} {path}")


def read_json_answer(data, what):
    """A peer's JSON answer ({} when empty); UpstreamError when it is not JSON or nests
    deep enough to exhaust the decoder's recursion (said in one line, no traceback)."""
    try:
        return json.loads(data) if data else {}
    except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors
        why = "nested too deeply" if isinstance(e, RecursionError) else "invalid JSON"
        raise UpstreamError("body", f"{what} answered with {why}") from None


####################################################################################
# Model names
####################################################################################


def canonical_model(name):
    """Ollama's lookup form: lower case, ':latest' when no tag is given."""
    name = name.strip().lower()
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else name + ":latest"


####################################################################################
# Scoring: elimination, the seven documented signals and two that learning adds (speed,
# session), pure functions over plain numbers
####################################################################################

GIB = 1 << 30
LOAD_OVERHEAD = 1.2  # a runner needs its weights plus KV cache and compute buffers
RECENT_UNLOAD_S = 600  # weights still in the page cache: a reload is quick


@dataclass
class Candidate:
    """What scoring needs to know about one node for one request."""

    node_id: str
    hot: bool = False
    loading_s: float = 0.0  # seconds left of a load the router sent here (hot meanwhile)
    recently_unloaded: bool = False
    model_size: int = 0
    mem_total: int = 0
    mem_available: int = 0
    mem_reclaimable: int = 0  # bytes held by other loaded models Ollama may evict
    pressure: str = "normal"
    active: int = 0
    waiting: int = 0
    slots: int = 1
    limit: int = 0  # requests in flight worth having here (learned; 0: the slots)
    tokens: float = 0.0  # completion tokens this request is expected to produce
    service_s: float = 0.0  # expected seconds it runs once it has a slot (0: unknown)
    work_ahead_s: float = 0.0  # expected seconds of queued work before it gets a slot
    load_estimate_s: float = 0.0  # expected cold-load time
    first_s: float = 0.0  # expected seconds from a slot to the first token (0: unknown)
    fastest_s: float = 0.0  # the best expected completion among the candidates (ranking)
    cpu_percent: float = 0.0
    cpu_trend: float = 0.0  # percentage points per sample, + means busier
    availability: float | None = None  # 0..1 from a node that learns its owner's habits
    on_battery: bool = False  # on its battery, and its owner asked that it be avoided
    availability_trend: float = 0.0  # its owner's CPU, percentage points per minute
    memory_ceiling: int = 0  # bytes the owner leaves for models at this hour; 0: no ceiling
    degraded: bool = False
    requested_ctx: int = 0
    loaded_ctx: int = 0
    model_max_ctx: int = 0
    session: bool = False  # this node answered the conversation's last turn
    evicts: tuple = ()  # loaded models a cold load here would push out
    evicts_busy: str = ""  # one of those with requests running or queued


def eliminate(c):
    """Why this node cannot take the request now, or None if it can."""
    if c.pressure == "critical":
        return "critical memory pressure"
    if not c.hot and c.mem_total:
        need = c.model_size * LOAD_OVERHEAD
        if need > c.mem_available + c.mem_reclaimable:
            return (f"not enough memory to load the model ({need / GIB:.1f} GiB needed, "
                    f"{(c.mem_available + c.mem_reclaimable) / GIB:.1f} GiB can be freed)")
        if c.memory_ceiling and need > c.memory_ceiling:
            return (f"over its memory ceiling: the model needs {need / GIB:.1f} GiB, its "
                    f"owner leaves {c.memory_ceiling / GIB:.1f} GiB for models at this hour")
    return None


def score_thermal(c):
    """+50 hot, +25 unloaded in the last ten minutes, +5 only on disk."""
    if c.hot:
        return 50.0
    return 25.0 if c.recently_unloaded else 5.0


def score_memory_fit(c):
    """Up to +20 by the share of memory left free once the model is in."""
    if not c.mem_total:
        return 10.0
    free_after = c.mem_available - (0 if c.hot else c.model_size * LOAD_OVERHEAD)
    return 20.0 * min(1.0, max(0.0, free_after / c.mem_total) / 0.5)


def score_queue_depth(c):
    """Down to -30 as in-flight and queued requests fill twice the node's slots (or
    twice the concurrency learned for it, when that is lower)."""
    return -30.0 * min(1.0, (c.active + c.waiting) / (2.0 * max(1, c.limit or c.slots)))


def estimate_wait_s(c):
    """Seconds before this request would start: queued work plus any cold load (or what
    is left of one under way)."""
    return c.work_ahead_s + c.loading_s + (0.0 if c.hot else c.load_estimate_s)


def expected_s(c):
    """Seconds until this request would be answered here, or 0 when nothing is known."""
    return estimate_wait_s(c) + c.service_s if c.service_s else 0.0


def score_wait_time(c):
    """Down to -25 as the estimated wait reaches a minute."""
    return -25.0 * min(1.0, estimate_wait_s(c) / 60.0)


def _weight_class(size, thresholds):
    return sum(size >= t for t in thresholds)


def score_role_affinity(c):
    """Up to +15 when the model's weight class matches the machine's."""
    if not c.mem_total or not c.model_size:
        return 7.5
    model_class = _weight_class(c.model_size, (6 * GIB, 24 * GIB))
    node_class = _weight_class(c.mem_total, (24 * GIB, 96 * GIB))
    return 15.0 * (1 - abs(model_class - node_class) / 2)


def score_availability(c):
    """Up to +10 for an idle CPU that is not getting busier; 0 when degraded; -100 on a
    battery its owner asked to spare (FLEET_NODE_ON_BATTERY=avoid): more than slowness
    alone costs another node (-60), so work goes there only when the others are slow
    and swamped too, or have not the model. A node that learns its owner's habits says how
    available it is (0..1) and how fast its owner's CPU use moves (points a minute);
    that is used instead of its CPU when it does."""
    if c.on_battery:
        return -100.0
    if c.degraded:
        return 0.0
    if c.availability is not None:
        return max(0.0, min(10.0, 10.0 * c.availability - c.availability_trend / 5.0))
    return max(0.0, min(10.0, 10.0 * (1 - c.cpu_percent / 100.0) - c.cpu_trend / 5.0))


def score_speed(c):
    """Down to -60 as the expected completion here reaches 1.5 times the fastest
    candidate's (shortest expected delay, from learned speed; 0 when nothing is
    learned). Steep on purpose: 25 % slower outweighs a request already running, since
    the wait for that request is in the expected completion already."""
    mine = expected_s(c)
    if not mine or not c.fastest_s:
        return 0.0
    return -60.0 * min(1.0, (mine - c.fastest_s) / max(c.fastest_s, 0.05) / 0.5)


def saturated(c):
    """No slot free here: as many requests run or wait as the node takes at once."""
    return c.active + c.waiting >= max(1, c.limit or c.slots)


def score_session(c):
    """+25 for the node that answered the conversation's last turn, while the model is
    hot there and a slot is free: Ollama reuses the prompt it has cached."""
    return 25.0 if c.session and c.hot and not saturated(c) else 0.0


def score_context_fit(c):
    """Up to +10 when the context asked for fits without a reload."""
    if not c.requested_ctx:
        return 10.0 if c.hot else 5.0
    if c.hot and c.loaded_ctx:
        return 10.0 if c.requested_ctx <= c.loaded_ctx else 0.0
    if c.model_max_ctx and c.requested_ctx > c.model_max_ctx:
        return 0.0
    return 5.0


SIGNALS = (
    ("thermal", score_thermal),
    ("memory_fit", score_memory_fit),
    ("queue_depth", score_queue_depth),
    ("wait_time", score_wait_time),
    ("role_affinity", score_role_affinity),
    ("availability", score_availability),
    ("context_fit", score_context_fit),
    ("speed", score_speed),  # the two signals learning adds to the documented seven
    ("session", score_session),
)


def score_candidate(c):
    """(total, {signal: points}) for one candidate."""
    breakdown = {name: round(fn(c), 2) for name, fn in SIGNALS}
    return round(sum(breakdown.values()), 2), breakdown


def rank_candidates(candidates):
    """[(score, breakdown, candidate)] best first; ties go to the shorter queue."""
    known = [expected_s(c) for c in candidates if expected_s(c)]
    fastest = min(known) if len(known) > 1 else 0.0
    for c in candidates:
        c.fastest_s = fastest
    scored = [(*score_candidate(c), c) for c in candidates]
    scored.sort(key=lambda t: (-t[0], t[2].active + t[2].waiting, t[2].node_id))
    return scored


# -- placement: which models should be hot where (issue 20) --------------------------
#
# Theory: when more models are pulled than the machines hold, where a model lives decides
# the answer time more than any queue: a cold load costs seconds, and evicting a model
# still in demand costs that load again soon after. So the plan is a choice of what is
# hot where, judged by one figure: the seconds of work the fleet spends on the demand
# over the next PLAN_HORIZON_S, plus the seconds of every load the plan asks for.
#   - A model's demand (seconds of service a second, at speed 1) is split over the
#     nodes it is hot on by their capacity (speed x slots); on a node of speed s a second
#     of it takes 1/s, stretched as the node's slots fill (queue_stretch).
#   - A model with demand that is hot nowhere pays COLD_FACTOR times the slowest
#     machine's most stretched time: every request of it would wait for a load.
# The search starts from what is loaded now and takes, one at a time, the best move
# (load a model into free room, or in place of one loaded there, or two nodes trading a
# model each) while it lowers the figure by more than its loads cost (a local search,
# not an optimum: fleets are a few nodes and models). So the busiest model goes first
# to the fastest node that has it, a model whose demand one node cannot carry gets a
# replica, and a small shift in demand moves nothing: a move must pay for its loads
# (and for what the model it evicts will cost cold) within the horizon. A model is only
# ever planned where it fits: on the node's disk, within OLLAMA_MAX_LOADED_MODELS and
# its memory. Kind (chat, embedding, image) needs no rule of its own: a small embedding
# model fits beside a chat model by memory, and evicting the busier chat model for it
# never pays.

PLAN_HORIZON_S = 300.0  # a move must pay for itself within five minutes of demand
COLD_FACTOR = 10.0      # a model hot nowhere: each request waits for a load
MAX_BUSY = 0.95         # the queue stretch reaches 1 / 0.05 = 20 times here, then
OVERLOAD_MAX = COLD_FACTOR / 2  # grows with the overload up to this many times that


FIT_SAMPLES = 20  # an observation weighs as many samples as it has, up to this
FIT_ROUNDS = 50


def fit_speeds(observations, sizes):
    """Each node's decode speed relative to the fastest (1.0), from observations
    [(node_id, model, tokens/s, samples)] and the models' sizes in bytes. Decoding is
    taken as node speed times model speed (in logs a + b), fitted by weighted least
    squares, so that nodes that timed a model in common, directly or through a chain
    of others, compare exactly. Between groups of nodes that share no model the data
    cannot tell a fast node from a light model, so the two guesses are met half-way: a
    model is slower as its weights grow (decoding reads them all for every token), and
    the group's nodes are as fast as the largest group's. A node with no observation
    is not in the answer."""
    obs = [(n, m, math.log(tps), min(samples, FIT_SAMPLES))
           for n, m, tps, samples in observations if tps > 0 and samples > 0]
    prior = {m: -math.log(max(sizes.get(m) or 0, 1e6)) for _, m, _, _ in obs}
    groups = [_fit_group([o for o in obs if o[0] in nodes], prior)
              for nodes in _sharing_groups(obs)]
    if not groups:
        return {}
    largest = max(groups, key=lambda g: g[1])[0]
    level = statistics.fmean(largest.values())
    a = {}
    for speeds, _ in groups:
        gap = (level - statistics.fmean(speeds.values())) / 2
        a.update({n: v + (gap if speeds is not largest else 0.0) for n, v in speeds.items()})
    top = max(a.values())
    return {n: math.exp(v - top) for n, v in a.items()}


def _sharing_groups(obs):
    """The sets of nodes linked by models timed in common, directly or by a chain."""
    parent = {}

    def root(key):
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for n, m, _, _ in obs:
        parent[root(("node", n))] = root(("model", m))
    groups = collections.defaultdict(set)
    for n, _, _, _ in obs:
        groups[root(("node", n))].add(n)
    return list(groups.values())


def _fit_group(obs, prior):
    """({node: log speed}, weight) for one sharing group, its level set so that its
    models sit on the size law on average."""
    a, b = {}, {m: prior[m] for _, m, _, _ in obs}  # b: the models', from the size law
    for _ in range(FIT_ROUNDS):
        a = _fit_side(obs, 0, b)
        b = _fit_side(obs, 1, a)
    shift = statistics.fmean(b[m] - prior[m] for m in b)
    return {n: v + shift for n, v in a.items()}, sum(w for _, _, _, w in obs)


def _fit_side(obs, side, other):
    """One half-step of the fit: each node's (side 0) or model's (side 1) log speed,
    the weighted mean of what its observations say given the other side's."""
    total, weight = collections.defaultdict(float), collections.defaultdict(float)
    for row in obs:
        total[row[side]] += row[3] * (row[2] - other[row[1 - side]])
        weight[row[side]] += row[3]
    return {k: total[k] / weight[k] for k in total}


@dataclass(frozen=True)
class PlanNode:
    """What fits on one node, and how fast it is."""

    node_id: str
    memory: int = 0      # bytes for models (0: unknown, no limit)
    max_loaded: int = 0  # OLLAMA_MAX_LOADED_MODELS (0: no limit)
    speed: float = 1.0   # relative: learned tokens/s, or a guess from its size
    slots: int = 1


@dataclass(frozen=True)
class PlanModel:
    """One model's size, demand and where it can be loaded (and how long that takes)."""

    name: str
    size: int            # bytes once loaded
    demand: float        # seconds of service a second, at speed 1 (rate x work)
    load_s: dict         # node_id -> seconds to load it there; other nodes lack it
    kind: str = "chat"   # chat, embedding or image: all placed by the same rule
    # Its demand stopped (no new conversation for a while): it keeps the places it has
    # while they pay, but is loaded nowhere new. Moved to the slowest machine as a
    # shift began, a fader's follow-ups made it look worth a place for seconds more.
    fading: bool = False


@dataclass
class Plan:
    """Which models should be hot where, why, and the moves from what is loaded now."""

    hot: dict            # node_id -> sorted tuple of model names
    reasons: dict        # (model, node_id) -> one line
    loads: list          # [(model, node_id)] to load
    unloads: list        # [(model, node_id)] to unload (keep_alive 0)
    unplaced: dict       # model with demand -> why it is hot nowhere


def fits_on(model, node, hot, models):
    """Whether `model` can join the models `hot` on `node`: on its disk, within its
    loaded-model limit and its memory."""
    if node.node_id not in model.load_s:
        return False
    if node.max_loaded and len(hot) >= node.max_loaded:
        return False
    used = sum(models[name].size for name in hot if name in models)
    return not node.memory or used + model.size <= node.memory


def placement_cost(hot, nodes, models):
    """Seconds of work the demand costs over the horizon with these models hot."""
    capacity = {n.node_id: n.speed * max(1, n.slots) for n in nodes}
    busy, share = dict.fromkeys(capacity, 0.0), {}
    for m in models.values():
        places = [n for n in capacity if m.name in hot[n]]
        total = sum(capacity[n] for n in places)
        share[m.name] = {n: capacity[n] / total for n in places}
        for n in places:
            busy[n] += m.demand * share[m.name][n] / capacity[n]
    speed = {n.node_id: n.speed for n in nodes}
    slots = {n.node_id: max(1, n.slots) for n in nodes}
    slowest = min(speed.values(), default=1.0)
    cost = 0.0
    for m in models.values():
        if not share[m.name]:  # worse than the most crowded place: never chosen over one
            # (but a model whose demand stopped costs only its last requests' loads)
            cost += m.demand * COLD_FACTOR / slowest / (1.0 if m.fading else 1.0 - MAX_BUSY)
        for n, part in share[m.name].items():
            cost += m.demand * part / speed[n] * queue_stretch(busy[n], slots[n])
    return cost * PLAN_HORIZON_S


def queue_stretch(busy, slots):
    """How much longer than its own run a request takes on a node this busy: the chance
    that every slot is taken grows like busy ** slots (Erlang C's shape at low load), so
    a node with spare slots stretches nothing and a one-slot node is M/M/1's 1/(1-busy).
    Past MAX_BUSY the queue only grows: the stretch grows with the square of the
    overload, up to OVERLOAD_MAX times. (Held at MAX_BUSY's, a place twice overloaded
    cost no more than one just full, and a plan that put a 30 % model on the slowed
    laptop, or a riser on the mini, seemed hardly worse than one that did not.)"""
    overload = min(OVERLOAD_MAX, max(1.0, busy / MAX_BUSY) ** 2)
    return overload / (1.0 - min(busy, MAX_BUSY) ** slots)


@dataclass
class Move:
    """One step of the search: the loads it asks for, what each one replaces."""

    loads: tuple  # ((model, node_id, replaced model or None), ...)

    def apply(self, hot):
        after = dict(hot)
        for name, node_id, replaced in self.loads:
            after[node_id] = after[node_id] - {replaced} | {name}
        return after


def candidate_moves(hot, nodes, models):
    """Every move the plan could make next: a load into free room or in place of one
    model, and two nodes trading a model each (the busier one onto the faster node)."""
    for node in nodes:
        here = hot[node.node_id]
        for replaced in (None, *sorted(here)):
            for m in models.values():
                if m.demand > 0 and not m.fading and m.name not in here and \
                        fits_on(m, node, here - {replaced}, models):
                    yield Move(((m.name, node.node_id, replaced),))
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            yield from trades(a, b, hot, models)


def trades(a, b, hot, models):
    """Moves that swap a model on node a with one on node b."""
    on_a, on_b = hot[a.node_id], hot[b.node_id]
    for x in sorted(on_a - on_b):
        for y in sorted(on_b - on_a):
            if models[x].fading or models[y].fading:
                continue  # a trade gives each a new place
            if fits_on(models[x], b, on_b - {y}, models) and \
                    fits_on(models[y], a, on_a - {x}, models):
                yield Move(((y, a.node_id, x), (x, b.node_id, y)))


def best_move(hot, nodes, models, cost):
    """The move that lowers the cost most, net of its loads, with its gross saving; or
    None when none pays for its loads."""
    best = None
    for move in candidate_moves(hot, nodes, models):
        saving = cost - placement_cost(move.apply(hot), nodes, models)
        net = saving - sum(models[name].load_s[node_id] for name, node_id, _ in move.loads)
        if net > 1e-9 and (best is None or net > best[0]):
            best = (net, saving, move)
    return best


def explain_load(name, replaced, saving, load_s, cold):
    """The one-line reason for a load the plan makes."""
    why = ("hot nowhere" if cold else
           f"saves {saving:.0f} s of work and waiting over {PLAN_HORIZON_S:.0f} s, for "
           f"{load_s:.1f} s of loading")
    return f"loaded: {why}" + (f", in place of {replaced}" if replaced else "")


def keep_current(nodes, models, current):
    """What is loaded now, kept where it still fits (a model never planned where it
    does not fit), in the order it is listed."""
    hot = {n.node_id: set() for n in nodes}
    reasons = {}
    for node in nodes:
        for name in current.get(node.node_id, ()):
            m = models.get(name)
            if m is not None and fits_on(m, node, hot[node.node_id], models):
                hot[node.node_id].add(name)
                reasons[name, node.node_id] = (
                    f"kept: {m.demand:.2f} s/s of demand" if m.demand > 0
                    else "kept: no demand now, unloaded when its room is needed")
    return hot, reasons


def plan_placement(nodes, models, current):
    """The placement plan for these nodes (PlanNode) and models (PlanModel), starting
    from `current` (node_id -> names: what is loaded now, or the last plan, which the
    router starts from so that a load it did not plan does not become the plan); see
    the theory above."""
    models = {m.name: m for m in models}
    hot, reasons = keep_current(nodes, models, current)
    cost = placement_cost(hot, nodes, models)
    for _ in range(2 * len(models) * max(1, len(nodes))):  # each move lowers the cost
        found = best_move(hot, nodes, models, cost)
        if found is None:
            break
        _, saving, move = found
        placed = {name for names in hot.values() for name in names}
        load_s = sum(models[name].load_s[node_id] for name, node_id, _ in move.loads)
        for name, node_id, replaced in move.loads:
            reasons.pop((replaced, node_id), None)
            reasons[name, node_id] = explain_load(name, replaced, saving, load_s,
                                                  name not in placed)
        hot = move.apply(hot)
        cost = placement_cost(hot, nodes, models)
    return describe_plan(hot, reasons, nodes, models, current)


def describe_plan(hot, reasons, nodes, models, current):
    """The Plan: hot sets, reasons, the loads and unloads from `current`, and why a
    model with demand is hot nowhere."""
    was = {n.node_id: set(current.get(n.node_id, ())) for n in nodes}
    placed = {name for names in hot.values() for name in names}
    unplaced = {}
    for m in models.values():
        if m.demand > 0 and m.name not in placed:
            unplaced[m.name] = ("no node has room for it (busier models fill them)"
                                if any(fits_on(m, n, set(), models) for n in nodes)
                                else "fits on no node (disk, memory)")
    return Plan(hot={n: tuple(sorted(names)) for n, names in hot.items()},
                reasons=reasons,
                loads=sorted((m, n) for n in hot for m in hot[n] - was[n]),
                unloads=sorted((m, n) for n in hot for m in was[n] - hot[n]),
                unplaced=unplaced)


####################################################################################
# Metrics: counters and histograms in the Prometheus text format
####################################################################################

SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _labels(pairs):
    """{a="x",b="y"}, escaped as the exposition format asks."""
    if not pairs:
        return ""
    esc = (lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"')
           .replace("\n", "\\n"))
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in pairs) + "}"


class Metrics:
    """In-memory counters and histograms; render() writes the text format."""

    def __init__(self):
        self.help = {}  # name -> (type, help)
        self.counters = collections.defaultdict(float)  # (name, labels) -> value
        self.histograms = {}  # (name, labels) -> [per-bucket counts..., sum, count]

    def describe(self, name, kind, text):
        self.help[name] = (kind, text)

    def inc(self, name, labels=(), value=1.0):
        self.counters[(name, tuple(labels))] += value

    def observe(self, name, labels, value):
        h = self.histograms.get((name, tuple(labels)))
        if h is None:
            h = self.histograms[(name, tuple(labels))] = [0] * len(SECONDS_BUCKETS) + [0.0, 0]
        for i, bound in enumerate(SECONDS_BUCKETS):
            if value <= bound:
                h[i] += 1
        h[-2] += value
        h[-1] += 1

    def render(self, gauges=()):
        """The text format; `gauges` are (name, labels, value) read at scrape time."""
        samples = collections.defaultdict(list)
        for (name, labels), value in self.counters.items():
            samples[name].append(f"{name}{_labels(labels)} {value:g}")
        for name, labels, value in gauges:
            samples[name].append(f"{name}{_labels(labels)} {value:g}")
        for (name, labels), h in self.histograms.items():
            for bound, count in zip(SECONDS_BUCKETS, h):
                samples[name].append(f"{name}_bucket{_labels(labels + (('le', bound),))} "
                                     f"{count}")
            samples[name].append(f"{name}_bucket{_labels(labels + (('le', '+Inf'),))} "
                                 f"{h[-1]}")
            samples[name].append(f"{name}_sum{_labels(labels)} {h[-2]:g}")
            samples[name].append(f"{name}_count{_labels(labels)} {h[-1]}")
        out = []
        for name, (kind, text) in self.help.items():
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples.get(name, [])]
        return "\n".join(out) + "\n"


####################################################################################
# Trace store: SQLite request_traces, one writer thread fed by a bounded queue
#
# The trace contract: one row per request (and one per failed attempt that was tried
# again elsewhere), in the columns below, with one of these statuses. The dashboard,
# /dashboard/api/requests?status= and the sqlite3 lines in the README use the same
# words. Every query the router makes is a method of TraceStore, next to the schema.
####################################################################################

COMPLETED = "completed"    # answered (an HTTP status below 400)
REJECTED = "rejected"      # refused with a 4xx: a bad request, an unknown model, ...
FAILED = "failed"          # no answer: every node failed, a 5xx, stopped by the reaper
INCOMPLETE = "incomplete"  # the answer broke off after its first chunk reached the client
CANCELLED = "cancelled"    # the client went away first
RETRIED = "retried"        # one attempt that failed before its first chunk (not a request)
TRACE_STATUSES = (COMPLETED, REJECTED, FAILED, INCOMPLETE, CANCELLED, RETRIED)

TRACE_SCHEMA_VERSION = 6  # 2: tags; 3: Ollama's load, prompt and decode timings;
# 4: learned_speed's service time, answer length, model size and speed by concurrency;
# 5: the request's kind (REQUEST_KINDS); 6: the node's own name for the model
TRACE_COLUMNS = (
    ("request_id", "TEXT"), ("timestamp", "REAL"), ("model", "TEXT"),
    ("requested_model", "TEXT"), ("node_id", "TEXT"), ("status", "TEXT"),
    ("http_status", "INTEGER"), ("latency_ms", "REAL"), ("ttft_ms", "REAL"),
    ("prompt_tokens", "INTEGER"), ("completion_tokens", "INTEGER"),
    ("retries", "INTEGER"), ("score", "REAL"), ("score_breakdown", "TEXT"),
    ("client_addr", "TEXT"), ("api_format", "TEXT"), ("endpoint", "TEXT"),
    ("stream", "INTEGER"), ("queue_wait_ms", "REAL"), ("error_message", "TEXT"),
    ("tags", "TEXT"),
    # Ollama's own timings from its final chunk (load_duration, prompt_eval_duration,
    # eval_duration), in ms; NULL where the API does not report them (OpenAI's).
    ("load_ms", "REAL"), ("prompt_eval_ms", "REAL"), ("eval_ms", "REAL"),
    ("kind", "TEXT"),  # schema 5: one of REQUEST_KINDS
    ("node_model", "TEXT"),  # schema 6: the node's own name for the model, if another
)
# What a request asks for, by its route: each kind has its own models and backends.
CHAT, EMBEDDING, IMAGE, TRANSCRIPTION, ADMIN_KIND = (
    "chat", "embedding", "image", "transcription", "admin")
REQUEST_KINDS = (CHAT, EMBEDDING, IMAGE, TRANSCRIPTION, ADMIN_KIND)
MEDIA_KINDS = (IMAGE, TRANSCRIPTION)  # the kinds an agent can serve itself
_TRACE_DDL = [
    "CREATE TABLE IF NOT EXISTS request_traces (id INTEGER PRIMARY KEY, "
    + ", ".join(f"{name} {kind}" for name, kind in TRACE_COLUMNS) + ")",
    # Covers the health API's day-long aggregate without touching the table.
    "CREATE INDEX IF NOT EXISTS idx_traces_window ON request_traces(timestamp, status, ttft_ms)",
    "CREATE INDEX IF NOT EXISTS idx_traces_model ON request_traces(model, timestamp)",
    "CREATE INDEX IF NOT EXISTS idx_traces_node ON request_traces(node_id, model, timestamp)",
]
TRACE_NAMES = tuple(name for name, _ in TRACE_COLUMNS)
_TRACE_INSERT = (f"INSERT INTO request_traces ({', '.join(n for n, _ in TRACE_COLUMNS)}) "
                 f"VALUES ({', '.join('?' for _ in TRACE_COLUMNS)})")
_ERRORS = f"status IN ('{FAILED}', '{INCOMPLETE}')"
# Decode speed as Ollama measured it: tokens over the time spent generating them.
_TOKENS_PER_S = (f"ROUND(SUM(CASE WHEN status = '{COMPLETED}' AND eval_ms > 0 "
                 f"THEN completion_tokens END) * 1000.0 / NULLIF(SUM(CASE WHEN "
                 f"status = '{COMPLETED}' AND eval_ms > 0 AND completion_tokens > 0 "
                 f"THEN eval_ms END), 0), 1) AS tokens_per_s")
# A whole (non-streamed) answer's first byte is its last: only streams have a first token.
_MEANS = (f"ROUND(AVG(CASE WHEN status = '{COMPLETED}' THEN latency_ms END), 1) "
          f"AS mean_latency_ms, ROUND(AVG(CASE WHEN status = '{COMPLETED}' AND stream = 1 "
          f"THEN ttft_ms END), 1) AS mean_ttft_ms, {_TOKENS_PER_S}")
# A time-out, in a trace's words: the router waited past its time-outs ("sent no
# response", "sent no data", "connect ... timed out") or a node said it timed out.
_TIMED_OUT = ("(COALESCE(error_message, '') LIKE '%sent no %' OR "
              "COALESCE(error_message, '') LIKE '%timed out%')")
_MEDIA = f"COALESCE(kind, '') IN ('{IMAGE}', '{TRANSCRIPTION}')"  # rows before schema 5: ''
_WINDOW_SQL = (
    "SELECT status, node_id, COUNT(*) AS n, AVG(ttft_ms) AS ttft "
    "FROM request_traces WHERE timestamp > ? GROUP BY status, node_id")
# Requests with a time-out: a request's rows (each attempt that timed out, its final row
# that says so again) count once. Images and speech are counted per node (_MEDIA_SQL).
_TIMEOUTS_SQL = (
    f"SELECT COUNT(DISTINCT request_id) AS n FROM request_traces "
    f"WHERE timestamp > ? AND {_TIMED_OUT} AND NOT {_MEDIA}")
# Per node and media kind: the requests sent there, and those that timed out there or
# failed there otherwise. A request's rows on one node (the attempt retried elsewhere,
# and the final row when no other node could answer) count as one.
_MEDIA_SQL = (
    f"SELECT kind, node_id, COUNT(DISTINCT request_id) AS requests, "
    f"COUNT(DISTINCT CASE WHEN {_TIMED_OUT} THEN request_id END) AS timeouts, "
    f"COUNT(DISTINCT CASE WHEN status IN ('{FAILED}', '{INCOMPLETE}', '{RETRIED}') "
    f"AND NOT {_TIMED_OUT} THEN request_id END) AS failed "
    f"FROM request_traces WHERE timestamp > ? AND {_MEDIA} AND node_id IS NOT NULL "
    f"GROUP BY kind, node_id ORDER BY kind, node_id")
_VITALS_SQL = (  # one pass over the covering index: no sort, fast on a day of traces
    f"SELECT COALESCE(SUM(status != '{RETRIED}'), 0) AS requests, "
    f"COALESCE(SUM({_ERRORS}), 0) AS failed, "
    f"AVG(CASE WHEN status = '{COMPLETED}' THEN ttft_ms END) AS ttft "
    f"FROM request_traces WHERE timestamp > ?")
_MODEL_USAGE_SQL = (
    f"SELECT model, node_id, COUNT(*) AS requests, SUM({_ERRORS}) AS errors, {_MEANS} "
    f"FROM request_traces WHERE timestamp > ? AND status != '{RETRIED}' "
    f"GROUP BY model, node_id ORDER BY model, requests DESC")
# Tokens are Ollama's counts as the trace keeps them: prompt (prompt_eval_count) and
# completion (eval_count, the generated tokens), summed apart.
_TOKEN_SUMS = ("COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens, "
               "COALESCE(SUM(completion_tokens), 0) AS completion_tokens")
_TRENDS_SQL = (
    f"SELECT CAST(timestamp / ? AS INTEGER) * ? AS t, COUNT(*) AS requests, "
    f"SUM({_ERRORS}) AS errors, {_MEANS}, {_TOKEN_SUMS} "
    f"FROM request_traces WHERE timestamp > ? AND status != '{RETRIED}' "
    f"GROUP BY t ORDER BY t")
# A window's totals (the dashboard's overview): outcomes, tokens, and the completion
# tokens and Ollama's decode time of the answers that report both (decode speed).
_DECODED = f"status = '{COMPLETED}' AND eval_ms > 0 AND completion_tokens > 0"
_TOTALS_SQL = (
    f"SELECT COUNT(*) AS requests, COALESCE(SUM({_ERRORS}), 0) AS errors, "
    f"COALESCE(SUM(status = '{REJECTED}'), 0) AS rejected, "
    f"COALESCE(SUM(status = '{CANCELLED}'), 0) AS cancelled, {_TOKEN_SUMS}, "
    f"SUM(CASE WHEN {_DECODED} THEN completion_tokens END) AS decoded_tokens, "
    f"SUM(CASE WHEN {_DECODED} THEN eval_ms END) AS decode_ms "
    f"FROM request_traces WHERE timestamp > ? AND status != '{RETRIED}'")
# The columns percentiles are taken of, each over the completed requests it means
# something for: a whole (non-streamed) answer's first byte is its last, no first token.
PERCENTILE_COLUMNS = {"latency_ms": "", "ttft_ms": "AND stream = 1"}


def _percentile_sql(column, qs, grouped):
    """Nearest-rank percentiles (the value at rank ceil(q/100 * n)) of a completed
    request's `column` since :since, per :bucket seconds if `grouped`: SQLite sorts and
    ranks, so only the rows wanted come back, however many the window holds."""
    group = "CAST(timestamp / :bucket AS INTEGER) * :bucket" if grouped else "0"
    ranks = " OR ".join(f"rn = (n * {int(q)} + 99) / 100" for q in qs)
    return (f"SELECT t, rn, n, v FROM (SELECT {group} AS t, {column} AS v, "
            f"ROW_NUMBER() OVER (PARTITION BY {group} ORDER BY {column}) AS rn, "
            f"COUNT(*) OVER (PARTITION BY {group}) AS n FROM request_traces "
            f"WHERE timestamp > :since AND status = '{COMPLETED}' AND {column} IS NOT NULL "
            f"{PERCENTILE_COLUMNS[column]}) WHERE {ranks}")
_APPS_SQL = (
    f"SELECT tags, status, latency_ms, prompt_tokens, completion_tokens "
    f"FROM request_traces WHERE timestamp > ? AND tags IS NOT NULL "
    f"AND status != '{RETRIED}'")
_LATENCY_SQL = (
    f"SELECT node_id, model, AVG(latency_ms) AS latency, COUNT(*) AS n "
    f"FROM request_traces WHERE status = '{COMPLETED}' AND timestamp > ? "
    f"AND node_id IS NOT NULL GROUP BY node_id, model")
# What the router has learned of each node+model's speed, kept across restarts: one row
# per node+model, rewritten as it changes, at most LEARNED_MAX_ROWS (the stalest go).
LEARNED_COLUMNS = (
    ("node_id", "TEXT"), ("model", "TEXT"), ("samples", "INTEGER"), ("ttft_ms", "REAL"),
    ("cold_ms", "REAL"), ("load_ms", "REAL"), ("prompt_eval_ms", "REAL"), ("queue_ms", "REAL"),
    ("decode_tps", "REAL"), ("prompt_tps", "REAL"), ("latency_ms", "REAL"),
    ("concurrency", "INTEGER"), ("updated_at", "REAL"),
    # schema 4: what a running request costs, and decode speed by requests in flight
    ("service_ms", "REAL"), ("tokens", "REAL"), ("size", "INTEGER"), ("levels", "TEXT"),
)
LEARNED_NAMES = tuple(name for name, _ in LEARNED_COLUMNS)
LEARNED_MAX_ROWS = 4096
LEARNED_MAX_AGE_S = 30 * 86400
_LEARNED_DDL = ("CREATE TABLE IF NOT EXISTS learned_speed ("
                + ", ".join(f"{name} {kind}" for name, kind in LEARNED_COLUMNS)
                + ", PRIMARY KEY (node_id, model))")
_LEARNED_UPSERT = (f"INSERT OR REPLACE INTO learned_speed ({', '.join(LEARNED_NAMES)}) "
                   f"VALUES ({', '.join('?' for _ in LEARNED_NAMES)})")
_LEARNED_PRUNE = ("DELETE FROM learned_speed WHERE updated_at < ? OR rowid NOT IN (SELECT "
                  "rowid FROM learned_speed ORDER BY updated_at DESC LIMIT ?)")
# The dashboard's trend ranges: name -> (span, bucket) in seconds.
TREND_RANGES = {"1h": (3600, 60), "6h": (6 * 3600, 600), "24h": (86400, 3600),
                "7d": (7 * 86400, 6 * 3600), "30d": (30 * 86400, 86400)}


def open_db(path, uri=False):
    db = sqlite3.connect(path, timeout=10, check_same_thread=False, uri=uri)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=10000")
    return db


def is_damaged(error):
    """Is this SQLite error a damaged file (not a database, or a malformed one), as
    against one that cannot be opened or written (permissions, a full disk)?"""
    return getattr(error, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB")


def set_aside(path, now=None):
    """Rename a damaged file to <path>.damaged-<local time> (never over another such
    file), so that a fresh one can start in its place and the old one can be looked
    at; returns the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    aside, n = f"{path}.damaged-{stamp}", 1
    while os.path.exists(aside):
        n += 1
        aside = f"{path}.damaged-{stamp}-{n}"
    os.replace(path, aside)
    return aside


class TraceQueries:
    """The router's reads of the trace table, for the dashboard and the health checks:
    each runs off the event loop, with its own connection (TraceStore.query, which the
    class that takes these in gives). The writer is TraceStore alone."""

    async def _read(self, sql, params=()):
        return await asyncio.to_thread(self.query, sql, params)

    async def health_window(self, since):
        """Requests by outcome and node since `since` (the health checks' window)."""
        out, by_node = collections.Counter(), collections.Counter()
        ttft_sum = ttft_n = 0.0
        for r in await self._read(_WINDOW_SQL, (since,)):
            out[r["status"]] += r["n"]
            if r["status"] != RETRIED:
                out["requests"] += r["n"]
                by_node[r["node_id"]] += r["n"]
            if r["ttft"] is not None and r["status"] == COMPLETED:
                ttft_sum += r["ttft"] * r["n"]
                ttft_n += r["n"]
        return {"requests": out["requests"], "failed": out[FAILED] + out[INCOMPLETE],
                "retried": out[RETRIED], "cancelled": out[CANCELLED],
                "incomplete": out[INCOMPLETE],
                "timeouts": (await self._read(_TIMEOUTS_SQL, (since,)))[0]["n"],
                "requests_by_node": dict(by_node),
                "mean_ttft_ms": round(ttft_sum / ttft_n, 1) if ttft_n else None}

    async def media_window(self, since):
        """Per node and media kind since `since`: requests, timeouts, failed."""
        return await self._read(_MEDIA_SQL, (since,))

    async def vitals(self, since):
        """{requests, failed, ttft} since `since`: the health API's day."""
        return (await self._read(_VITALS_SQL, (since,)))[0]

    async def model_usage(self, since):
        """Per model and node: requests, errors, mean latency, time to first token and
        decode speed since `since`."""
        return await self._read(_MODEL_USAGE_SQL, (since,))

    async def trends(self, span, bucket):
        """The same figures per `bucket` seconds over the last `span` seconds, from the
        start of the bucket it begins in (so that no bucket is a part-bucket but the
        current one). Buckets with no request are not listed."""
        cached = self._trend_cache.get(span)
        if cached is None or cached[0] < time.monotonic():
            # A month of traces takes about a second to group (300k rows measured), and
            # the dashboard polls every 3 s: keep long ranges for a tenth of a bucket.
            since = (time.time() - span) // bucket * bucket
            rows = await self._read(_TRENDS_SQL, (bucket, bucket, since))
            keep = bucket / 10 if span > 86400 else 0.0
            cached = self._trend_cache[span] = (time.monotonic() + keep, rows)
        return cached[1]

    async def totals(self, since):
        """Requests since `since` by outcome, their prompt and completion tokens, and
        the completion tokens and decode milliseconds of those that report both."""
        return (await self._read(_TOTALS_SQL, (since,)))[0]

    async def percentiles(self, column, since, qs=(50, 95), bucket=None):
        """Nearest-rank percentiles of `column` (one of PERCENTILE_COLUMNS) over the
        requests completed since `since`: {q: value}; with `bucket`, {bucket start:
        {q: value}} for the buckets that have any."""
        if column not in PERCENTILE_COLUMNS:
            raise ValueError(column)
        rows = await self._read(_percentile_sql(column, qs, bucket is not None),
                                {"since": since, "bucket": bucket or 1})
        found = collections.defaultdict(dict)
        for r in rows:
            for q in qs:
                if r["rn"] == (r["n"] * q + 99) // 100:
                    found[r["t"]][q] = r["v"]
        return dict(found) if bucket is not None else found.get(0, {})

    async def recent(self, since, limit, status=None, model=None, node_id=None, tag=None):
        """The newest `limit` traces since `since`, filtered by whichever are given."""
        where, params = ["timestamp > ?"], [since]
        for column, value in (("status", status), ("model", model), ("node_id", node_id)):
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        if tag:  # a whole tag of the comma list; % and _ in it are only characters
            where.append("(',' || tags || ',') LIKE ? ESCAPE '\\'")
            literal = tag.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            params.append(f"%,{literal},%")
        params.append(int(limit))
        return await self._read(f"SELECT * FROM request_traces WHERE {' AND '.join(where)} "
                                f"ORDER BY timestamp DESC LIMIT ?", params)

    async def app_usage(self, since):
        """Per tag (an app's X-Herd-Tags): requests, errors, mean latency, prompt and
        completion tokens (and `tokens`, the two added up)."""
        apps = {}
        for r in await self._read(_APPS_SQL, (since,)):
            for tag in r["tags"].split(","):
                a = apps.setdefault(tag, {"tag": tag, "requests": 0, "errors": 0,
                                          "latency_ms_total": 0.0, "tokens": 0,
                                          "prompt_tokens": 0, "completion_tokens": 0})
                a["requests"] += 1
                a["errors"] += r["status"] in (FAILED, INCOMPLETE)
                a["latency_ms_total"] += r["latency_ms"] or 0.0
                a["prompt_tokens"] += r["prompt_tokens"] or 0
                a["completion_tokens"] += r["completion_tokens"] or 0
                a["tokens"] = a["prompt_tokens"] + a["completion_tokens"]
        for a in apps.values():
            a["mean_latency_ms"] = round(a.pop("latency_ms_total") / a["requests"], 1)
        return sorted(apps.values(), key=lambda a: -a["requests"])

    async def mean_latencies(self, since):
        """[(node_id, model, mean latency in s, completed requests)] since `since`."""
        rows = await self._read(_LATENCY_SQL, (since,))
        return [(r["node_id"], r["model"], r["latency"] / 1000, r["n"]) for r in rows]


class TraceStore(TraceQueries):
    """Rows wait in memory; one thread writes them in batches.

    The writer is woken once per batch, not per row: a wake-up per row costs the event
    loop a GIL hand-over (a futex round trip) on every request.

    A damaged database is set aside (set_aside) and a fresh one started; a data folder
    that cannot hold one (read-only, full) leaves the traces in memory for this run,
    the newest MEMORY_ROWS of them. `trouble` says which, for the health checks.
    """

    BATCH_WAIT_S = 0.1
    BATCH_ROWS = 500
    MEMORY_ROWS = 20000  # about 15 MB of traces kept when they cannot go to disk

    def __init__(self, path, max_queue=10000, retention_days=0):
        self.path = path
        self.retention_days = retention_days
        self.max_queue = max_queue
        self._pruned_at = 0.0
        self._rows = collections.deque()
        self._wake = threading.Event()
        self._armed = False  # the writer has been woken for the rows now waiting
        self._hurry = False  # flush() waits: write without gathering
        self._stopping = False
        self._progress = threading.Condition()
        # Each counter has one writing thread: the loop's, or the writer's.
        self.queued = self.dropped_full = 0
        self.written = self.failed = 0
        self._thread = None
        self._trend_cache = {}  # span in seconds -> (monotonic expiry, rows)
        self._learned = None  # the newest learned-speed rows waiting to be written
        self.trouble = None  # {"problem": "damaged" or "in_memory", "detail", "file", ...}
        self._memory = None  # the connection that keeps an in-memory store alive

    def start(self):
        """Open (or make) the database, then start the writer; never raises for a
        damaged file or a folder that cannot hold it (see the class)."""
        try:
            self._set_up()
        except (sqlite3.Error, OSError) as e:
            self._recover(e)
        self._thread = threading.Thread(target=self._write_loop, name="trace-writer",
                                        daemon=True)
        self._thread.start()

    def _recover(self, error):
        """A fresh file in place of a damaged one; failing that, memory."""
        log = logging.getLogger("herd.traces")
        if is_damaged(error):
            try:
                aside = set_aside(self.path)
                for suffix in ("-wal", "-shm"):  # the damaged file's own journal
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path + suffix)
                log.error(f"{self.path} is damaged ({error}): moved to {aside}; "
                          f"starting a fresh one", extra={"event": "traces_damaged"})
                self.trouble = {"problem": "damaged", "detail": str(error), "file": aside}
                return self._set_up()
            except (sqlite3.Error, OSError) as e:
                error = e
        log.error(f"cannot keep traces in {self.path} ({error}): keeping the newest "
                  f"{self.MEMORY_ROWS} in memory until the router stops",
                  extra={"event": "traces_in_memory"})
        self.trouble = {"problem": "in_memory", "detail": str(error), "file": self.path,
                        "moved_to": (self.trouble or {}).get("file")}
        self._memory = open_db(f"file:herd-traces-{id(self)}?mode=memory&cache=shared",
                               uri=True)
        self._set_up()

    def _set_up(self):
        """Make the schema (or add what an older version's lacks), prune old rows."""
        if self._memory is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        db = self._connect()
        try:
            with db:
                self._make_schema(db)
            self.prune(db, check=True)
        finally:
            self._close(db)

    @staticmethod
    def _make_schema(db):
        db.execute(_TRACE_DDL[0])
        # A database from an older version gains the columns it lacks.
        have = {row[1] for row in db.execute("PRAGMA table_info(request_traces)")}
        for name, kind in TRACE_COLUMNS:
            if name not in have:
                db.execute(f"ALTER TABLE request_traces ADD COLUMN {name} {kind}")
        for ddl in _TRACE_DDL[1:]:  # the indexes, once their columns exist
            db.execute(ddl)
        db.execute(_LEARNED_DDL)
        have = {row[1] for row in db.execute("PRAGMA table_info(learned_speed)")}
        for name, kind in LEARNED_COLUMNS:
            if name not in have:
                db.execute(f"ALTER TABLE learned_speed ADD COLUMN {name} {kind}")
        db.execute(f"PRAGMA user_version={TRACE_SCHEMA_VERSION}")

    def _connect(self):
        """A connection for writing: to the file, or the in-memory store's own."""
        return open_db(self.path) if self._memory is None else self._memory

    def _close(self, db):
        if db is not self._memory:
            db.close()

    def record(self, row):
        """Queue one trace row (a dict of TRACE_COLUMNS); never blocks."""
        self.queued += 1
        if len(self._rows) >= self.max_queue:
            self.dropped_full += 1
            return
        self._rows.append(tuple(map(row.get, TRACE_NAMES)))
        if not self._armed:
            self._armed = True
            self._wake.set()

    @property
    def dropped(self):
        """Rows lost: the queue was full, or SQLite refused them."""
        return self.dropped_full + self.failed

    def flush(self):
        """Block until every row recorded so far is written (or dropped)."""
        target = self.queued
        self._hurry = True
        self._wake.set()
        with self._progress:
            self._progress.wait_for(
                lambda: self.written + self.failed + self.dropped_full >= target
                or self._thread is None or not self._thread.is_alive())

    def close(self):
        """Write what is waiting, then stop the writer thread (traces kept in memory
        go with it)."""
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None
        if self._memory is not None:
            self._memory.close()

    def _write_loop(self):
        db = self._connect()
        try:
            while True:
                self._wake.wait()
                if not (self._stopping or self._hurry):
                    time.sleep(self.BATCH_WAIT_S)  # gather: one commit per batch
                self._wake.clear()
                self._armed = self._hurry = False
                while self._rows:
                    rows = [self._rows.popleft()
                            for _ in range(min(self.BATCH_ROWS, len(self._rows)))]
                    self._write(db, rows)
                learned, self._learned = self._learned, None
                if learned:
                    self._write_learned(db, learned)
                with self._progress:
                    self._progress.notify_all()
                if time.monotonic() - self._pruned_at > self.PRUNE_EVERY_S or \
                        self._memory is not None:
                    self.prune(db)  # here, so only this thread ever writes
                if self._stopping:
                    return
        finally:
            self._close(db)
            with self._progress:
                self._progress.notify_all()

    PRUNE_EVERY_S = 3600

    def prune(self, db=None, check=False):
        """Delete traces older than the retention period (in memory, all but the newest
        MEMORY_ROWS too); returns how many. `check`: raise what SQLite says, rather
        than log it (at start, where a damaged file is set aside)."""
        self._pruned_at = time.monotonic()
        if not self.retention_days and self._memory is None:
            return 0
        own = db is None
        db = db or self._connect()
        try:
            with db:
                cur = db.execute("DELETE FROM request_traces WHERE timestamp < ?",
                                 (time.time() - self.retention_days * 86400
                                  if self.retention_days else 0,))
                count = cur.rowcount
                if self._memory is not None:
                    count += db.execute("DELETE FROM request_traces WHERE id <= (SELECT "
                                        "MAX(id) FROM request_traces) - ?",
                                        (self.MEMORY_ROWS,)).rowcount
            return count
        except sqlite3.Error as e:
            if check:
                raise
            logging.getLogger("herd.traces").error("pruning old traces failed: %s", e)
            return 0
        finally:
            if own:
                self._close(db)

    def save_learned(self, rows):
        """Queue the learned-speed rows (dicts of LEARNED_COLUMNS) to be written; a newer
        call before the writer got to it replaces them. Never blocks."""
        self._learned = [tuple(map(row.get, LEARNED_NAMES)) for row in rows]
        if not self._armed:
            self._armed = True
            self._wake.set()

    def _write_learned(self, db, rows):
        try:
            with db:
                db.executemany(_LEARNED_UPSERT, rows)
                db.execute(_LEARNED_PRUNE, (time.time() - LEARNED_MAX_AGE_S, LEARNED_MAX_ROWS))
        except (sqlite3.Error, ValueError) as e:
            logging.getLogger("herd.traces").error("saving learned speeds failed: %s", e)

    async def load_learned(self):
        """The learned-speed rows saved by an earlier run (a list of dicts)."""
        return await self._read(f"SELECT {', '.join(LEARNED_NAMES)} FROM learned_speed "
                                f"WHERE updated_at > ? ORDER BY updated_at DESC LIMIT ?",
                                (time.time() - LEARNED_MAX_AGE_S, LEARNED_MAX_ROWS))

    def _write(self, db, rows):
        try:
            with db:
                db.executemany(_TRACE_INSERT, rows)
            self.written += len(rows)
        except (sqlite3.Error, ValueError) as e:  # ValueError: text SQLite cannot encode
            if len(rows) > 1:  # one bad row must not take its batch with it
                for row in rows:
                    self._write(db, [row])
                return
            self.failed += 1
            logging.getLogger("herd.traces").error("trace write failed: %s", e)

    def query(self, sql, params=()):
        """Read rows with a connection of its own; call it through asyncio.to_thread."""
        if self._memory is None:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        else:  # a reader of the shared in-memory store, never held up by the writer
            db = sqlite3.connect(f"file:herd-traces-{id(self)}?mode=memory&cache=shared",
                                 uri=True, timeout=10)
            db.execute("PRAGMA read_uncommitted=1")
        try:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(sql, params)]
        finally:
            db.close()


####################################################################################
# Node snapshot: what a heartbeat says about a machine and its Ollama
####################################################################################

OLLAMA_SETTING_VARS = ("OLLAMA_NUM_PARALLEL", "OLLAMA_MAX_LOADED_MODELS", "OLLAMA_KEEP_ALIVE",
                       "OLLAMA_CONTEXT_LENGTH", "OLLAMA_MAX_QUEUE", "OLLAMA_FLASH_ATTENTION",
                       "OLLAMA_KV_CACHE_TYPE")


def short_hostname():
    return socket.gethostname().split(".")[0] or "node"


def memory_pressure(percent_used):
    """normal / warning / critical from the share of memory in use."""
    if percent_used >= 95:
        return "critical"
    return "warning" if percent_used >= 85 else "normal"


def read_machine(psutil, disk_path):
    """Hardware and load figures; blocking, so call it through asyncio.to_thread."""
    vm = psutil.virtual_memory()
    try:
        disk = psutil.disk_usage(disk_path)
        disk_info = {"total": disk.total, "free": disk.free}
    except OSError:
        disk_info = {}
    return {
        "os": platform.system(), "os_release": platform.release(),
        "arch": platform.machine(), "python": platform.python_version(),
        "cpu_cores": psutil.cpu_count(logical=True) or 1,
        "cpu_percent": psutil.cpu_percent(interval=None),  # since the previous call
        "memory": {"total": vm.total, "used": vm.total - vm.available,
                   "available": vm.available, "percent": vm.percent,
                   "pressure": memory_pressure(vm.percent)},
        "disk": disk_info,
    }


def find_ollama_settings(psutil, port):
    """Ollama's OLLAMA_* settings from its own process, where the OS lets us read them.

    The process listening on `port` is the one we talk to; failing that (macOS hides
    other users' sockets), a process named ollama. Blocking: call via asyncio.to_thread.
    """
    procs = []
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                procs.append(psutil.Process(c.pid))
    except (psutil.Error, OSError):
        pass
    if not procs:
        for p in psutil.process_iter(["name"]):
            if (p.info.get("name") or "").lower().startswith("ollama"):
                procs.append(p)
    for proc in procs:
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        return {k: env[k] for k in OLLAMA_SETTING_VARS if k in env}, "process"
    return None, None


def parse_positive_int(text):
    try:
        value = int(str(text).strip())
    except (TypeError, ValueError):
        return 0
    return value if value > 0 else 0


async def read_ollama(ollama_url, timeout):
    """Version, models on disk and models loaded, or an error string (one that names
    the ports when the URL is a Herd router's). A server that lists models but has no
    /api/version (one that only imitates Ollama) reports no version: the router's
    /api/version then does not count it."""
    version, tags, ps = await asyncio.gather(
        *(http_json(ollama_url, "GET", path, timeout=timeout, expect_ollama=True)
          for path in ("/api/version", "/api/tags", "/api/ps")), return_exceptions=True)
    for answer in (tags, ps, version):
        if isinstance(answer, BaseException) and not isinstance(answer, UpstreamError):
            raise answer
        if isinstance(answer, UpstreamError) and (answer is not version or
                                                  answer.phase != "status"):
            return {"ok": False, "error": str(answer)}
    version = version.get("version") if isinstance(version, dict) else ""
    return {"ok": True, "version": version if isinstance(version, str) else "",
            "models": tags.get("models") or [], "loaded": ps.get("models") or []}


def resolve_num_parallel(explicit, settings, environ):
    """Ollama's parallel slots: explicit setting, Ollama's process env, our env."""
    if explicit:
        return explicit, "FLEET_NODE_NUM_PARALLEL"
    value = parse_positive_int((settings or {}).get("OLLAMA_NUM_PARALLEL"))
    if value:
        return value, "ollama process"
    value = parse_positive_int(environ.get("OLLAMA_NUM_PARALLEL"))
    if value:
        return value, "agent environment"
    return 0, "unknown"


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::", ""}


def outward_address(target_host, target_port):
    """The local address this machine uses to reach target (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((target_host, target_port or 9))
        return s.getsockname()[0]


def advertised_ollama_url(ollama_url, router_host, router_port):
    """The Ollama URL as the router must dial it: never 'localhost' across machines."""
    host, port, base = split_url(ollama_url)
    if host.lower() not in LOOPBACK_NAMES and not host.startswith("127."):
        return ollama_url.rstrip("/")
    if router_host in LOOPBACK_NAMES or router_host.startswith("127."):
        return f"http://127.0.0.1:{port}{base}"
    try:
        return f"http://{outward_address(router_host, router_port)}:{port}{base}"
    except OSError:
        return f"http://127.0.0.1:{port}{base}"


def is_loopback_host(host):
    return host.lower() in LOOPBACK_NAMES or host.startswith("127.")


def now_rfc3339():
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def rfc3339_to_unix(text):
    """Parse Ollama's RFC 3339 stamps (nanoseconds allowed); 0 if unparseable."""
    if not text:
        return 0
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
    try:
        return int(datetime.datetime.fromisoformat(text).timestamp())
    except ValueError:
        return 0


####################################################################################
# Heartbeats: the contract between the node agent and the router
#
# The agent builds a heartbeat with build_heartbeat(); the router accepts nothing from
# the network until Heartbeat() has checked it, and then reads it only through the
# Heartbeat's typed fields. A node id follows one rule, checked by both programs: the
# agent refuses a bad one at start-up, the router refuses it with a 400.
####################################################################################

NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NODE_ID_RULE = "1-64 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit"
MEMORY_PRESSURES = ("normal", "warning", "critical")
# The capacity section: "full" (a dedicated machine, nothing learned), "learning" (too
# little history for this hour yet), "learned", "paused" (it takes no new work).
CAPACITY_MODES = ("full", "learning", "learned", "paused")
CAPACITY_TREND_MAX = 100.0  # percentage points a minute, either way
PAUSED_REASON_MAX = 128
HEARTBEAT_MAX_BYTES = 1 << 20  # a node with 500 models sends about 250 KB
MAX_MODELS = 500  # on disk, per node
MAX_LOADED = 64  # in memory, per node
# The inference server an agent found beside it (herd_node.detect_server). A node of
# another kind than Ollama is sent OpenAI's routes only (herd.OPENAI_SERVED).
OLLAMA_KIND = "ollama"
SERVER_KINDS = (OLLAMA_KIND, "llama-server", "lmstudio", "vllm", "llama-cpp-python", "mlx-lm",
                "openai")
MAX_COUNT = 1 << 62  # bytes, sizes: far beyond any machine, far below a float's trouble


def check_node_id(node_id):
    """Raise ValueError unless `node_id` follows the node id rule; returns it."""
    if not isinstance(node_id, str) or not NODE_ID_RE.fullmatch(node_id):
        raise ValueError(f"node id {node_id!r} is not valid: use {NODE_ID_RULE}")
    return node_id


def default_node_id():
    """This machine's short hostname, made into a valid node id ('Café-Mac' -> 'Caf-Mac')."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "", short_hostname()).lstrip("._-")[:64]
    return name or "node"


def build_heartbeat(node_id, ollama_url, machine, ollama, settings, num_parallel,
                    num_parallel_source, draining=False, leaving=False, capacity=None,
                    media=None, server=None, power=None, wake=()):
    """The heartbeat body an agent sends (and the router makes for its local node),
    within the limits the router checks (an odd model name is left out, not sent).
    `capacity`, from an agent: availability, trend, mode, paused_reason, confidence and
    memory_ceiling (the Heartbeat's reader says each one's range). `media`, from an
    agent that serves images or speech itself: its server's url, image_models,
    transcribe_models and backends (sent only when it has a model to serve). `server`:
    the kind of inference server the agent found ({"kind", "version"}; SERVER_KINDS)."""
    error = ollama.get("error")
    body = {
        "node_id": node_id,
        "agent_version": VERSION,
        "ollama_url": ollama_url,
        "hardware": {"os": machine["os"][:64], "os_release": machine["os_release"][:128],
                     "arch": machine["arch"][:32], "cpu_cores": machine["cpu_cores"]},
        "cpu": {"percent": machine["cpu_percent"]},
        "memory": machine["memory"],
        "disk": machine["disk"],
        "ollama": {
            "reachable": ollama["ok"],
            "error": CONTROL_CHARS.sub(" ", error)[:500] if error else None,
            "version": ollama.get("version", ""),
            "settings": {k: CONTROL_CHARS.sub(" ", str(v))[:256] for k, v in settings.items()},
            "num_parallel": num_parallel,
            "num_parallel_source": num_parallel_source,
            "max_loaded_models": parse_positive_int(settings.get("OLLAMA_MAX_LOADED_MODELS")),
        },
        "models": _sendable(ollama.get("models"))[:MAX_MODELS],
        "loaded": _sendable(ollama.get("loaded"))[:MAX_LOADED],
        "draining": draining,
        "leaving": leaving,
        "paused": bool(capacity and capacity.get("paused_reason")),
    }
    if capacity is not None:
        body["capacity"] = capacity
    if media is not None:
        body["media"] = media
    if power is not None:
        body["power"] = power
    if wake:
        body["wake"] = list(wake)[:MAX_WAKE_ADDRESSES]
    if server is not None:
        body["server"] = {"kind": server["kind"], "version": server["version"][:64],
                          "loads": bool(server.get("loads"))}
        if server.get("load"):
            body["server"]["load"] = server["load"]
    return body


def _sendable(entries):
    """The model entries whose names the router will take."""
    out = []
    for entry in entries or ():
        try:
            check_model_name(entry.get("model") or entry.get("name"))
        except (ValueError, AttributeError):
            continue
        out.append(entry)
    return out


class Fields:
    """One JSON object read field by field, each checked as it is read: a missing field
    gets its default, a wrong one raises ValueError naming its whole path."""

    __slots__ = ("obj", "path")

    def __init__(self, obj, path=""):
        if obj is not None and not isinstance(obj, dict):
            raise ValueError(f"field '{path}' must be an object")
        self.obj, self.path = obj or {}, path

    def _get(self, key, kinds, what):
        value = self.obj.get(key)
        if value is not None and (isinstance(value, bool) is not (bool in kinds)
                                  or not isinstance(value, kinds)):
            raise ValueError(f"field '{self.name(key)}' must be {what}")
        return value

    def name(self, key):
        return f"{self.path}.{key}" if self.path else key

    def section(self, key):
        return Fields(self.obj.get(key), self.name(key))

    def text(self, key, max_len=128, default=""):
        value = self._get(key, (str,), "a string")
        if value is None:
            return default
        if len(value) > max_len or CONTROL_CHARS.search(value):
            raise ValueError(f"field '{self.name(key)}' must be at most {max_len} printable "
                             f"characters")
        return value

    def integer(self, key, high=MAX_COUNT, default=0):
        value = self._get(key, (int,), "an integer")
        if value is None:
            return default
        if not 0 <= value <= high:
            raise ValueError(f"field '{self.name(key)}' must be between 0 and {high}")
        return value

    def number(self, key, high, default=0.0):
        value = self._get(key, (int, float), "a number")
        if value is None:
            return default
        if not (math.isfinite(value) and 0 <= value <= high):
            raise ValueError(f"field '{self.name(key)}' must be a number from 0 to {high}")
        return float(value)

    def signed(self, key, bound, default=0.0):
        """A number from -bound to bound (a trend may fall)."""
        value = self._get(key, (int, float), "a number")
        if value is None:
            return default
        if not (math.isfinite(value) and -bound <= value <= bound):
            raise ValueError(f"field '{self.name(key)}' must be a number from -{bound} to "
                             f"{bound}")
        return float(value)

    def flag(self, key, default=False):
        value = self._get(key, (bool,), "true or false")
        return default if value is None else value

    def choice(self, key, allowed, default):
        value = self.text(key, default=default)
        if value not in allowed:
            raise ValueError(f"field '{self.name(key)}' must be one of {', '.join(allowed)}")
        return value

    def objects(self, key, max_items):
        """A list of objects, each as Fields."""
        value = self._get(key, (list,), "a list")
        if not value:
            return []
        if len(value) > max_items:
            raise ValueError(f"field '{self.name(key)}' has more than {max_items} entries")
        return [Fields(v, f"{self.name(key)}[{i}]") for i, v in enumerate(value)]

    def texts(self, key, max_items=16, max_len=64):
        value = self._get(key, (list,), "a list")
        if not value:
            return []
        if len(value) > max_items:
            raise ValueError(f"field '{self.name(key)}' has more than {max_items} entries")
        holder = Fields({str(i): v for i, v in enumerate(value)}, self.name(key))
        return [holder.text(str(i), max_len) for i in range(len(value))]


CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def _model_details(f):
    details = {"parent_model": f.text("parent_model", MODEL_NAME_MAX),
               "format": f.text("format"), "family": f.text("family"),
               "families": f.texts("families"), "parameter_size": f.text("parameter_size"),
               "quantization_level": f.text("quantization_level")}
    for key in ("context_length", "embedding_length"):  # omitempty in Ollama: kept only
        if f.obj.get(key) is not None:                  # when sent, never made up as 0
            details[key] = f.integer(key, 1 << 24)
    return details


@dataclass(frozen=True)
class ModelEntry:
    """One model a node lists, as checked: on its disk (an /api/tags entry) or in its
    memory (an /api/ps entry, `loaded`). What the router reads of it is typed here once;
    json() gives it back as the node's Ollama listed it."""

    name: str
    size: int = 0  # bytes: on disk, or in memory once loaded
    digest: str = ""
    details: dict = dataclasses.field(default_factory=dict)  # _model_details
    modified_at: str = ""  # on disk
    capabilities: tuple = None  # on disk; None: the node's Ollama lists none (older)
    loaded: bool = False
    # Loaded, as /api/ps says (None: not known, for a load the router saw first).
    size_vram: int = None
    expires_at: str = None
    context_length: int = None  # the context it runs with

    @property
    def max_context(self):
        """The longest context the model takes (its details; 0: not said)."""
        return self.details.get("context_length", 0)

    @property
    def is_embedding(self):
        """Do its capabilities (newer Ollama lists them) say it makes embeddings?"""
        return self.capabilities is not None and "embedding" in self.capabilities

    def can(self, capability):
        """Does it list `capability`? (A node that lists none: completion only.)"""
        return capability in (self.capabilities or ("completion",))

    def json(self):
        """The entry as the node's /api/tags (or /api/ps) gave it: no field made up."""
        out = {"name": self.name, "model": self.name, "size": self.size,
               "digest": self.digest, "details": self.details}
        if self.loaded:
            out.update((k, v) for k, v in (("size_vram", self.size_vram),
                                           ("expires_at", self.expires_at),
                                           ("context_length", self.context_length))
                       if v is not None)
        else:
            out["modified_at"] = self.modified_at
            if self.capabilities is not None:
                out["capabilities"] = list(self.capabilities)
        return out


def _model_entry(f, loaded):
    """One /api/tags (or, `loaded`, /api/ps) entry, rebuilt from its checked fields:
    (canonical name, ModelEntry)."""
    name = f.obj.get("model") or f.obj.get("name")
    try:
        name = check_model_name(name)
    except ValueError as e:
        raise ValueError(f"field '{f.path}': {e}") from None
    common = {"name": name, "size": f.integer("size"), "digest": f.text("digest"),
              "details": _model_details(f.section("details"))}
    if loaded:
        entry = ModelEntry(**common, loaded=True, size_vram=f.integer("size_vram"),
                           expires_at=f.text("expires_at", 64),
                           context_length=f.integer("context_length", 1 << 24))
    else:  # capabilities are omitempty too: none sent is not "none"
        caps = f.obj.get("capabilities")
        entry = ModelEntry(**common, modified_at=f.text("modified_at", 64),
                           capabilities=None if caps is None else
                           tuple(f.texts("capabilities")))
    return canonical_model(name), entry


def read_model_list(entries):
    """The models on disk a node's Ollama lists outside a heartbeat (/api/tags's
    "models", re-read after a pull), each entry through the heartbeat's own checks.
    Returns (the entries that pass, by canonical name; (count refused, the first
    reason)): one bad entry costs only itself; the first MAX_MODELS are read."""
    models, refused, first = {}, 0, ""
    for i, entry in enumerate(entries[:MAX_MODELS]):
        try:
            name, checked = _model_entry(Fields(entry, f"models[{i}]"), False)
        except ValueError as e:
            refused, first = refused + 1, first or str(e)
            continue
        models[name] = checked
    return models, (refused, first)


def _capacity(f):
    """The capacity section, checked; None from an agent that sends none (an older one,
    or the router's poll of its own Ollama)."""
    if f.obj.get("capacity") is None:
        return None
    c = f.section("capacity")
    return {"availability": None if c.obj.get("availability") is None
            else c.number("availability", 1.0),
            "trend": c.signed("trend", CAPACITY_TREND_MAX),
            "mode": c.choice("mode", CAPACITY_MODES, "full"),
            "paused_reason": c.text("paused_reason", PAUSED_REASON_MAX) or None,
            "confidence": c.number("confidence", 1.0),
            "memory_ceiling": c.integer("memory_ceiling")}


MAX_MEDIA_MODELS = 64  # image or speech models one agent serves
# How an agent serves a media kind: a command-line tool it runs, or a server it proxies.
# An agent with two tools for one kind (mflux and DiffusionKit) joins them with "+".
MEDIA_BACKENDS = ("mflux", "diffusionkit", "mlx-qwen3-asr", "server")
# What a node on battery does (FLEET_NODE_ON_BATTERY), and the charge below which an
# avoided one is paused.
BATTERY_POLICIES = ("avoid", "pause", "serve")
# Wake-on-LAN: the interfaces an agent reports ({"mac", "broadcast"}), at most.
MAX_WAKE_ADDRESSES = 8
MAC_ADDRESS = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def _wake_address(f):
    """One interface a sleeping node may be woken through: its MAC, and the broadcast
    address of its IPv4 subnet."""
    mac = f.text("mac", 17).lower().replace("-", ":")
    if not MAC_ADDRESS.fullmatch(mac) or mac == "00:00:00:00:00:00":
        raise ValueError(f"field '{f.name('mac')}' must be a MAC address")
    broadcast = f.text("broadcast", 15)
    try:
        if ipaddress.ip_address(broadcast).version != 4:
            raise ValueError
    except ValueError:
        raise ValueError(f"field '{f.name('broadcast')}' must be an IPv4 address") from None
    return {"mac": mac, "broadcast": broadcast}
BATTERY_PAUSE_PERCENT = 20.0


def _media(f):
    """The media section: the agent's own media server and what it serves, each model
    name checked; None from an agent that serves no images or speech."""
    if f.obj.get("media") is None:
        return None
    m = f.section("media")
    url = m.text("url", 512)
    try:
        split_url(url)
        if not url.lower().startswith("http://"):
            raise ValueError("the router speaks plain http:// to an agent")
    except ValueError as e:
        raise ValueError(f"field 'media.url': {e}") from None
    models = {}
    for key in ("image_models", "transcribe_models"):
        names = m.texts(key, MAX_MEDIA_MODELS, MODEL_NAME_MAX)
        for name in names:
            try:
                check_model_name(name)
            except ValueError as e:
                raise ValueError(f"field 'media.{key}': {e}") from None
        models[key] = names
    b = m.section("backends")
    backends = {kind: _media_backend(b, kind) for kind in MEDIA_KINDS if kind in b.obj}
    # An older agent does not say its time-out: 0, and the router's own apply.
    return {"url": url, **models, "backends": backends,
            "concurrency": m.integer("concurrency", 1024, 1) or 1,
            "timeout": m.number("timeout", 7 * 86400.0)}


def _media_backend(b, kind):
    """One kind's backend: one of MEDIA_BACKENDS, or several of them joined by "+"."""
    value = b.text(kind, 64, "server")
    if not all(part in MEDIA_BACKENDS for part in value.split("+")):
        raise ValueError(f"field '{b.name(kind)}' must be one of {', '.join(MEDIA_BACKENDS)}"
                         f", or several of them joined by '+'")
    return value


class Heartbeat:
    """A heartbeat with every field checked and typed. What /fleet/status shows of it is
    rebuilt from the checked fields: nothing a node sends reaches a client unchecked."""

    __slots__ = ("node_id", "ollama_url", "agent_version", "reachable", "ollama_version",
                 "ollama_error", "num_parallel", "num_parallel_source", "settings",
                 "max_loaded_models", "cpu_percent", "mem_total", "mem_available",
                 "mem_used", "mem_percent", "pressure", "draining", "paused", "leaving",
                 "models", "loaded", "hardware", "disk_total", "disk_free", "capacity",
                 "media", "server_kind", "server_version", "server_loads", "server_load",
                 "power", "wake")

    def __init__(self, body):
        f = Fields(body)
        self.node_id = f.obj.get("node_id")
        if not isinstance(self.node_id, str) or not NODE_ID_RE.fullmatch(self.node_id):
            raise ValueError(f"field 'node_id' must be {NODE_ID_RULE}")
        self.ollama_url = f.text("ollama_url", 512)
        try:
            split_url(self.ollama_url)
            if not self.ollama_url.lower().startswith("http://"):
                raise ValueError("the router speaks plain http:// to Ollama")
        except ValueError as e:
            raise ValueError(f"field 'ollama_url': {e}") from None
        self.agent_version = f.text("agent_version", 32)
        hw = f.section("hardware")
        self.hardware = {"os": hw.text("os", 64), "os_release": hw.text("os_release"),
                         "arch": hw.text("arch", 32),
                         "cpu_cores": hw.integer("cpu_cores", 4096)}
        self.cpu_percent = f.section("cpu").number("percent", 100.0)
        mem = f.section("memory")
        self.mem_total, self.mem_used = mem.integer("total"), mem.integer("used")
        self.mem_available = mem.integer("available")
        self.mem_percent = mem.number("percent", 100.0)
        self.pressure = mem.choice("pressure", MEMORY_PRESSURES, "normal")
        disk = f.section("disk")
        self.disk_total, self.disk_free = disk.integer("total"), disk.integer("free")
        self._read_ollama(f.section("ollama"))
        server = f.section("server")  # an older agent's: Ollama, as it only knew
        self.server_kind = server.choice("kind", SERVER_KINDS, OLLAMA_KIND)
        self.server_version = server.text("version", 64) if "version" in server.obj \
            else self.ollama_version
        # Can the router load and unload its models? Ollama's always; another's when its
        # API can (LM Studio's, llama-server's router mode).
        self.server_loads = self.server_kind == OLLAMA_KIND or server.flag("loads")
        load = server.section("load")  # vLLM's /metrics: requests running and waiting
        self.server_load = {"running": load.integer("running"),
                            "waiting": load.integer("waiting"),
                            "kv_cache": load.number("kv_cache", 1.0, None)} \
            if load.obj else None  # kv_cache: None where the server does not say
        self.capacity = _capacity(f)
        power = f.section("power")  # an agent's battery, where the machine has one
        self.power = {"on_battery": power.flag("on_battery"),
                      "percent": power.number("percent", 100.0, None),
                      "policy": power.choice("policy", BATTERY_POLICIES, "serve")} \
            if power.obj else None
        self.wake = tuple(_wake_address(w) for w in f.objects("wake", MAX_WAKE_ADDRESSES))
        self.media = _media(f)
        self.draining, self.leaving = f.flag("draining"), f.flag("leaving")
        self.paused = f.flag("paused") or self.paused_reason is not None or bool(
            self.capacity and self.capacity["mode"] == "paused")
        self.models = dict(_model_entry(m, False) for m in f.objects("models", MAX_MODELS))
        self.loaded = dict(_model_entry(m, True) for m in f.objects("loaded", MAX_LOADED))

    def _read_ollama(self, o):
        self.reachable = o.flag("reachable", True)
        self.ollama_error = o.text("error", 500) or None
        self.ollama_version = o.text("version", 64)
        self.num_parallel = o.integer("num_parallel", 1024)
        self.num_parallel_source = o.text("num_parallel_source", 64)
        self.max_loaded_models = o.integer("max_loaded_models", 1024)
        settings = o.section("settings")
        self.settings = {k: settings.text(k, 256) for k in OLLAMA_SETTING_VARS
                         if k in settings.obj}

    @property
    def paused_reason(self):
        return self.capacity["paused_reason"] if self.capacity else None

    @property
    def memory(self):
        return {"total": self.mem_total, "used": self.mem_used,
                "available": self.mem_available, "percent": self.mem_percent,
                "pressure": self.pressure}

    @property
    def disk(self):
        return {"total": self.disk_total, "free": self.disk_free}

    @property
    def ollama(self):
        return {"reachable": self.reachable, "error": self.ollama_error,
                "version": self.ollama_version, "settings": self.settings,
                "num_parallel": self.num_parallel,
                "num_parallel_source": self.num_parallel_source,
                "max_loaded_models": self.max_loaded_models}


# -- signed heartbeats ------------------------------------------------------------------
# With a fleet token, an agent signs each heartbeat: an HMAC-SHA256, keyed by the token,
# over a timestamp, a random nonce, the method, the path and the body. The router checks
# it in constant time and refuses a stale timestamp or a nonce it has seen: a recorded
# heartbeat cannot be replayed, and the token itself never crosses the wire, so an agent
# that found a rogue router by mDNS gives it nothing it can reuse.

SIGNATURE_WINDOW_S = 30  # LAN clocks agree within seconds; anything older is refused


def signature(token, timestamp, nonce, method, path, body):
    message = b"\n".join([timestamp.encode(), nonce.encode(), method.encode(),
                          path.encode(), body])
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def sign_request(token, method, path, body, now=None):
    """The headers that prove a request comes from a holder of `token`."""
    timestamp = str(int(time.time() if now is None else now))
    nonce = os.urandom(16).hex()
    return [(b"x-herd-timestamp", timestamp.encode()), (b"x-herd-nonce", nonce.encode()),
            (b"x-herd-signature", signature(token, timestamp, nonce, method, path,
                                            body).encode())]


class SignatureCheck:
    """The router's side (and an agent media server's): fresh, unseen and signed with
    the token, or refused.

    The nonces seen within the window are also appended to `nonce_path`, one line each,
    and read back at start: a request signed just before a restart is refused after it
    as before it. Where that file cannot be kept (a read-only or full data folder), a
    request signed before this start is refused instead: safe, but an agent whose clock
    is behind is refused for as long as it is behind, up to the window."""

    MAX_NONCES = 100_000  # about 50 heartbeats a second for the whole window
    COMPACT_EVERY = 1000  # lines appended to the nonce file before it is rewritten

    def __init__(self, token, window=SIGNATURE_WINDOW_S, nonce_path=None, now=None):
        self.token, self.window = token, window
        self.seen = collections.OrderedDict()  # nonce -> when it stops mattering
        self.nonce_path, self.not_before, self._appended = nonce_path, 0, 0
        if nonce_path is not None:
            self._load_nonces(time.time() if now is None else now)

    def refuse_head(self, request, now=None):
        """Why `request` cannot be validly signed, seen from its head alone (before its
        body is read), or None."""
        now = time.time() if now is None else now
        timestamp = request.header("x-herd-timestamp") or ""
        nonce = request.header("x-herd-nonce") or ""
        if not (timestamp.isdigit() and len(timestamp) < 16 and 16 <= len(nonce) <= 64
                and nonce.isalnum() and request.header("x-herd-signature")):
            if request.header("authorization"):
                return ("not signed: this agent sends its token instead of signing with it; "
                        "update herd_node.py and herd_common.py on that machine")
            return "not signed (set FLEET_NODE_TOKEN on the node to the router's FLEET_TOKEN)"
        skew = int(timestamp) - now  # > 0: the signer's clock is ahead of ours
        if abs(skew) > self.window:
            return (f"timestamp {math.ceil(abs(skew))}s {'ahead of' if skew > 0 else 'behind'}"
                    f" this machine's clock (more than {self.window}s): check both "
                    f"machines' clocks")
        if int(timestamp) < self.not_before:
            return ("signed before this program started (a replay, or a clock behind "
                    "this machine's): the next one, signed later, is taken")
        return None

    def refuse(self, request, now=None):
        """Why `request` is not a valid signed request, or None when it is."""
        now = time.time() if now is None else now
        if (why := self.refuse_head(request, now)) is not None:
            return why
        timestamp = request.header("x-herd-timestamp")
        nonce = request.header("x-herd-nonce")
        given = request.header("x-herd-signature")
        expected = signature(self.token, timestamp, nonce, request.method, request.path,
                             request.body)
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return "bad signature: FLEET_NODE_TOKEN differs from the router's FLEET_TOKEN"
        while self.seen and (next(iter(self.seen.values())) < now
                             or len(self.seen) >= self.MAX_NONCES):
            self.seen.popitem(last=False)
        if nonce in self.seen:
            return "replayed: this signed request was already used"
        self.seen[nonce] = now + 2 * self.window
        self._keep_nonce(nonce, self.seen[nonce])
        return None

    def _load_nonces(self, now):
        """The nonces an earlier run saw that still matter, and the file rewritten with
        only those; failing that, the start-time rule (see the class)."""
        try:
            os.makedirs(os.path.dirname(self.nonce_path) or ".", exist_ok=True)
            with contextlib.suppress(FileNotFoundError), open(self.nonce_path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - self.MAX_NONCES * 64))
                for line in f.read().splitlines():  # a damaged line is only skipped
                    expiry, _, nonce = line.decode("ascii", "replace").partition(" ")
                    if expiry.isdigit() and int(expiry) > now and nonce.isalnum():
                        self.seen[nonce] = int(expiry)
            self._rewrite_nonces()
        except OSError as e:
            self._give_up_nonces(e, now)

    def _keep_nonce(self, nonce, expiry):
        if self.nonce_path is None:
            return
        try:
            if self._appended >= self.COMPACT_EVERY:  # the lines of expired ones go
                return self._rewrite_nonces()
            with open(self.nonce_path, "a", encoding="ascii") as f:
                f.write(f"{math.ceil(expiry)} {nonce}\n")
            self._appended += 1
        except OSError as e:
            self._give_up_nonces(e, None)

    def _rewrite_nonces(self):
        tmp = self.nonce_path + ".tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.writelines(f"{math.ceil(expiry)} {nonce}\n" for nonce, expiry in
                         self.seen.items())
        os.replace(tmp, self.nonce_path)
        self._appended = 0

    def _give_up_nonces(self, error, now):
        """Keep nonces in memory only; at start, refuse what was signed before it."""
        logging.getLogger("herd.signatures").warning(
            f"cannot keep signed requests' nonces in {self.nonce_path} ({error}); "
            + ("requests signed before this start are refused instead" if now else
               "a restart within the next minute may take a recorded request again"))
        self.nonce_path = None
        if now is not None:
            self.not_before = int(now)


####################################################################################
# Settings: each program's table (the router's FLEET_*, the agent's FLEET_NODE_*), kept
# here beside the loader, --help and the log settings both share. A user setting has a
# group (basics, security, routing, storage; the agent's media); the rest are fixed
####################################################################################

ROUTER_SETTINGS = [
    *in_group("basics", [
        Setting("FLEET_HOST", "0.0.0.0", "address to listen on"),
        Setting("FLEET_PORT", DEFAULT_ROUTER_PORT, "port to listen on"),
        Setting("FLEET_LOCAL_NODE", True, "serve an Ollama on this machine as a node "
                "without an agent"),
        Setting("FLEET_LOCAL_OLLAMA_URL", "http://127.0.0.1:11434", "where that local "
                "Ollama listens"),
        Setting("FLEET_MDNS", True, "advertise the router as _fleet-manager._tcp on the "
                "LAN"),
    ]),
    *in_group("security", [
        Setting("FLEET_TOKEN", "", "the fleet's secret: agents sign every heartbeat with "
                "it (it never crosses the wire). EMPTY MEANS ANY HOST THAT CAN REACH THE "
                "ROUTER CAN JOIN AS A NODE and receive prompts"),
        Setting("FLEET_API_KEYS", "", "client keys, comma-separated or @/path/to/file (one "
                "a line): if set, every route but /, /api/version and /dashboard needs "
                "Authorization: Bearer <key> or x-api-key: <key>"),
        Setting("FLEET_ADMIN_KEY", "", "the key for pulls, unloads, model management "
                "(delete, copy, create, blobs, push), the request explorer (client "
                "addresses, errors) and /metrics; it works on every route"),
        Setting("FLEET_METRICS_KEY", "", "a key that may read /metrics and nothing else "
                "(for a Prometheus scraper)"),
        Setting("FLEET_ALLOWED_OLLAMA_HOSTS", "", "hosts a node may name in its Ollama URL "
                "besides the address its heartbeats come from (comma-separated; * for "
                "any), for an agent that reports an Ollama on another machine"),
        Setting("FLEET_PULL_REGISTRIES", "", "registries a pull may name (comma-separated "
                "hosts; * for any); empty: only Ollama library names (namespace/name:tag)"),
        Setting("FLEET_ORIGINS", "", "browser origins allowed besides Ollama's own "
                "defaults (localhost, 127.0.0.1 and 0.0.0.0 on any port; app, file, tauri "
                "and vscode pages), as OLLAMA_ORIGINS adds them: comma-separated, * for "
                "any, one * as a wildcard (chrome-extension://*). The host of an http(s) "
                "origin listed is also a name the router answers to "
                "(http://herd.example.com:11435 for a DNS name of your own; others get 403 "
                "where no key is needed)"),
        Setting("FLEET_TLS_CERT", "", "PEM certificate (chain) file: serve HTTPS"),
        Setting("FLEET_TLS_KEY", "", "the certificate's PEM private key file"),
        Setting("FLEET_CLIENT_MAX_IN_FLIGHT", 0, "requests one client address may have in "
                "flight before it gets 429 (0: no limit)"),
        Setting("FLEET_MAX_CONNECTIONS_PER_CLIENT", 64, "connections one client address "
                "may have open at once"),
    ]),
    *in_group("routing", [
        Setting("FLEET_HEARTBEAT_TIMEOUT", 15.0, "seconds without a heartbeat before a "
                "node is degraded"),
        Setting("FLEET_HEARTBEAT_OFFLINE", 30.0, "seconds without a heartbeat before a "
                "node is offline and gets no work"),
        Setting("FLEET_AUTO_PULL", True, "pull a model no node has onto the node with the "
                "most free memory, then serve the request"),
        Setting("FLEET_CONTEXT_PROTECTION", "strip", "a num_ctx that would reload a loaded "
                "model: strip (use the loaded context, or a larger tag of the same model "
                "loaded with room for it; never another model, never for embeddings), warn "
                "(log only) or passthrough"),
        Setting("FLEET_MAX_RETRIES", 2, "other nodes tried when a node fails before the "
                "first chunk"),
        Setting("FLEET_WAKE_ADDRESS", "", "where Wake-on-LAN packets go: empty means the "
                "broadcast address of the sleeping node's subnet (port 9); host or "
                "host:port to send them there instead (a relay); off: never wake a node"),
        Setting("FLEET_ALERT_URL", "", "where to say that a node went offline or came "
                "back, a health check turned critical or cleared, or a pull failed: an "
                "http(s) URL gets JSON (Slack, Mattermost, Home Assistant and Discord "
                "webhooks take it), ntfy:<url> ntfy's plain text with a title, "
                "exec:<command> runs the command (the alert in HERD_ALERT_* variables "
                "and as JSON on its input)"),
        Setting("FLEET_MODEL_ALIASES", "", "names that are one model on different servers "
                "(llama3.2:3b on Ollama, Llama-3.2-3B-Instruct-Q4_K_M on LM Studio): "
                "entries name=other[,other...] separated by ';', or @/path/to/file with "
                "one entry a line. A request for any of the names may go to a node that "
                "has any of them, and is answered under the name it asked for"),
        Setting("FLEET_LEARNING", True, "route by what the fleet has learned: each "
                "node+model's speed, answer length and best concurrency (false: by counts "
                "only)"),
        Setting("FLEET_FIRST_BYTE_TIMEOUT", 300.0, "seconds for Ollama to start answering "
                "(covers model load and prompt evaluation)"),
    ]),
    *in_group("storage", [
        Setting("FLEET_DATA_DIR", DATA_DIR, "traces (latency.db) and logs/"),
        Setting("FLEET_LEARNED_FROM", "", "another router's URL (the active one, for a "
                "standby): at start, take what it learned of each node and model more "
                "lately than this router did, so that a standby does not start cold"),
        *LOG_SETTINGS,
    ]),
]

# The router's fixed values: what only a developer would change (health thresholds,
# buffer sizes, time-outs of the plumbing). Not read from the environment; a test sets
# them through load_router_config's `tuned`.
ROUTER_FIXED = [
    Setting("FLEET_HOLD_TIMEOUT", 30.0, "seconds a request waits for a node that can "
            "serve it before a 503"),
    Setting("FLEET_STARTUP_WINDOW", 6.0, "seconds after start during which a model no "
            "node has reported yet waits (nodes report every 5 s) instead of a 404"),
    Setting("FLEET_AUTO_PULL_TIMEOUT", 600.0, "seconds a request waits for such a pull "
            "(503 after; the pull goes on)"),
    Setting("FLEET_DEFAULT_NUM_PARALLEL", 4, "requests in flight per node+model when the "
            "node cannot tell Ollama's OLLAMA_NUM_PARALLEL"),
    Setting("FLEET_PRE_WARM_THRESHOLD", 3, "requests queued or running on the chosen "
            "node+model at which the runner-up node loads the model too (0: never)"),
    Setting("FLEET_REBALANCE_INTERVAL", 5.0, "seconds between moves of queued requests "
            "to nodes where their model is loaded and slots are free"),
    Setting("FLEET_STALE_TIMEOUT", 600.0, "seconds a request sent to a node may show no "
            "progress before the reaper fails it and frees its slot"),
    Setting("FLEET_MAX_BODY_MB", 64.0, "largest request body accepted (413 beyond)"),
    Setting("FLEET_MAX_BLOB_GB", 256.0, "largest blob upload (/api/blobs, for "
            "/api/create) streamed to a node (413 beyond); the router holds at most a "
            "megabyte of it at a time"),
    Setting("FLEET_MAX_UPLOAD_MB", 512.0, "largest speech upload (/v1/audio/transcriptions, "
            "/api/transcribe) streamed to a node, or spooled to TMPDIR while its file "
            "comes before its model field (413 beyond; spooled files: twice this per "
            "client, eight times in all)"),
    Setting("FLEET_MEDIA_REPLAY_MB", 8.0, "of a speech upload, the megabytes the router "
            "keeps while it streams, so that a node failing before it answers can be "
            "replaced; a longer upload goes to one node only (0: never kept)"),
    Setting("FLEET_IDLE_TIMEOUT", 75.0, "seconds an idle keep-alive connection stays open"),
    Setting("FLEET_HEADER_TIMEOUT", 10.0, "seconds a client has to send a whole request "
            "head (a slow sender cannot hold a connection open)"),
    Setting("FLEET_MAX_CONNECTIONS", 512, "client connections open at once; more get a 503 "
            "and are closed (kept below the process's file limit)"),
    Setting("FLEET_MAX_NODES", 256, "nodes the router keeps track of; a new node id past "
            "it is refused"),
    Setting("FLEET_FORGET_OFFLINE_AFTER", 86400.0, "seconds a node may stay offline "
            "before the router forgets it"),
    Setting("FLEET_CONNECT_TIMEOUT", 5.0, "seconds to connect to a node's Ollama"),
    Setting("FLEET_CHUNK_TIMEOUT", 120.0, "seconds of silence mid-response before the "
            "node counts as stalled"),
    Setting("FLEET_LOCAL_NODE_INTERVAL", 5.0, "seconds between polls of the local Ollama"),
    Setting("FLEET_TRACE_QUEUE", 10000, "trace rows buffered for the writer before "
            "rows are dropped (and counted)"),
    Setting("FLEET_TRACE_RETENTION_DAYS", 30, "traces older than this are deleted "
            "(checked hourly; 0: keep them all)"),
    Setting("FLEET_HEALTH_ERROR_RATE", 0.05, "share of failed requests in an hour that "
            "the health API calls a warning (critical at four times it); also the share "
            "of a node's image or speech requests that time out, or fail, there"),
    Setting("FLEET_HEALTH_RETRY_RATE", 0.10, "share of retried attempts in an hour that is "
            "a warning (critical at four times it)"),
    Setting("FLEET_HEALTH_DISCONNECT_RATE", 0.10, "share of requests whose client left, in "
            "an hour, that is a warning (critical at four times it)"),
    Setting("FLEET_HEALTH_THRASH_LOADS", 3, "loads of one model on one node in an hour that "
            "count as thrashing (when one of them came back soon after an eviction, with "
            "the placement plan unchanged)"),
    Setting("FLEET_SHUTDOWN_GRACE", 30.0, "seconds streams get to finish on SIGTERM"),
]

NODE_SETTINGS = [
    *in_group("basics", [
        Setting("FLEET_NODE_ROUTER_URL", "", "router URL, or several comma-separated (an "
                "active router and its standby: each gets every heartbeat); empty means "
                "find it by mDNS"),
        Setting("FLEET_NODE_NODE_ID", "", "this node's name: 1-64 ASCII letters, digits, "
                "'.', '_' or '-' (default: the short hostname, without other characters)"),
        Setting("FLEET_NODE_OLLAMA_HOST", "http://localhost:11434", "where Ollama listens, or "
                "another inference server (the agent finds which kind answers there); "
                "FLEET_NODE_SERVER_URL is the same setting"),
        Setting("FLEET_NODE_OLLAMA_URL", "", "the Ollama URL the router should dial "
                "(default: derived from the address this machine uses to reach the "
                "router)"),
        Setting("FLEET_NODE_NUM_PARALLEL", 0, "Ollama's parallel slots; 0 means read "
                "OLLAMA_NUM_PARALLEL from the running Ollama, else this agent's "
                "environment"),
        Setting("FLEET_NODE_HEARTBEAT_INTERVAL", 5.0, "seconds between heartbeats"),
        Setting("FLEET_NODE_WAKE", True, "report this machine's network interfaces (MAC "
                "and broadcast address) so that the router can wake it with Wake-on-LAN "
                "when it sleeps and a request needs its models"),
        Setting("FLEET_NODE_ON_BATTERY", "avoid", "what a machine running on its battery "
                "does: avoid (the router sends it work only when the plugged-in nodes are "
                "slow and swamped too, and none below 20 %), pause (no work at all) or "
                "serve (as if plugged in)"),
        Setting("FLEET_NODE_ENABLE_CAPACITY_LEARNING", False, "for a laptop or a shared "
                "machine: learn when its owner uses it (by hour of the week), report how "
                "available it is and how much memory models may have, and pause it while "
                "the camera or microphone is in use, memory pressure is critical or the "
                "owner keeps the CPU busy; off: a dedicated machine, always at full "
                "capacity"),
    ]),
    *in_group("security", [
        Setting("FLEET_NODE_TOKEN", "", "the router's FLEET_TOKEN, if it has one: "
                "heartbeats are signed with it (it is never sent)"),
        Setting("FLEET_NODE_CA", "", "PEM file of the CA that signed the router's TLS "
                "certificate (default: the system's certificates)"),
    ]),
    *in_group("media", [
        Setting("FLEET_NODE_IMAGE_URL", "", "an OpenAI-compatible image server this agent "
                "serves images through (e.g. a stable-diffusion server on a Linux GPU "
                "box): its GET /v1/models are the image models advertised"),
        Setting("FLEET_NODE_TRANSCRIBE_URL", "", "an OpenAI-compatible transcription "
                "server (whisper.cpp, faster-whisper) this agent serves speech-to-text "
                "through"),
        Setting("FLEET_NODE_MEDIA_TIMEOUT", 600.0, "seconds one image request (all of its "
                "n pictures) or transcription may take before its tool is killed (a 504)"),
    ]),
    *in_group("storage", [
        Setting("FLEET_NODE_DATA_DIR", DATA_DIR, "logs/, the state saved on drain "
                "(node-state-<id>.json) and the capacity learner's "
                "capacity-learner-<id>.json live here"),
        *LOG_SETTINGS,
    ]),
]

# The agent's fixed values, as the router's above.
NODE_FIXED = [
    Setting("FLEET_NODE_DRAIN_TIMEOUT", 30.0, "seconds a stopping agent waits for the "
            "requests running on this node to finish before it leaves the fleet"),
    Setting("FLEET_NODE_MDNS_INTERFACES", "", "comma-separated IPs to browse mDNS on "
            "(default: all interfaces)"),
    Setting("FLEET_NODE_MEDIA_CLI", True, "look on PATH for mflux's mflux-generate* "
            "commands and DiffusionKit's diffusionkit-cli (images) and mlx-qwen3-asr "
            "(speech), and serve them (Apple Silicon)"),
    Setting("FLEET_NODE_MFLUX_MODELS", "", "the mflux models (--model values) advertised, "
            "each one when its command is on PATH (schnell, dev, krea-dev: "
            "mflux-generate; z-image-turbo: mflux-generate-z-image-turbo; ...); empty: "
            "every model of each text-to-image mflux command found"),
    Setting("FLEET_NODE_DIFFUSIONKIT_MODELS", "", "the DiffusionKit models "
            "(--model-version values, e.g. argmaxinc/mlx-FLUX.1-schnell) advertised when "
            "diffusionkit-cli is on PATH; empty: all six it knows"),
    Setting("FLEET_NODE_ASR_MODELS", "Qwen/Qwen3-ASR-0.6B", "the mlx-qwen3-asr models "
            "(its --model values) advertised when mlx-qwen3-asr is found"),
    Setting("FLEET_NODE_MEDIA_HOST", "0.0.0.0", "address the agent's media server listens "
            "on (started only when this node serves images or speech)"),
    Setting("FLEET_NODE_MEDIA_PORT", 11436, "port of the agent's media server"),
    Setting("FLEET_NODE_MEDIA_URL", "", "the media server URL the router should dial "
            "(default: derived like the Ollama URL)"),
    Setting("FLEET_NODE_MEDIA_CONCURRENCY", 1, "image or speech requests whose tools run "
            "at once (each kind; the n pictures of one request are drawn in turn); more "
            "wait"),
    Setting("FLEET_NODE_MAX_UPLOAD_MB", 512.0, "largest speech upload the media server "
            "takes (413 beyond)"),
]


# A misspelt name is silently a default: FLEET_NODE_OLAMA_URL once made the agent log
# one Ollama URL while the router dialled another. So each program names, once at
# start, every FLEET_* variable it ignores by mistake. One shell may start both
# programs, so the other program's names are known, not misspelt; the router leaves
# FLEET_NODE_* to the agent. The agent's token is FLEET_NODE_TOKEN and the router's is
# FLEET_TOKEN: the other's name set where one's own is not is a mistake too.
TOKEN_SETTINGS = ("FLEET_TOKEN", "FLEET_NODE_TOKEN")


def owner_of(name):
    """Which program reads a setting, by its name."""
    return "the agent's (herd_node.py)" if name.startswith("FLEET_NODE_") else \
        "the router's (herd.py)"


def setting_words(name):
    """What a setting's name says once its program's prefix is off: TOKEN for both
    FLEET_TOKEN and FLEET_NODE_TOKEN."""
    for prefix in ("FLEET_NODE_", "FLEET_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def nearest_setting(name, own, other):
    """The known name that `name` most likely misspells, or None: the one with the same
    words (FLEET_OLLAMA_HOST: FLEET_NODE_OLLAMA_HOST) or the only one whose words end
    with them (FLEET_NODE_ID: FLEET_NODE_NODE_ID), this program's (`own`) before the
    other's; else the closest in spelling. A FLEET_NODE_* name means the agent's."""
    if name.startswith("FLEET_NODE_"):
        other = [n for n in other if n.startswith("FLEET_NODE_")]
    words = setting_words(name)
    for names in (own, other):
        for fits in (lambda w: w == words, lambda w: w.endswith("_" + words)):
            found = [n for n in names if fits(setting_words(n))]
            if len(found) == 1:
                return found[0]
    best, score = None, 0.6  # difflib.get_close_matches's own cut-off
    for known in own + other:  # own first: it wins a tie
        ratio = difflib.SequenceMatcher(None, words, setting_words(known)).ratio()
        if ratio > score or ratio == score and best is None:
            best, score = known, ratio
    return best


def misnamed_settings(environ, own, other, token_set, skip_prefix=None, fixed=(),
                      other_fixed=()):
    """One warning line for each FLEET_* variable in `environ` that this program (its
    table `own`; `other` is the other program's) ignores by mistake: a name neither
    program reads, with the nearest that one does; one of this program's `fixed` values
    (a setting once, now a constant); or the other's token name while this program's
    token is not set (`token_set`)."""
    fixed = {s.name: s for s in fixed}
    own = [s.name for s in own]
    other = [s.name for s in other]
    quiet = {*other, *(s.name for s in other_fixed)}  # the other program's to judge
    lines = []
    for name in sorted(n for n in environ if n.startswith("FLEET_")):
        if name in own:
            continue
        if name in fixed:
            lines.append(f"{name} is now a fixed value ({shown_default(fixed[name])}) and "
                         f"is ignored")
            continue
        if name in TOKEN_SETTINGS:  # the other program's token
            if not token_set:
                mine = next(t for t in TOKEN_SETTINGS if t in own)
                lines.append(f"{name} is {owner_of(name)} setting; {owner_of(mine)} token "
                             f"is {mine}, which is not set")
            continue
        if name in quiet or skip_prefix and name.startswith(skip_prefix):
            continue
        nearest = nearest_setting(name, own, other)
        if nearest is None:
            lines.append(f"{name} is not a setting and is ignored (--help lists them)")
        else:
            whose = "" if nearest in own else f", {owner_of(nearest)} setting"
            lines.append(f"{name} is not a setting and is ignored: did you mean "
                         f"{nearest}{whose}?")
    return lines
