#!/usr/bin/env python3
"""herd_node.py: the Herd node agent. Run it beside each Ollama.

It finds the router by mDNS (_fleet-manager._tcp) or --router-url, and every few
seconds tells it what this machine is and holds: hardware, memory, CPU, disk, Ollama's
version and settings, models on disk, models loaded, and how many requests Ollama
serves in parallel. If Ollama is down it keeps reporting that, and picks up again by
itself when Ollama is back. On SIGTERM / Ctrl-C it drains: the router sends no new
work here, the requests running here finish (up to 30 s; a second
Ctrl-C stops waiting), and then the agent tells the router it has left.

On a laptop, FLEET_NODE_ENABLE_CAPACITY_LEARNING=true makes it learn when its owner
uses the machine (capacity-learner-<id>.json in FLEET_NODE_DATA_DIR), report how
available it is and how much memory models may take, and pause the node while the
camera or microphone is in use, memory pressure is critical or the owner's CPU stays busy.

It can also serve images and speech itself (see "Media" below): mflux's commands,
DiffusionKit's diffusionkit-cli or mlx-qwen3-asr found on PATH, or an OpenAI-compatible
server named by FLEET_NODE_IMAGE_URL / FLEET_NODE_TRANSCRIBE_URL, on its media server
(port 11436), which only the router's signed requests may use.

Run:   python herd_node.py                      (find the router by mDNS)
       python herd_node.py --router-url http://192.168.1.10:11435
Key settings: FLEET_NODE_ROUTER_URL, FLEET_NODE_NODE_ID (short hostname),
              FLEET_NODE_OLLAMA_HOST (http://localhost:11434), FLEET_NODE_TOKEN (the
              router's FLEET_TOKEN; heartbeats are signed with it, it is never sent),
              FLEET_NODE_NUM_PARALLEL (else read from the running Ollama),
              FLEET_NODE_ENABLE_CAPACITY_LEARNING (false), FLEET_NODE_DATA_DIR

Check it from anywhere:
    $ curl -s http://192.168.1.10:11435/fleet/status | python3 -m json.tool
    {"router": {"version": "0.1.0", "nodes_online": 2, ...},
     "nodes": [{"node_id": "mac-studio", "status": "online", "num_parallel": 4, ...}]}
    $ curl -s http://192.168.1.10:11435/fleet/status | python3 -c 'import json,sys; \
        [print(n["node_id"], json.dumps(n["capacity"])) for n in json.load(sys.stdin)["nodes"]]'
    lap {"availability": 0.682, "trend": 30.42, "mode": "learning", "paused_reason": null,
         "confidence": 0.01, "memory_ceiling": 22086211850}
"""

import argparse
import asyncio
import base64
import collections
import contextlib
import ctypes
import ctypes.util
import functools
import glob
import ipaddress
import itertools
import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import unicodedata

import herd_common as hc  # first: it refuses a Python older than 3.11, in one line

try:
    import psutil
    from zeroconf import IPVersion, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
except ImportError:  # pragma: no cover
    sys.exit("Herd needs h11, psutil and zeroconf: pip install h11 psutil zeroconf")

log = logging.getLogger("herd.node")

NODE_SETTINGS = hc.NODE_SETTINGS  # herd_common's settings section: FLEET_NODE_*
NODE_FIXED = hc.NODE_FIXED  # and the fixed values beside them

####################################################################################
# Finding the router
####################################################################################


class RouterFinder:
    """Browse mDNS for the router; `url` follows it if it moves."""

    def __init__(self, interfaces):
        self.interfaces = interfaces
        self.url = None
        self.found = asyncio.Event()
        self._zc = None
        self._browser = None
        self._tasks = set()

    async def start(self):
        from zeroconf import InterfaceChoice
        self._zc = AsyncZeroconf(interfaces=self.interfaces or InterfaceChoice.All,
                                 ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, hc.MDNS_SERVICE_TYPE,
                                            handlers=[self._on_change])
        log.info("looking for the router on mDNS", extra={"event": "mdns_browse"})

    def _on_change(self, zeroconf, service_type, name, state_change):
        if state_change is ServiceStateChange.Removed:
            log.warning("router left mDNS", extra={"event": "mdns_removed", "url": self.url})
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name),
                                                      name=f"resolve {name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name):
        info = AsyncServiceInfo(hc.MDNS_SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, 3000):
            return
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses:
            return
        tls = (info.properties or {}).get(b"tls") == b"1"
        url = f"{'https' if tls else 'http'}://{addresses[0]}:{info.port}"
        if url != self.url:
            log.info("found the router", extra={"event": "router_found", "url": url})
            self.url = url
        self.found.set()

    async def close(self):
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_close()


####################################################################################
# Capacity: what the owner leaves for models (FLEET_NODE_ENABLE_CAPACITY_LEARNING)
#
# Theory: a laptop is someone's computer first. On every heartbeat the agent measures
# the owner's load: the CPU used by every process but Ollama's and its own, and the
# memory in use outside them. The CapacityLearner folds that into one of 168 slots, one
# per hour of the week in local time: a weight (minutes seen) and the means of the load
# and of its square, the weight halving every two weeks, so a habit that stops fades and
# the file never grows. The availability it reports blends the load now with the slot's
# usual load, trusting the slot by its confidence (minutes / (minutes + 120)): on day one
# it is the load now, never a week of blackout. The PauseWatch says when the node must
# take no new work at all (camera or microphone in use, critical memory pressure, the
# owner's CPU held high for minutes); its probes run as a task of their own, off the
# heartbeat, each in a thread or a subprocess under a time-out. A paused node is left out
# by the router; the requests already running there finish.
####################################################################################

SLOTS = 168  # hours in a week: Monday 00:00-00:59 local time is slot 0
HALF_LIFE_S = 14 * 86400  # a slot's weight halves in two weeks without that hour seen
CONFIDENCE_MINUTES = 120.0  # a slot seen for 2 h (decayed) is trusted half
LEARNED_CONFIDENCE = 0.5  # from here the mode says "learned"
SAMPLE_MAX_S = 60.0  # one sample counts for at most a minute (a laptop that slept)
TREND_WINDOW_S = 300.0  # the trend: owner CPU over the last five minutes...
TREND_MIN_SPAN_S = 60.0  # ...once at least a minute of it is known
BUSY_CPU, BUSY_CLEAR_CPU, BUSY_FOR_S = 80.0, 70.0, 180.0  # owner CPU >= 80% for 3 min
CEILING_HEADROOM = 0.10  # of total memory, kept for the system beside the owner's peak
CEILING_FLOOR = 0.125  # of total memory: the ceiling never goes below this (0 = none)
PROBE_EVERY_S = 10.0  # pause probes
PROBE_TIMEOUT_S = 3.0  # one round of probes; a slow one keeps its last answer
PACTL_TIMEOUT_S = 2.0
SAVE_EVERY_S = 300.0
PROCESS_LIST_EVERY_S = 30.0  # Ollama's processes are looked for this often
MAX_PROCS_SCANNED = 4096  # /proc/<pid>/fd scans for /dev/video*, per probe
MAX_FDS_PER_PROC = 1024
# Linux PSI (/proc/pressure/memory): the share of the last 10 s that some task, or every
# task ("full"), stalled waiting for memory.
PSI_SOME_WARNING, PSI_SOME_CRITICAL, PSI_FULL_CRITICAL = 10.0, 40.0, 10.0
# macOS: sysctl kern.memorystatus_vm_pressure_level, the level Activity Monitor shows.
MACOS_PRESSURE_LEVELS = {1: "normal", 2: "warning", 4: "critical"}
STATE_FORMAT, STATE_VERSION = "herd-capacity-learner", 1


def fourcc(code):
    """The UInt32 that C makes of a four-character literal: 'gone' is 0x676F6E65."""
    return int.from_bytes(code.encode("ascii"), "big")


# macOS camera and microphone: CoreMediaIO and CoreAudio properties read through ctypes.
# Values as in Apple's SDK headers (CoreAudio/AudioHardware.h, AudioHardwareBase.h;
# CoreMediaIO/CMIOHardwareObject.h, CMIOHardwareSystem.h, CMIOHardwareDevice.h).
COREAUDIO_PATH = "/System/Library/Frameworks/CoreAudio.framework/CoreAudio"
COREMEDIAIO_PATH = "/System/Library/Frameworks/CoreMediaIO.framework/CoreMediaIO"
MAX_MEDIA_DEVICES = 64  # device ids read, and devices asked about, per framework per probe
# kAudioObjectSystemObject, kCMIOObjectSystemObject: the root object, which lists the devices.
SYSTEM_OBJECT = 1
# kAudioObjectPropertyScopeGlobal, kCMIOObjectPropertyScopeGlobal: the object as a whole.
SCOPE_GLOBAL = fourcc("glob")
# kAudioObjectPropertyScopeInput (= kAudioDevicePropertyScopeInput): a device's input side.
SCOPE_INPUT = fourcc("inpt")
# kAudioObjectPropertyElementMain, kCMIOObjectPropertyElementMain (formerly ...ElementMaster).
ELEMENT_MAIN = 0
# kAudioHardwarePropertyDevices, kCMIOHardwarePropertyDevices: the system's device ids (UInt32s).
PROPERTY_DEVICES = fourcc("dev#")
# kAudioDevicePropertyStreams: a device's stream ids in the scope asked (none: no input side).
PROPERTY_STREAMS = fourcc("stm#")
# kAudioDevicePropertyDeviceIsRunningSomewhere, kCMIODevicePropertyDeviceIsRunningSomewhere: a
# UInt32, 1 while the device runs in at least one process on the system.
PROPERTY_RUNNING_SOMEWHERE = fourcc("gone")


def hour_of_week(t):
    """The slot of a unix time: its hour of the week in local time, Monday 00:00 first."""
    tm = time.localtime(t)
    return tm.tm_wday * 24 + tm.tm_hour


def worse_pressure(a, b):
    return max(a, b or "normal", key=hc.MEMORY_PRESSURES.index)


class OwnerLoad:
    """The owner's share of this machine: CPU and memory used by every process but
    Ollama's (its server and runners) and this agent. Blocking: call it through
    asyncio.to_thread. Per-process CPU is read without sleeping (since the last read)."""

    def __init__(self, ps=None):
        self.ps = ps or psutil
        self._procs = {}  # pid -> Process: the same objects, so cpu_percent() has a past
        self._listed_at = -math.inf

    def _ours(self):
        if time.monotonic() - self._listed_at >= PROCESS_LIST_EVERY_S:
            found = {os.getpid(): self._procs.get(os.getpid()) or self.ps.Process()}
            for p in self.ps.process_iter(["name"]):
                if (p.info.get("name") or "").lower().startswith("ollama"):
                    found[p.pid] = self._procs.get(p.pid, p)
            self._procs, self._listed_at = found, time.monotonic()
        return self._procs

    def read(self, machine):
        """(owner CPU in percent of the whole machine, owner memory in bytes)."""
        cpu = held = 0.0
        for pid, proc in list(self._ours().items()):
            try:
                with proc.oneshot():
                    cpu += proc.cpu_percent(interval=None)
                    mem = proc.memory_info()
            except (psutil.Error, OSError):
                self._procs.pop(pid, None)  # gone; the next listing finds its successor
                continue
            # Weights Ollama maps from disk are page cache (Linux: `shared`), which the
            # machine's "used" memory leaves out already; only the rest is subtracted.
            held += mem.rss - getattr(mem, "shared", 0)
        cores = machine["cpu_cores"] or 1
        owner_cpu = min(100.0, max(0.0, machine["cpu_percent"] - cpu / cores))
        return owner_cpu, max(0, machine["memory"]["used"] - int(held))


class PauseProbes:
    """What this machine can tell of a camera, a microphone and memory pressure. `root`
    holds proc/ and dev/ (tests give a crafted tree), `pactl` the PipeWire/PulseAudio
    client ("" for none). macOS: memory pressure from the kernel's level, camera and
    microphone from CoreMediaIO and CoreAudio (`mac`, a MacDevices); that path has been
    tested against fake frameworks on Linux only, not on a Mac."""

    def __init__(self, root="/", system=None, pactl=None, pactl_timeout=PACTL_TIMEOUT_S,
                 mac=None):
        self.root = root
        self.system = system or platform.system()
        self.pactl = shutil.which("pactl") if pactl is None else pactl
        self.pactl_timeout = pactl_timeout
        self.mac = mac or MacDevices()

    async def reasons(self):
        """The reasons to pause found now (camera, microphone), in a fixed order."""
        if self.system == "Darwin":
            camera, microphone = await asyncio.to_thread(self.mac.read)
        elif self.system == "Linux":
            camera, capture = await asyncio.gather(asyncio.to_thread(self.camera_in_use),
                                                   asyncio.to_thread(self.alsa_capture))
            microphone = capture or await self.pulse_capture()
        else:
            return []
        found = ["camera in use"] if camera else []
        if microphone:
            found.append("microphone in use")
        return found

    def camera_in_use(self):
        """Does a process hold /dev/video* open? (Those this user may look at: the owner's
        apps run as the owner.) Bounded: MAX_PROCS_SCANNED processes, MAX_FDS_PER_PROC each."""
        if not glob.glob(os.path.join(self.root, "dev", "video*")):
            return False  # no camera at all: nothing to scan
        proc = os.path.join(self.root, "proc")
        try:
            pids = [d for d in os.listdir(proc) if d.isdigit()][:MAX_PROCS_SCANNED]
        except OSError:
            return False
        return any(self._holds_video(os.path.join(proc, pid, "fd")) for pid in pids)

    @staticmethod
    def _holds_video(fd_dir):
        try:
            with os.scandir(fd_dir) as fds:
                for fd in itertools.islice(fds, MAX_FDS_PER_PROC):
                    with contextlib.suppress(OSError):
                        if os.readlink(fd.path).startswith("/dev/video"):
                            return True
        except OSError:  # gone, or not ours to look at
            pass
        return False

    def alsa_capture(self):
        """Is an ALSA capture substream running (proc/asound/card*/pcm*c/sub*/status)?"""
        pattern = os.path.join(self.root, "proc", "asound", "card*", "pcm*c", "sub*", "status")
        for path in glob.glob(pattern)[:256]:
            with contextlib.suppress(OSError):
                with open(path) as f:
                    if "state: RUNNING" in f.read(4096):
                        return True
        return False

    async def pulse_capture(self):
        """Does PipeWire/PulseAudio record from a source that is not an output's monitor?"""
        if not self.pactl:
            return False
        sources, outputs = await asyncio.gather(self._pactl("sources"),
                                                self._pactl("source-outputs"))
        rows = lambda text: [line.split("\t") for line in (text or "").splitlines()]
        monitors = {r[0] for r in rows(sources) if len(r) > 1 and r[1].endswith(".monitor")}
        return any(len(r) > 1 and r[1] not in monitors for r in rows(outputs))

    async def _pactl(self, what):
        """`pactl list short <what>`, or None when it fails or takes too long."""
        try:
            proc = await asyncio.create_subprocess_exec(
                self.pactl, "list", "short", what, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        except OSError:
            return None
        try:
            async with asyncio.timeout(self.pactl_timeout):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return None
        return out[:65536].decode("utf-8", "replace") if proc.returncode == 0 else None

    def memory_pressure(self):
        """'normal', 'warning' or 'critical' as the kernel measures it, None if it cannot
        tell. Blocking (a small /proc read or one sysctl): call it in a thread."""
        if self.system == "Darwin":
            return macos_memory_pressure()
        try:
            with open(os.path.join(self.root, "proc", "pressure", "memory")) as f:
                return psi_memory_pressure(f.read(4096))
        except OSError:
            return None  # no PSI (an old kernel, or it is switched off)


def psi_memory_pressure(text):
    """The pressure level of /proc/pressure/memory's text, from its avg10 figures."""
    avg10 = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        fields = dict(p.split("=", 1) for p in rest.split() if "=" in p)
        with contextlib.suppress(ValueError):
            avg10[kind] = float(fields.get("avg10", "0"))
    some, full = avg10.get("some", 0.0), avg10.get("full", 0.0)
    if full >= PSI_FULL_CRITICAL or some >= PSI_SOME_CRITICAL:
        return "critical"
    return "warning" if some >= PSI_SOME_WARNING else "normal"


@functools.cache
def libc():
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def macos_memory_pressure():
    """macOS's own memory pressure level (what Activity Monitor's graph shows)."""
    try:
        level, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
        if libc().sysctlbyname(b"kern.memorystatus_vm_pressure_level", ctypes.byref(level),
                             ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
            return None
    except (OSError, AttributeError, TypeError):
        return None
    return MACOS_PRESSURE_LEVELS.get(level.value)


class PropertyAddress(ctypes.Structure):
    """AudioObjectPropertyAddress and CMIOObjectPropertyAddress: three UInt32s."""
    _fields_ = [("mSelector", ctypes.c_uint32), ("mScope", ctypes.c_uint32),
                ("mElement", ctypes.c_uint32)]


_U32 = ctypes.c_uint32
_U32_OUT = ctypes.POINTER(ctypes.c_uint32)
_ADDRESS = ctypes.POINTER(PropertyAddress)
# Name: (result, *arguments) as the headers declare them. OSStatus is an SInt32, 0 for success;
# the qualifier (size, pointer) is always 0 and NULL here.
COREAUDIO_FUNCTIONS = {
    # (inObjectID, inAddress, inQualifierDataSize, inQualifierData, outDataSize)
    "AudioObjectGetPropertyDataSize": (ctypes.c_int32, _U32, _ADDRESS, _U32, ctypes.c_void_p,
                                       _U32_OUT),
    # (..., ioDataSize: the buffer's size in, the bytes written out; outData)
    "AudioObjectGetPropertyData": (ctypes.c_int32, _U32, _ADDRESS, _U32, ctypes.c_void_p,
                                   _U32_OUT, ctypes.c_void_p),
}
COREMEDIAIO_FUNCTIONS = {
    # (objectID, address, qualifierDataSize, qualifierData, dataSize)
    "CMIOObjectGetPropertyDataSize": (ctypes.c_int32, _U32, _ADDRESS, _U32, ctypes.c_void_p,
                                      _U32_OUT),
    # (..., dataSize: the buffer's size, by value; dataUsed: the bytes written; data)
    "CMIOObjectGetPropertyData": (ctypes.c_int32, _U32, _ADDRESS, _U32, ctypes.c_void_p, _U32,
                                  _U32_OUT, ctypes.c_void_p),
}


class CallFailed(OSError):
    """A CoreAudio or CoreMediaIO call answered a non-zero OSStatus."""


class MacDevices:
    """Whether a camera or a microphone runs now for any process on macOS, read from
    CoreMediaIO and CoreAudio through ctypes (no helper app). `load(path)` opens a framework
    (tests give fakes with the same function names). Blocking: call read() in a thread. A
    framework that will not load or a call that fails means "cannot tell", which counts as
    not in use and is logged once, at debug level."""

    def __init__(self, load=ctypes.CDLL):
        self.load = load
        self._libs = {}
        self._said = set()  # what "cannot tell" was logged for already
        self._reading = threading.Lock()
        self._last = (False, False)

    def read(self):
        """(a camera runs, a microphone runs). While an earlier read is stuck in a call, its
        last answer (one thread at most waits on the frameworks)."""
        if not self._reading.acquire(blocking=False):
            return self._last
        try:
            self._last = (self._ask("camera", self._camera_runs),
                          self._ask("microphone", self._microphone_runs))
            return self._last
        finally:
            self._reading.release()

    def _ask(self, what, probe):
        try:
            return probe()
        except (OSError, AttributeError, TypeError, ValueError, ctypes.ArgumentError) as e:
            self._note(what, e)
            return False

    def _note(self, what, error):
        if what not in self._said:
            self._said.add(what)
            log.debug(f"cannot tell whether a {what} is in use: {error}",
                      extra={"event": "pause_probe_blind"})

    def _open(self, path, functions):
        """The framework at `path`, its functions given their C types (once)."""
        if path not in self._libs:
            lib = self.load(path)
            for name, (result, *arguments) in functions.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = result, arguments
            self._libs[path] = lib
        return self._libs[path]

    def _camera_runs(self):
        lib = self._open(COREMEDIAIO_PATH, COREMEDIAIO_FUNCTIONS)
        ids = self._device_ids(lib, lib.CMIOObjectGetPropertyDataSize, cmio_get)
        return any(self._running(lib, cmio_get, device, "camera") for device in ids)

    def _microphone_runs(self):
        """Does a device with an input side run? (Running is per device, not per side.)"""
        lib = self._open(COREAUDIO_PATH, COREAUDIO_FUNCTIONS)
        ids = self._device_ids(lib, lib.AudioObjectGetPropertyDataSize, audio_get)
        return any(self._running(lib, audio_get, device, "microphone")
                   and self._has_input(lib, device) for device in ids)

    @staticmethod
    def _device_ids(lib, size_of, get):
        """The first MAX_MEDIA_DEVICES device ids the system object lists."""
        address = PropertyAddress(PROPERTY_DEVICES, SCOPE_GLOBAL, ELEMENT_MAIN)
        size = ctypes.c_uint32(0)
        check(size_of(SYSTEM_OBJECT, ctypes.byref(address), 0, None, ctypes.byref(size)))
        ids = (ctypes.c_uint32 * min(MAX_MEDIA_DEVICES, size.value // 4))()
        if not ids:
            return []
        return ids[:min(len(ids), get(lib, SYSTEM_OBJECT, address, ids) // 4)]

    def _running(self, lib, get, device, what):
        """Is the device running somewhere? A device that fails to answer is not counted."""
        address = PropertyAddress(PROPERTY_RUNNING_SOMEWHERE, SCOPE_GLOBAL, ELEMENT_MAIN)
        value = ctypes.c_uint32(0)
        try:
            return get(lib, device, address, value) >= 4 and value.value != 0
        except CallFailed as e:  # e.g. unplugged since the list was read
            self._note(what, e)
            return False

    def _has_input(self, lib, device):
        address = PropertyAddress(PROPERTY_STREAMS, SCOPE_INPUT, ELEMENT_MAIN)
        size = ctypes.c_uint32(0)
        try:
            check(lib.AudioObjectGetPropertyDataSize(device, ctypes.byref(address), 0, None,
                                                     ctypes.byref(size)))
        except CallFailed as e:
            self._note("microphone", e)
            return False
        return size.value > 0


def check(status):
    """Raise CallFailed for a non-zero OSStatus (often a four-character code: '!obj')."""
    if status:
        raise CallFailed(f"OSStatus {status} ({fourcc_text(status)!r})")


def fourcc_text(status):
    """The four characters of an OSStatus, or '' when it is not printable as four."""
    raw = (status & 0xFFFFFFFF).to_bytes(4, "big")
    return raw.decode("ascii") if all(32 <= b < 127 for b in raw) else ""


def audio_get(lib, obj, address, buffer):
    """AudioObjectGetPropertyData into `buffer`: the bytes written."""
    size = ctypes.c_uint32(ctypes.sizeof(buffer))
    check(lib.AudioObjectGetPropertyData(obj, ctypes.byref(address), 0, None,
                                         ctypes.byref(size), ctypes.byref(buffer)))
    return min(size.value, ctypes.sizeof(buffer))


def cmio_get(lib, obj, address, buffer):
    """CMIOObjectGetPropertyData into `buffer`: the bytes written (its dataUsed)."""
    used = ctypes.c_uint32(0)
    check(lib.CMIOObjectGetPropertyData(obj, ctypes.byref(address), 0, None,
                                        ctypes.sizeof(buffer), ctypes.byref(used),
                                        ctypes.byref(buffer)))
    return min(used.value, ctypes.sizeof(buffer))


class PauseWatch:
    """Why this node must take no new work now, or None: what the probes last found (a
    task refreshes it every PROBE_EVERY_S), critical memory pressure, or the owner's CPU
    at BUSY_CPU or more for BUSY_FOR_S (cleared once it is under BUSY_CLEAR_CPU)."""

    def __init__(self, probes):
        self.probes = probes
        self.found = []
        self.busy_since = None
        self._slow = False

    async def probe(self):
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                found = await self.probes.reasons()
        except TimeoutError:
            if not self._slow:  # said once, not every PROBE_EVERY_S
                log.warning(f"pause probes took over {PROBE_TIMEOUT_S:g}s; keeping their "
                            f"last answer", extra={"event": "pause_probe_slow"})
            self._slow = True
            return
        self._slow = False
        if found != self.found:
            log.info(f"pause probes: {', '.join(found) or 'nothing in use'}",
                     extra={"event": "pause_probe"})
        self.found = found

    def observe_cpu(self, owner_cpu, now):
        if owner_cpu >= BUSY_CPU:
            self.busy_since = now if self.busy_since is None else self.busy_since
        elif owner_cpu < BUSY_CLEAR_CPU:
            self.busy_since = None

    def reason(self, pressure, now):
        reasons = list(self.found)
        if pressure == "critical":
            reasons.append("critical memory pressure")
        if self.busy_since is not None and now - self.busy_since >= BUSY_FOR_S:
            reasons.append(f"owner CPU at {BUSY_CPU:.0f}% or more for "
                           f"{BUSY_FOR_S / 60:.0f} min")  # one wording while it lasts
        return ", ".join(reasons)[:hc.PAUSED_REASON_MAX] or None


class Slot:
    """One hour of the week: a decayed weight (minutes seen) and weighted means of the
    owner's CPU (percent) and memory (share of the total), and of their squares."""

    __slots__ = ("weight", "cpu", "cpu_sq", "mem", "mem_sq", "updated")
    FIELDS = (("weight", 1e7), ("cpu", 100.0), ("cpu_sq", 1e4), ("mem", 1.0),
              ("mem_sq", 1.0), ("updated", 1e11))

    def __init__(self, **values):
        for name, _ in self.FIELDS:
            setattr(self, name, float(values.get(name, 0.0)))

    def decay_to(self, now):
        """Age the weight to `now` (the means stay: every sample fades alike)."""
        if self.weight and now > self.updated:
            self.weight *= 0.5 ** ((now - self.updated) / HALF_LIFE_S)
        self.updated = max(self.updated, now)

    def add(self, cpu, mem, weight, now):
        self.decay_to(now)
        self.weight += weight
        share = weight / self.weight
        self.cpu += (cpu - self.cpu) * share
        self.cpu_sq += (cpu * cpu - self.cpu_sq) * share
        self.mem += (mem - self.mem) * share
        self.mem_sq += (mem * mem - self.mem_sq) * share

    @property
    def cpu_spread(self):
        return math.sqrt(max(0.0, self.cpu_sq - self.cpu * self.cpu))

    @property
    def mem_spread(self):
        return math.sqrt(max(0.0, self.mem_sq - self.mem * self.mem))

    def as_dict(self):
        return {"weight": round(self.weight, 4), "cpu": round(self.cpu, 3),
                "cpu_sq": round(self.cpu_sq, 2), "mem": round(self.mem, 5),
                "mem_sq": round(self.mem_sq, 5), "updated": round(self.updated)}

    @classmethod
    def from_fields(cls, f):
        return cls(**{name: f.number(name, high) for name, high in cls.FIELDS})


class CapacityLearner:
    """The owner's habits by hour of the week, and the owner's CPU of the last minutes;
    kept in capacity-learner-<node id>.json. `clock` gives unix time (tests move it)."""

    def __init__(self, node_id, path, clock=time.time, sample_s=5.0):
        self.node_id, self.path, self.clock = node_id, path, clock
        self.sample_s = sample_s  # what the first measurement stands for: one heartbeat
        self.slots = [Slot() for _ in range(SLOTS)]
        self.recent = collections.deque(maxlen=128)  # (time, owner CPU) for the trend
        self._last_seen = None
        self.dirty = False

    def slot(self, now):
        s = self.slots[hour_of_week(now)]
        s.decay_to(now)
        return s

    def observe(self, owner_cpu, owner_mem_share, now):
        """One measurement of the owner's load, weighted by the time it stands for."""
        span = self.sample_s if self._last_seen is None else now - self._last_seen
        self._last_seen = now
        if span > 0:
            self.slot(now).add(owner_cpu, owner_mem_share, min(span, SAMPLE_MAX_S) / 60, now)
            self.dirty = True
        self.recent.append((now, owner_cpu))

    def confidence(self, now):
        weight = self.slot(now).weight
        return weight / (weight + CONFIDENCE_MINUTES)

    def availability(self, owner_cpu, now):
        """0..1: the share of the CPU the owner leaves now, blended with the share they
        usually leave at this hour (their mean plus one spread) by the slot's confidence."""
        s, trust = self.slot(now), self.confidence(now)
        usual = min(100.0, s.cpu + s.cpu_spread)
        return (1 - trust) * (1 - owner_cpu / 100) + trust * (1 - usual / 100)

    def memory_ceiling(self, total, owner_mem, now):
        """Bytes the owner leaves for models at this hour: the total less the larger of
        their use now and their usual peak (mean plus two spreads, trusted by confidence),
        less CEILING_HEADROOM for the system; never under CEILING_FLOOR of the total."""
        if not total:
            return 0
        s, trust = self.slot(now), self.confidence(now)
        peak = min(1.0, s.mem + 2 * s.mem_spread) * total
        expected = max(owner_mem, trust * peak + (1 - trust) * owner_mem)
        return int(max(CEILING_FLOOR * total, total - expected - CEILING_HEADROOM * total))

    def trend(self, now):
        """The owner's CPU trend: least-squares slope over the last TREND_WINDOW_S, in
        percentage points per minute (+ busier); 0 until TREND_MIN_SPAN_S is known."""
        points = [(t, v) for t, v in self.recent if now - t <= TREND_WINDOW_S]
        if len(points) < 3 or points[-1][0] - points[0][0] < TREND_MIN_SPAN_S:
            return 0.0
        mean_t = sum(t for t, _ in points) / len(points)
        mean_v = sum(v for _, v in points) / len(points)
        var = sum((t - mean_t) ** 2 for t, _ in points)
        slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / var * 60
        return max(-hc.CAPACITY_TREND_MAX, min(hc.CAPACITY_TREND_MAX, slope))

    def state(self):
        """The file's contents: every slot aged to now."""
        now = self.clock()
        for s in self.slots:
            s.decay_to(now)
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "node_id": self.node_id,
                "saved_at": hc.now_rfc3339(), "half_life_days": HALF_LIFE_S / 86400,
                "slot": "hour of the week in local time, Monday 00:00-00:59 first",
                "slots": [s.as_dict() for s in self.slots]}

    def save(self):
        """Write the file atomically (a temporary file, then a rename). Blocking."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        state, tmp = self.state(), self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.dirty = False
        return self.path

    def load(self):
        """Read the file; one that is damaged or another node's is set aside (renamed
        .damaged-<time>, so that the next save does not overwrite it) with a log line,
        and learning starts afresh. True if history was loaded. Blocking."""
        try:
            with open(self.path) as f:
                self.slots = self.parse(json.load(f))
        except FileNotFoundError:
            return False
        except OSError as e:
            log.warning(f"capacity learner file {self.path} cannot be read, learning "
                        f"afresh: {e}", extra={"event": "capacity_state_refused"})
            return False
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError;
            # RecursionError: nesting deep enough to exhaust the decoder
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            log.warning(f"capacity learner file {self.path} not used, learning afresh: "
                        f"{why}{self._set_aside()}", extra={"event": "capacity_state_refused"})
            return False
        log.info("capacity learner history loaded", extra={"url": self.path,
                                                          "event": "capacity_state_loaded"})
        return True

    def _set_aside(self):
        """Move the refused file aside; what to add to the log line about it."""
        try:
            return f" (moved to {hc.set_aside(self.path)})"
        except OSError as e:
            return f" (could not move it aside: {e.strerror or e})"

    def parse(self, data):
        """The slots of a state file, every field checked; ValueError if anything is off."""
        f = hc.Fields(data)
        if f.text("format", 64) != STATE_FORMAT or f.integer("version", 1 << 16) != \
                STATE_VERSION:
            raise ValueError(f"not a {STATE_FORMAT} file of version {STATE_VERSION}")
        if f.text("node_id", 64) != self.node_id:
            raise ValueError(f"it belongs to node '{f.text('node_id', 64)}'")
        slots = f.objects("slots", SLOTS)
        if len(slots) != SLOTS:
            raise ValueError(f"{len(slots)} slots instead of {SLOTS}")
        return [Slot.from_fields(s) for s in slots]


class Capacity:
    """The heartbeat's capacity section. With learning off (a dedicated machine) it
    says "full" and only sharpens the memory pressure field from the kernel's measure."""

    def __init__(self, cfg, node_id, probes=None, owner=None, clock=time.time):
        self.enabled = cfg.enable_capacity_learning
        self.probes = probes or PauseProbes()
        self.owner = owner or OwnerLoad()
        self.clock = clock
        path = os.path.join(cfg.data_dir, f"capacity-learner-{node_id}.json")
        self.learner = CapacityLearner(node_id, path, clock, cfg.heartbeat_interval)
        self.pauses = PauseWatch(self.probes)
        self._loaded = not self.enabled

    async def ensure_loaded(self):
        """Load the learner's file once, before the first measurement (or save)."""
        if not self._loaded:
            self._loaded = True
            await asyncio.to_thread(self.learner.load)

    def measure(self, machine):
        """The kernel's memory pressure and the owner's load, on top of read_machine's
        figures. Blocking: call it in a thread."""
        kernel = self.probes.memory_pressure()
        machine["memory"]["pressure"] = worse_pressure(machine["memory"]["pressure"], kernel)
        return self.owner.read(machine) if self.enabled else None

    async def section(self, machine):
        """Measure, learn, and return the heartbeat's capacity section."""
        await self.ensure_loaded()
        owner = await asyncio.to_thread(self.measure, machine)
        if not self.enabled:
            return {"availability": None, "trend": 0.0, "mode": "full", "paused_reason": None,
                    "confidence": 0.0, "memory_ceiling": 0}
        (owner_cpu, owner_mem), now = owner, self.clock()
        total = machine["memory"]["total"]
        self.learner.observe(owner_cpu, owner_mem / total if total else 0.0, now)
        self.pauses.observe_cpu(owner_cpu, now)
        reason = self.pauses.reason(machine["memory"]["pressure"], now)
        confidence = self.learner.confidence(now)
        mode = "paused" if reason else \
            "learned" if confidence >= LEARNED_CONFIDENCE else "learning"
        return {"availability": 0.0 if reason else
                round(self.learner.availability(owner_cpu, now), 3),
                "trend": round(self.learner.trend(now), 2), "mode": mode,
                "paused_reason": reason, "confidence": round(confidence, 3),
                "memory_ceiling": self.learner.memory_ceiling(total, owner_mem, now)}

    async def probe(self):
        await self.pauses.probe()

    async def save(self, only_if_changed=True):
        """Write the learner's file (if it learned since the last write)."""
        if not self.enabled or not self._loaded or (only_if_changed and
                                                    not self.learner.dirty):
            return None
        return await asyncio.to_thread(self.learner.save)

    def duties(self):
        """(step, interval, what) of the background loops capacity learning needs."""
        if not self.enabled:
            return []
        return [(self.probe, PROBE_EVERY_S, "pause probes"),
                (self.save, SAVE_EVERY_S, "saving the capacity learner")]


####################################################################################
# Media: images and speech this agent serves itself
#
# Theory: Ollama makes no speech and only some images, so the agent can serve them:
# with command-line tools it finds on PATH (mflux's text-to-image commands and
# DiffusionKit's diffusionkit-cli for images, mlx-qwen3-asr for speech, all Apple
# Silicon) or through an OpenAI-compatible server the operator names
# (FLEET_NODE_IMAGE_URL, FLEET_NODE_TRANSCRIBE_URL: any machine, any GPU). Its small HTTP
# server speaks OpenAI's two routes; only the router calls it, and with a fleet token
# every request must carry the router's signature. A request's tool runs (n pictures are
# n runs in turn, seeds seed, seed+1, ...) take place in a private temporary directory,
# FLEET_NODE_MEDIA_CONCURRENCY requests at a time, all of them within
# FLEET_NODE_MEDIA_TIMEOUT; when the router hangs up (its client left) the running tool's
# process group is killed and reaped, no further run starts, and the directory is
# removed. The heartbeat names a model only when it can be served now: its tool on PATH,
# a server whose GET /v1/models lists it.
####################################################################################

TINY_WAIT_S = 3.0  # GET /v1/models of a media server, per heartbeat
ANSWER_LIMIT = 64 << 20  # an image server's answer
PICTURES_LIMIT = 48 << 20  # the PNGs of one answer: 64 MB in base64, what the router reads
MAX_IMAGES = 10  # OpenAI's images API takes n from 1 to 10
MAX_PROMPT = 32000  # characters, the longest prompt OpenAI's images API takes
MAX_STEPS = 1000
MAX_SEED = (1 << 32) - 1
OPENAI_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
TIMED_FORMATS = ("verbose_json", "srt", "vtt")  # these need mlx-qwen3-asr's --timestamps
TEXT_TYPE = b"text/plain; charset=utf-8"

# mflux's text-to-image commands (its pyproject's [project.scripts]) and the --model
# values each one serves (the aliases of mflux's ModelConfig). Left out, since each needs
# an input image: mflux-generate-flux2-edit, -controlnet, -in-context, -in-context-edit,
# -in-context-catvton, -fill, -depth, -redux, -kontext, -qwen-edit and -fibo-edit; and
# mflux-concept, which draws attention maps of a concept rather than a picture.
MFLUX_COMMANDS = {
    "mflux-generate": ("schnell", "dev", "krea-dev"),
    "mflux-generate-flux2": ("flux2-klein-4b", "flux2-klein-9b", "flux2-klein-base-4b",
                             "flux2-klein-base-9b"),
    "mflux-generate-qwen": ("qwen-image",),
    "mflux-generate-fibo": ("fibo", "fibo-lite"),
    "mflux-generate-z-image": ("z-image",),
    "mflux-generate-z-image-turbo": ("z-image-turbo",),
    "mflux-generate-ernie-image": ("ernie-image",),
    "mflux-generate-ernie-image-turbo": ("ernie-image-turbo",),
    "mflux-generate-ideogram4": ("ideogram4",),
    "mflux-generate-krea2": ("krea2",),
}
MFLUX_MODEL_COMMANDS = {model: command for command, models in MFLUX_COMMANDS.items()
                        for model in models}
# diffusionkit-cli's --model-version choices (DiffusionKit's MMDIT_CKPT), each with the
# steps it runs when the request names none: the CLI's own default is 50 for every
# model, and DiffusionKit's README runs FLUX.1-schnell at 4.
DIFFUSIONKIT_MODELS = {
    "argmaxinc/mlx-FLUX.1-schnell": 4,
    "argmaxinc/mlx-FLUX.1-schnell-4bit-quantized": 4,
    "argmaxinc/mlx-FLUX.1-dev": None,
    "argmaxinc/mlx-stable-diffusion-3-medium": None,
    "argmaxinc/mlx-stable-diffusion-3.5-large": None,
    "argmaxinc/mlx-stable-diffusion-3.5-large-4bit-quantized": None,
}
IMAGE_BACKENDS = ("mflux", "diffusionkit")  # in the order the heartbeat names them


class MediaError(Exception):
    """A media request answered with an OpenAI error: status, message and, where the
    status does not say it, the error's type."""

    def __init__(self, status, message, error_type=None):
        super().__init__(message)
        self.status, self.error_type = status, error_type


async def run_tool(argv):
    """Run a tool to its end: (exit code, the tail of its stderr). On a cancel (the
    client left, or the request's time ran out) its whole process group is killed and
    reaped, never left behind."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
    except OSError as e:
        raise MediaError(500, f"{os.path.basename(argv[0])} could not start: "
                              f"{e.strerror or e}") from None
    try:
        _, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.shield(proc.wait())
        raise
    return proc.returncode, err[-2000:].decode("utf-8", "replace").strip()


def listed_models(answer):
    """The ids an OpenAI-compatible GET /v1/models lists (names the router will take)."""
    out = []
    for entry in (answer.get("data") or [])[:hc.MAX_MEDIA_MODELS]:
        name = entry.get("id") if isinstance(entry, dict) else None
        with contextlib.suppress(ValueError):
            out.append(hc.check_model_name(name))
    return out


def setting_names(value):
    """The model names of a comma-separated setting that the router will take."""
    names = (n.strip() for n in value.split(","))
    return [n for n in names if n and hc.MODEL_NAME_RE.fullmatch(n)]


def parse_size(size):
    """OpenAI's "WxH" as (width, height)."""
    width, _, height = str(size).lower().partition("x")
    if not (width.isdigit() and height.isdigit() and 0 < int(width) <= 4096
            and 0 < int(height) <= 4096):
        raise MediaError(400, f"size must be WIDTHxHEIGHT, e.g. 1024x1024, not {size!r}")
    return int(width), int(height)


def whole_number(body, key, low, high, default):
    """body[key], a whole number from low to high; `default` when it is absent."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise MediaError(400, f"{key} must be a whole number from {low} to {high}")
    return value


def read_image_request(body):
    """(prompt, n, width, height, steps, seed) of an OpenAI image request, each checked;
    steps is None when not given (the tool's own default), seed is random then."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise MediaError(400, "prompt is required")
    if len(prompt) > MAX_PROMPT or "\x00" in prompt:
        raise MediaError(400, f"prompt must be at most {MAX_PROMPT} characters, none NUL")
    if body.get("response_format") not in (None, "b64_json", "url"):
        raise MediaError(400, "response_format must be b64_json or url")
    n = whole_number(body, "n", 1, MAX_IMAGES, 1)
    width, height = parse_size(body.get("size") or "1024x1024")
    steps = whole_number(body, "steps", 1, MAX_STEPS, None)
    seed = whole_number(body, "seed", 0, MAX_SEED, None)
    if seed is None:
        seed = random.randrange(MAX_SEED + 1)
    return prompt, n, width, height, steps, seed


def checked_language(language):
    """A form's language field, fit to hand to a tool."""
    if len(language) > 64 or hc.CONTROL_CHARS.search(language):
        raise MediaError(400, "language must be at most 64 printable characters")
    return language


def read_file(path, limit=ANSWER_LIMIT):
    """A file's bytes; ValueError when it holds more than `limit`."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"more than {limit >> 20} MB")
    return data


class ImageTools:
    """The picture-making commands on PATH, the models each serves (FLEET_NODE_MFLUX_MODELS,
    FLEET_NODE_DIFFUSIONKIT_MODELS), and the command line of one picture."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.commands = {}  # model -> (backend, the command's path)

    def find(self):
        """Look on PATH again; the models that can be served now, as configured."""
        paths, commands = {}, {}
        for model, backend, command in self._wanted() if self.cfg.media_cli else ():
            if command not in paths:
                paths[command] = shutil.which(command)
            if paths[command] and model not in commands:
                commands[model] = (backend, paths[command])
        self.commands = dict(itertools.islice(commands.items(), hc.MAX_MEDIA_MODELS))
        return list(self.commands)

    def _wanted(self):
        """(model, backend, command) of each model the settings name; an empty setting
        names every model its tool's commands serve."""
        mflux = setting_names(self.cfg.mflux_models) or list(MFLUX_MODEL_COMMANDS)
        for model in mflux:  # a name of no known command is mflux-generate's to try
            yield model, "mflux", MFLUX_MODEL_COMMANDS.get(model, "mflux-generate")
        for model in setting_names(self.cfg.diffusionkit_models) or DIFFUSIONKIT_MODELS:
            yield model, "diffusionkit", "diffusionkit-cli"

    def backend(self):
        """How this node makes pictures: "mflux", "diffusionkit", "mflux+diffusionkit"."""
        found = {backend for backend, _ in self.commands.values()}
        return "+".join(b for b in IMAGE_BACKENDS if b in found) or None

    def command(self, model):
        """The name of the command that draws `model`."""
        return os.path.basename(self.commands[model][1])

    def check(self, model, width, height):
        """Refuse what the model's tool would refuse, before it is started."""
        if self.commands[model][0] == "diffusionkit" and (width % 16 or height % 16):
            raise MediaError(400, f"size must be a multiple of 16 on both sides for "
                                  f"{model}, not {width}x{height}")

    def argv(self, model, prompt, width, height, steps, seed, output):
        """The command line that draws one picture into `output` (an option's value is
        joined to it with "=", so that a prompt starting with "-" stays a prompt)."""
        backend, path = self.commands[model]
        if backend == "diffusionkit":
            steps = steps or DIFFUSIONKIT_MODELS.get(model)
            argv = [path, f"--model-version={model}", "--output-path", output]
        else:
            argv = [path, f"--model={model}", "--output", output]
        argv += [f"--prompt={prompt}", "--width", str(width), "--height", str(height),
                 "--seed", str(seed)]
        return argv + (["--steps", str(steps)] if steps else [])


####################################################################################
# Media: transcripts in OpenAI's formats, from mlx-qwen3-asr's JSON
#
# mlx-qwen3-asr's JSON file holds "text" and "language", "chunks" (about 30 s each, with
# start and end) always, and with --timestamps "segments": one per word, {text, start,
# end}, from its forced aligner (which drops punctuation). OpenAI's srt, vtt and
# verbose_json segments are those words grouped into subtitle cues.
####################################################################################

CUE_MAX_CHARS = 42  # a subtitle line's usual limit (mlx-qwen3-asr's own writer keeps it)
CUE_MAX_S = 6.0
CUE_GAP_S = 0.8  # a pause this long starts a new cue


def json_seconds(value):
    """A time in seconds from a tool's JSON, or None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) and value >= 0 else None


def timed_words(result):
    """The transcript's well-formed word segments as (start, end, text), in order."""
    words = []
    segments = result.get("segments")
    for s in segments if isinstance(segments, list) else ():
        if not isinstance(s, dict) or not isinstance(s.get("text"), str):
            continue
        start, end = json_seconds(s.get("start")), json_seconds(s.get("end"))
        text = " ".join(s["text"].split())
        if start is not None and end is not None and text:
            words.append((start, max(start, end), text))
    return spelled_as_written(words, str(result.get("text", "")))


def spelled_as_written(words, text):
    """The words with the transcript's punctuation, when the two match word for word
    (otherwise, as in Chinese or Japanese, as the aligner gave them)."""
    written = text.split()
    bare = ["".join(c for c in w if not unicodedata.category(c).startswith("P"))
            for w in written]
    if len(written) != len(words) or any(b.casefold() != w[2].casefold()
                                         for b, w in zip(bare, words)):
        return words
    return [(start, end, spelled) for (start, end, _), spelled in zip(words, written)]


def is_cjk(char):
    """Han, kana: scripts written without spaces between words."""
    return "\u3040" <= char <= "\u30ff" or "\u3400" <= char <= "\u9fff" or \
        "\uf900" <= char <= "\ufaff"


def subtitle_cues(words):
    """Words grouped into cues (start, end, text): a cue ends before a pause of CUE_GAP_S,
    and before it would pass CUE_MAX_CHARS or CUE_MAX_S."""
    cues = []
    for start, end, word in words:
        if cues:
            first, last, text = cues[-1]
            text += ("" if is_cjk(text[-1]) or is_cjk(word[0]) else " ") + word
            if start - last < CUE_GAP_S and end - first <= CUE_MAX_S and \
                    len(text) <= CUE_MAX_CHARS:
                cues[-1] = (first, end, text)
                continue
        cues.append((start, end, word))
    return cues


def cue_time(t, mark):
    """HH:MM:SS,mmm (SubRip, mark ",") or HH:MM:SS.mmm (WebVTT, mark ".")."""
    ms = round(t * 1000)
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{mark}" \
           f"{ms % 1000:03d}"


def srt_text(cues):
    return "".join(f"{i}\n{cue_time(start, ',')} --> {cue_time(end, ',')}\n{text}\n\n"
                   for i, (start, end, text) in enumerate(cues, 1))


def vtt_text(cues):
    return "WEBVTT\n\n" + "".join(f"{cue_time(start, '.')} --> {cue_time(end, '.')}\n"
                                  f"{text}\n\n" for start, end, text in cues)


def transcript_answer(result, answer_format):
    """OpenAI's answer in `answer_format` from mlx-qwen3-asr's JSON: (body, type)."""
    text = str(result.get("text", "")).strip()
    if answer_format == "text":
        return text.encode(), TEXT_TYPE
    if answer_format == "json":
        return hc.dump_json({"text": text}), hc.JSON_TYPE
    cues = subtitle_cues(timed_words(result))
    if answer_format == "srt":
        return srt_text(cues).encode(), TEXT_TYPE
    if answer_format == "vtt":
        return vtt_text(cues).encode(), b"text/vtt; charset=utf-8"
    return hc.dump_json(verbose_transcript(result, text, cues)), hc.JSON_TYPE


def verbose_transcript(result, text, cues):
    """OpenAI's verbose_json: the cues are its segments; the duration is where the last
    chunk (or else cue) ends."""
    chunks = result.get("chunks")
    ends = [json_seconds(c.get("end")) for c in chunks if isinstance(c, dict)] \
        if isinstance(chunks, list) else []
    ends = [e for e in ends if e is not None] or [end for _, end, _ in cues]
    language = result.get("language")
    return {"task": "transcribe", "language": language if isinstance(language, str) else None,
            "duration": max(ends, default=0.0), "text": text,
            "segments": [{"id": i, "start": start, "end": end, "text": cue}
                         for i, (start, end, cue) in enumerate(cues)]}


####################################################################################
# Media: the agent's media server
####################################################################################

class Media:
    """What this node serves of images and speech, and how (see the theory above)."""

    def __init__(self, cfg, node_id):
        self.cfg = cfg
        self.signatures = hc.SignatureCheck(cfg.token, nonce_path=os.path.join(
            cfg.data_dir, f"media-nonces-{node_id}.txt")) if cfg.token else None
        self.images = ImageTools(cfg)
        self.models = {hc.IMAGE: [], hc.TRANSCRIPTION: []}
        self.backends = {}
        self.slots = {kind: asyncio.Semaphore(max(1, cfg.media_concurrency))
                      for kind in hc.MEDIA_KINDS}
        self.server = self.port = None
        self.running = 0  # requests whose tools are running

    def configured(self):
        """Could this node serve a media kind at all (a URL set, a tool on PATH)?"""
        return bool(self.cfg.image_url or self.cfg.transcribe_url or self.images.find()
                    or self._asr_tool())

    def _asr_tool(self):
        return shutil.which("mlx-qwen3-asr") if self.cfg.media_cli else None

    async def refresh(self):
        """Find what can be served now: a server's listed models, a tool on PATH."""
        for kind, url in ((hc.IMAGE, self.cfg.image_url),
                          (hc.TRANSCRIPTION, self.cfg.transcribe_url)):
            if url:
                models, how = await self._listed(kind, url), "server"
            elif kind == hc.IMAGE:
                models, how = self.images.find(), self.images.backend()
            else:
                how = "mlx-qwen3-asr"
                models = setting_names(self.cfg.asr_models) if self._asr_tool() else []
            self.models[kind] = models[:hc.MAX_MEDIA_MODELS]
            if how and models:
                self.backends[kind] = how
            else:
                self.backends.pop(kind, None)

    async def _listed(self, kind, url):
        try:
            return listed_models(await hc.http_json(url, "GET", "/v1/models",
                                                    timeout=TINY_WAIT_S))
        except hc.UpstreamError as e:
            log.debug(f"{kind} server not answering: {e}", extra={"url": url})
            return []

    async def section(self, router_url):
        """The heartbeat's media section, or None when nothing can be served now."""
        if self.port is None:
            return None
        await self.refresh()
        if not self.backends:
            return None
        url = self.cfg.media_url or f"http://{self.cfg.media_host}:{self.port}"
        if router_url and not self.cfg.media_url:
            router_host, router_port, _ = hc.split_url(router_url)
            url = await asyncio.to_thread(hc.advertised_ollama_url, url, router_host,
                                          router_port)
        return {"url": url, "image_models": self.models[hc.IMAGE],
                "transcribe_models": self.models[hc.TRANSCRIPTION],
                "backends": dict(self.backends),
                "concurrency": max(1, self.cfg.media_concurrency),
                "timeout": self.cfg.media_timeout}

    # -- the server ---------------------------------------------------------------

    async def start(self, host=None, port=None):
        """Listen (FLEET_NODE_MEDIA_HOST / _PORT); returns the port bound."""
        cfg = self.cfg
        limit = int(cfg.max_upload_mb * (1 << 20))
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: hc.HttpConnection(self.handle, max_body=1 << 20, idle_timeout=75.0,
                                      read_timeout=30.0,
                                      stream_limits={"/v1/audio/transcriptions": limit},
                                      log=log),
            cfg.media_host if host is None else host, cfg.media_port if port is None
            else port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        log.info(f"media server listening on port {self.port}", extra={"event": "media_up"})
        return self.port

    async def stop(self):
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def handle(self, request, conn):
        """The HttpConnection handler: the router's image and speech requests."""
        route = {("POST", "/v1/images/generations"): self.image,
                 ("POST", "/v1/audio/transcriptions"): self.transcribe}.get(
                     (request.method, request.path))
        try:
            if route is None:
                raise MediaError(404, f"{request.path[:100]}: not served here")
            refusal = self.signatures.refuse(request) if self.signatures else None
            if refusal:
                raise MediaError(401, f"only the router may call this agent: {refusal}")
            conn.watch_client()  # the router hanging up cancels the work (and its tool)
            await route(request, conn)
        except MediaError as e:
            await conn.send_response(e.status, hc.openai_error_body(
                e.status, str(e), error_type=e.error_type))

    def _check_model(self, kind, model):
        if kind not in self.backends or model not in self.models[kind]:
            raise MediaError(404, f"model '{model}' is not served here")

    @contextlib.asynccontextmanager
    async def _tool_runs(self, kind, tool):
        """The tool runs of one request: FLEET_NODE_MEDIA_CONCURRENCY requests at a time
        (each kind), all of its runs within FLEET_NODE_MEDIA_TIMEOUT, a 504 past it."""
        async with self.slots[kind]:
            self.running += 1
            try:
                async with asyncio.timeout(self.cfg.media_timeout):
                    yield
            except TimeoutError:
                raise MediaError(504, f"{tool} took more than FLEET_NODE_MEDIA_TIMEOUT "
                                      f"({self.cfg.media_timeout:g}s)", "timeout") from None
            finally:
                self.running -= 1

    async def _run(self, argv):
        """One tool run, inside _tool_runs; MediaError if it fails."""
        code, err = await run_tool(argv)
        if code != 0:
            raise MediaError(500, f"{os.path.basename(argv[0])} failed (exit {code}): "
                                  f"{hc.printable(err)[-300:]}")

    # -- images -------------------------------------------------------------------

    async def image(self, request, conn):
        try:
            body = hc.parse_json_body(request.body)
            model = hc.check_model_name(body.get("model"))
        except ValueError as e:
            raise MediaError(400, str(e)) from None
        self._check_model(hc.IMAGE, model)
        if self.backends[hc.IMAGE] == "server":
            status, headers, data = await hc.http_call(
                self.cfg.image_url, "POST", "/v1/images/generations", request.body,
                timeout=self.cfg.media_timeout)
            ctype = next((v for k, v in headers if k == b"content-type"), hc.JSON_TYPE)
            return await conn.send_response(status, data, ctype)
        pictures = await self._draw(model, body)
        images = [base64.b64encode(png).decode() for png in pictures]
        items = [{"url": "data:image/png;base64," + image} for image in images] \
            if body.get("response_format") == "url" else [{"b64_json": i} for i in images]
        await conn.send_json(200, {"created": int(time.time()), "data": items})

    async def _draw(self, model, body):
        """The n pictures of one request: the model's tool run n times in turn, with the
        seeds seed, seed+1, ..., each reading its picture from its output file."""
        prompt, n, width, height, steps, seed = read_image_request(body)
        self.images.check(model, width, height)
        tool, pictures, left = self.images.command(model), [], PICTURES_LIMIT
        with tempfile.TemporaryDirectory(prefix="herd-image-") as work:
            outputs = [os.path.join(work, f"image-{i}.png") for i in range(n)]
            argvs = [self.images.argv(model, prompt, width, height, steps,
                                      (seed + i) & MAX_SEED, output)  # 0 follows MAX_SEED
                     for i, output in enumerate(outputs)]
            async with self._tool_runs(hc.IMAGE, tool):
                for output, argv in zip(outputs, argvs):
                    await self._run(argv)
                    try:
                        pictures.append(await asyncio.to_thread(read_file, output, left))
                    except (OSError, ValueError) as e:
                        raise MediaError(500, f"{tool} left no picture to send: {e}"
                                         ) from None
                    left -= len(pictures[-1])
        return pictures

    # -- speech -------------------------------------------------------------------

    async def transcribe(self, request, conn):
        if hc.TRANSCRIPTION not in self.backends:
            raise MediaError(404, "no speech-to-text here")
        if self.backends[hc.TRANSCRIPTION] == "server":
            return await self._relay_upload(request, conn)
        with tempfile.TemporaryDirectory(prefix="herd-speech-") as work:
            fields, audio = await self._save_form(request, conn, work)
            model = fields.get("model", "")
            self._check_model(hc.TRANSCRIPTION, model)
            answer_format = fields.get("response_format") or "json"
            if answer_format not in OPENAI_FORMATS:
                raise MediaError(400, f"response_format must be one of "
                                      f"{', '.join(OPENAI_FORMATS)} here")
            argv = [self._asr_tool() or "mlx-qwen3-asr", audio, f"--model={model}",
                    "--output-dir", work, "--output-format", "json", "--no-progress"]
            if answer_format in TIMED_FORMATS:
                argv.append("--timestamps")
            if fields.get("language"):
                argv.append("--language=" + checked_language(fields["language"]))
            async with self._tool_runs(hc.TRANSCRIPTION, "mlx-qwen3-asr"):
                await self._run(argv)
            result = await self._read_transcript(work, audio)
        await conn.send_response(200, *transcript_answer(result, answer_format))

    async def _read_transcript(self, work, audio):
        """mlx-qwen3-asr's JSON file: <output dir>/<the audio's stem>.json."""
        stem = os.path.splitext(os.path.basename(audio))[0]
        try:
            result = json.loads(await asyncio.to_thread(
                read_file, os.path.join(work, stem + ".json")))
        except (OSError, ValueError) as e:
            raise MediaError(500, f"mlx-qwen3-asr wrote no transcript: {e}") from None
        if not isinstance(result, dict):
            raise MediaError(500, "mlx-qwen3-asr wrote no transcript: not a JSON object")
        return result

    async def _save_form(self, request, conn, work):
        """The form's fields, and its file written into `work` as it arrives."""
        try:
            reader = hc.FormReader(hc.form_boundary(request.header("content-type")))
        except ValueError as e:
            raise MediaError(400, str(e)) from None
        fields, current, audio, out = {}, None, None, None
        try:
            while data := await request.stream.receive(conn.read_timeout):
                for event, value in reader.feed(data):
                    if event == "part" and value.filename is not None and audio is None:
                        ext = os.path.splitext(value.filename)[1][:8]
                        ext = ext if ext[1:].isalnum() else ".wav"
                        audio = os.path.join(work, "audio" + ext)
                        out, current = open(audio, "wb"), None
                    elif event == "part":
                        current, out = value.name, None
                        fields[current] = ""
                    elif event == "data" and out is not None:
                        await asyncio.to_thread(out.write, value)
                    elif event == "data" and current is not None:
                        fields[current] = (fields[current] +
                                           value.decode("utf-8", "replace"))[:4096]
                    elif event == "end" and out is not None:
                        out.close()
                        out = None
        except (ValueError, hc.BodyTooLarge) as e:
            raise MediaError(400 if isinstance(e, ValueError) else 413, str(e)) from None
        finally:
            if out is not None:
                out.close()
        if audio is None:
            raise MediaError(400, "the form has no file")
        return fields, audio

    async def _relay_upload(self, request, conn):
        """Stream the router's upload on to the transcription server; its answer back."""
        host, port, base = hc.split_url(self.cfg.transcribe_url)
        up = await hc.Upstream.connect(host, port, 10.0)
        try:
            up.send_head(b"POST", (base + "/v1/audio/transcriptions").encode(),
                         hc.end_to_end_headers(request.headers, (b"x-herd-timestamp",
                                                                 b"x-herd-nonce",
                                                                 b"x-herd-signature")),
                         hc.forwarded_length(request))
            while data := await request.stream.receive(conn.read_timeout):
                await up.send_body(data, self.cfg.media_timeout)
            up.end_body()
            status, headers = await up.receive_head(self.cfg.media_timeout)
            body = await up.read_body(self.cfg.media_timeout, ANSWER_LIMIT)
        except hc.UpstreamError as e:
            raise MediaError(502, f"transcription server: {e}") from None
        finally:
            up.close()
        ctype = next((v for k, v in headers if k == b"content-type"), hc.JSON_TYPE)
        await conn.send_response(status, body, ctype)


####################################################################################
# What serves the models: Ollama, or another server that speaks OpenAI's API
#
# Each kind proves itself by one GET the others answer otherwise. The answer's fields
# decide, never its status alone: LM Studio answers every path it does not know with
# 200 and {"error": "Unexpected endpoint or method. ..."}, so a check by status took it
# for an Ollama with no models; and some llama-server builds imitate /api/tags. Probed
# in this order, the first that proves a kind wins:
#   Ollama            GET /api/version    {"version": "0.x"} and no "error"
#   llama-server      GET /props          "total_slots" or "default_generation_settings",
#                                         or "role": "router" (router mode: no model)
#                                         (503 "Loading model" on every path while it
#                                         loads: llama-server, not ready)
#   LM Studio         GET /api/v0/models  {"data": [...]}, each with "state"
#   vLLM              GET /version        {"version": "..."} and no "error"
#   llama-cpp-python  GET /openapi.json   info.title "... llama.cpp Python API" (its
#                                         /v1/models takes the model's lock and cuts a
#                                         running stream short: never polled)
#   an imitation of   GET /api/tags       {"models": [...]} and no "error" (after
#   Ollama                                llama-server, whose builds may answer it too)
#   mlx_lm.server     GET /v1/models entries of id, object and created only, and
#                     GET /health {"status": "ok"}; any other /v1/models: "openai"
####################################################################################

PROBE_TIMEOUT_S = 3.0


async def get_answer(url, path, timeout):
    """(status, headers, JSON object or None) of GET `path`; UpstreamError when
    nothing answers at all."""
    status, headers, data = await hc.http_call(url, "GET", path, timeout=timeout)
    try:
        obj = json.loads(data) if data else None
    except (ValueError, RecursionError):
        obj = None
    return status, headers, obj if isinstance(obj, dict) else None


def proves(answer, *keys):
    """A 200 whose JSON object has one of `keys` and no "error"."""
    status, _, obj = answer
    return status == 200 and obj is not None and "error" not in obj and \
        any(k in obj for k in keys)


def printable_version(value):
    return hc.CONTROL_CHARS.sub(" ", value)[:64] if isinstance(value, str) else ""


async def detect_server(url, timeout=PROBE_TIMEOUT_S, known=None):
    """The kind of inference server at `url` (hc.SERVER_KINDS) and its version, as
    {"kind", "version"}; or {"kind": None, "error": why} when none answers as one.
    `known`: the kind found there last, whose own probe goes first after Ollama's (each
    proves its kind alone), so that a heartbeat's look costs two GETs, not five."""
    try:
        answer = await get_answer(url, "/api/version", timeout)
    except hc.UpstreamError as e:
        return {"kind": None, "error": str(e)}
    if hc.from_herd(answer[1]):
        return {"kind": None, "error": f"{url} answers as the Herd router, not as Ollama: "
                                       f"{hc.PORTS_HINT}"}
    if proves(answer, "version") and isinstance(answer[2]["version"], str):
        return {"kind": hc.OLLAMA_KIND, "version": printable_version(answer[2]["version"])}
    for kind, path, check in sorted(SERVER_CHECKS, key=lambda c: c[0] != known):
        try:
            found = check(await get_answer(url, path, timeout))
        except hc.UpstreamError as e:
            return {"kind": None, "error": str(e)}
        if found is not None:
            return {"kind": kind, "version": printable_version(found)}
    try:
        models = await get_answer(url, "/v1/models", timeout)
        if openai_models(models) is None:
            return {"kind": None, "error": f"{url} answers, but neither as Ollama nor as "
                                           f"an OpenAI-compatible server (no /api/version, "
                                           f"no /v1/models)"}
        health = await get_answer(url, "/health", timeout)
    except hc.UpstreamError as e:
        return {"kind": None, "error": str(e)}
    return {"kind": "mlx-lm" if is_mlx(health, models) else "openai", "version": ""}


def llama_server(answer):
    """llama.cpp's /props: its build, or "" while it loads its model (every path is
    then 503 "Loading model"); None when it is not llama-server."""
    status, _, obj = answer
    if proves(answer, "total_slots", "default_generation_settings") or \
            proves(answer, "role") and obj["role"] == "router":  # started with no model
        return str(obj.get("build_info") or "")
    error = (obj or {}).get("error")
    if status == 503 and isinstance(error, dict) and error.get("message") == "Loading model":
        return ""
    return None


def lm_studio(answer):
    data = (answer[2] or {}).get("data")
    if proves(answer, "data") and isinstance(data, list) and \
            all(isinstance(m, dict) and "state" in m for m in data):
        return ""  # its REST API says no version
    return None


def vllm(answer):
    return answer[2]["version"] if proves(answer, "version") else None


def llama_cpp_python(answer):
    info = (answer[2] or {}).get("info")
    if answer[0] == 200 and isinstance(info, dict) and \
            "llama.cpp Python API" in str(info.get("title")):
        return info.get("version")
    return None


def ollama_imitation(answer):
    """A server that lists models as Ollama does (/api/tags) but has no /api/version:
    routed as an Ollama, of no known release."""
    models = (answer[2] or {}).get("models")
    return "" if proves(answer, "models") and isinstance(models, list) else None


def openai_models(answer):
    return "" if proves(answer, "data") and isinstance(answer[2]["data"], list) else None


def is_mlx(health, models):
    """mlx_lm.server, known only by what it lacks: {"status": "ok"} at /health, and
    /v1/models entries of id, object and created alone (an OpenAI server's answers)."""
    return health[0] == 200 and health[2] == {"status": "ok"} and all(
        isinstance(m, dict) and set(m) <= {"id", "object", "created"}
        for m in models[2]["data"])


# Servers that answer one request at a time: llama-cpp-python's cuts a running stream
# short for any other request that needs its model (another chat, even /v1/models);
# mlx_lm.server reports no capacity (batching came in 0.28.4: set more by hand).
ONE_AT_A_TIME = ("llama-cpp-python", "mlx-lm")


async def read_openai_server(url, server, timeout=PROBE_TIMEOUT_S):
    """What a server of OpenAI's API holds, in read_ollama's shape, with its slots
    where it says. LM Studio and llama-server's router mode say which models are
    loaded, and load and unload on request (server["loads"]); on the others every
    model listed counts as on disk and loaded. llama-cpp-python's list is read once
    (reading it again would cut a running stream short; its model is fixed for the
    process's life). vLLM's /metrics give its requests running and waiting
    (server["load"]). UpstreamError when it does not answer."""
    kind = server["kind"]
    if kind == "lmstudio":
        return await read_lm_studio(url, server, timeout)
    props = {}
    if kind == "llama-server":
        _, _, props = await get_answer(url, "/props", timeout)
        props = props or {}
        if props.get("role") == "router":
            return await read_llama_router(url, server, timeout)
    if kind == "vllm":
        server["load"] = await read_vllm_load(url, timeout)
    elif kind == "llama-server":
        server["load"] = await read_llama_slots(url, timeout)
    if "models" not in server or kind != "llama-cpp-python":
        n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx") \
            if isinstance(props.get("default_generation_settings"), dict) else None
        server["models"] = [listed_model(m, n_ctx)
                            for m in await model_list(url, "/v1/models", timeout)]
    slots = 1 if kind in ONE_AT_A_TIME else 0
    total = props.get("total_slots")
    if isinstance(total, int) and 0 < total <= 1024:
        slots = total
    # Its version is the heartbeat's server's, not Ollama's: /api/version counts Ollamas.
    return {"ok": True, "version": "", "models": server["models"],
            "loaded": server["models"], "num_parallel": slots}


async def model_list(url, path, timeout):
    """The entries of a server's model list (its "data") that have an id; UpstreamError
    when it gives no list."""
    status, _, obj = await get_answer(url, path, timeout)
    data = (obj or {}).get("data") if status == 200 else None
    if not isinstance(data, list):
        raise hc.UpstreamError("status", f"GET {path} answered {status}")
    return [m for m in data[:hc.MAX_MODELS]
            if isinstance(m, dict) and isinstance(m.get("id"), str)]


def listed_model(m, n_ctx=None):
    """A /v1/models entry as a model entry: its id, and the context it runs with where
    the server says (vLLM's max_model_len; llama-server's n_ctx, from /props)."""
    entry = {"name": m["id"], "model": m["id"]}
    context = m.get("max_model_len", n_ctx)
    if isinstance(context, int) and 0 < context <= 1 << 24:
        entry["details"] = {"context_length": context}
        entry["context_length"] = context
    return entry


async def read_lm_studio(url, server, timeout):
    """LM Studio's REST API: each model's kind, context and quantization, and which are
    loaded (/api/v0/models); its parallel predictions where 0.4's /api/v1/models
    says (loaded_instances' config). It loads a model when asked for it (just in time)
    and on request."""
    models, loaded = [], []
    for m in await model_list(url, "/api/v0/models", timeout):
        kind = m.get("type")
        entry = {"name": m["id"], "model": m["id"], "details": {
            "format": str(m.get("compatibility_type") or "")[:32],
            "quantization_level": str(m.get("quantization") or "")[:32]},
            "capabilities": ["embedding"] if kind == "embeddings" else
            ["completion", "vision"] if kind == "vlm" else ["completion"]}
        if isinstance(m.get("max_context_length"), int) and m["max_context_length"] > 0:
            entry["details"]["context_length"] = m["max_context_length"]
        models.append(entry)
        if m.get("state") == "loaded":
            loaded.append({k: v for k, v in entry.items() if k != "capabilities"})
    server["loads"] = True
    return {"ok": True, "version": "", "models": models, "loaded": loaded,
            "num_parallel": await lm_studio_parallel(url, timeout)}


async def lm_studio_parallel(url, timeout):
    """The most parallel predictions a loaded model takes (LM Studio 0.4's
    /api/v1/models); 0 when it does not say (an older LM Studio: its default is 4)."""
    with contextlib.suppress(hc.UpstreamError):
        status, _, obj = await get_answer(url, "/api/v1/models", timeout)
        found = [i.get("config", {}).get("parallel") for m in (obj or {}).get("models") or ()
                 if isinstance(m, dict) for i in m.get("loaded_instances") or ()
                 if isinstance(i, dict) and isinstance(i.get("config"), dict)]
        found = [p for p in found if isinstance(p, int) and 0 < p <= 1024]
        if status == 200 and found:
            return max(found)
    return 0


async def read_llama_router(url, server, timeout):
    """llama-server in router mode (started with no model): GET /models lists every
    model it can run, each with its status; it loads one when asked for it, or on
    request (POST /models/load, /models/unload)."""
    models, loaded = [], []
    for m in await model_list(url, "/models", timeout):
        entry = {"name": m["id"], "model": m["id"]}
        models.append(entry)
        state = m.get("status")
        if isinstance(state, dict) and state.get("value") == "loaded":
            loaded.append(entry)
    server["loads"] = True
    return {"ok": True, "version": "", "models": models, "loaded": loaded,
            "num_parallel": 0}


async def read_llama_slots(url, timeout):
    """llama-server's own count of its slots at work (/slots: each slot's
    is_processing); None where it does not say (started with --no-slots: a 501)."""
    with contextlib.suppress(hc.UpstreamError):
        status, _, data = await hc.http_call(url, "GET", "/slots", timeout=timeout)
        try:
            slots = json.loads(data) if status == 200 else None
        except (ValueError, RecursionError):
            slots = None
        if isinstance(slots, list):
            busy = sum(1 for s in slots[:1024] if isinstance(s, dict) and
                       s.get("is_processing") is True)
            return {"running": busy, "waiting": 0, "kv_cache": None}
    return None


VLLM_GAUGES = {"running": ("vllm:num_requests_running",),
               "waiting": ("vllm:num_requests_waiting",),
               "kv_cache": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")}


async def read_vllm_load(url, timeout):
    """vLLM's own count of requests running and waiting, and its KV cache's use
    (0..1), from /metrics (Prometheus text; summed over its engines, the cache's
    largest); None when it does not answer them."""
    try:
        status, _, data = await hc.http_call(url, "GET", "/metrics", timeout=timeout)
    except hc.UpstreamError:
        return None
    if status != 200:
        return None
    found = {}
    for line in data.decode("utf-8", "replace").splitlines()[:100_000]:
        name, _, rest = line.partition("{") if "{" in line else line.partition(" ")
        for key, names in VLLM_GAUGES.items():
            if name.strip() in names:
                with contextlib.suppress(ValueError, IndexError):
                    value = float(rest.rsplit(" ", 1)[-1] if "{" in line else rest)
                    if math.isfinite(value) and value >= 0:
                        found[key] = max(found.get(key, 0.0), value) if key == "kv_cache" \
                            else found.get(key, 0.0) + value
    if not found:
        return None
    return {"running": int(found.get("running", 0)), "waiting": int(found.get("waiting", 0)),
            "kv_cache": min(1.0, found.get("kv_cache", 0.0))}


# (kind, GET path, reader of its answer: the version when it proves the kind, else None)
SERVER_CHECKS = (("llama-server", "/props", llama_server),
                 ("lmstudio", "/api/v0/models", lm_studio),
                 ("vllm", "/version", vllm),
                 ("llama-cpp-python", "/openapi.json", llama_cpp_python),
                 (hc.OLLAMA_KIND, "/api/tags", ollama_imitation))


####################################################################################
# Heartbeats
####################################################################################


class Agent:
    """Reads this machine and its Ollama; reports to the router."""

    def __init__(self, cfg, finder=None, probes=None, owner=None, clock=time.time,
                 battery=None):
        self.cfg = cfg
        self.battery = battery or (lambda: read_battery(psutil))  # a seam for tests
        self.wake_addresses = lambda: read_wake(psutil)  # and another
        self.finder = finder
        self.node_id = cfg.node_id or hc.default_node_id()
        self.capacity = Capacity(cfg, self.node_id, probes, owner, clock)
        self.media = Media(cfg, self.node_id)
        self.tls = ssl.create_default_context(cafile=cfg.ca) if cfg.ca else None
        self.settings = {}
        self._settings_at = 0.0
        self._ollama_was_ok = None
        self.server = None  # {"kind", "version"} of the server found (detect_server)
        self.links = {}  # router URL -> RouterLink: what each router last said
        self.clock = clock  # the wall clock (a seam: the sleep watch reads it)
        self._clocks = None  # (wall, monotonic) at the sleep watch's last look
        self.sent = 0  # heartbeats some router took

    @property
    def router_urls(self):
        """Every router this agent reports to: those it was given, else the one mDNS
        found (none yet: an empty tuple)."""
        if self.cfg.router_urls:
            return self.cfg.router_urls
        return (self.finder.url,) if self.finder and self.finder.url else ()

    @property
    def router_url(self):
        """The first router: the one whose address says which of this machine's
        addresses the routers reach it at."""
        return self.router_urls[0] if self.router_urls else None

    async def read_settings(self):
        """Ollama's own OLLAMA_* settings, re-read once a minute (Ollama may restart).
        What its process does not say (another user's on macOS, another machine's), the
        agent's own environment tells (snapshot), as it does the slots."""
        if time.monotonic() - self._settings_at < 60:
            return self.settings
        host, port, _ = hc.split_url(self.cfg.ollama_host)
        found = None
        if hc.is_loopback_host(host):  # else its process is on another machine
            found, _ = await asyncio.to_thread(hc.find_ollama_settings, psutil, port)
        self.settings, self._settings_at = found or {}, time.monotonic()
        return self.settings

    async def snapshot(self, draining=False, leaving=False):
        """The heartbeat body for now."""
        ollama, machine, settings = await asyncio.gather(
            self.read_server(), asyncio.to_thread(hc.read_machine, psutil, self.cfg.data_dir),
            self.read_settings())
        self._note_ollama(ollama)
        capacity = await self.capacity.section(machine)
        power = await asyncio.to_thread(self.battery)
        capacity = on_battery(capacity, power, self.cfg.on_battery)
        slots, source = hc.resolve_num_parallel(self.cfg.num_parallel, settings, os.environ)
        if ollama.get("num_parallel") and not self.cfg.num_parallel:
            slots, source = ollama["num_parallel"], self.server["kind"]  # the server's own
        media = await self.media.section(self.router_url)
        own = {k: os.environ[k] for k in hc.OLLAMA_SETTING_VARS if k in os.environ}
        return hc.build_heartbeat(self.node_id, await self.ollama_url(), machine, ollama,
                                  {**own, **settings}, slots, source, draining, leaving,
                                  capacity, media, self.server,
                                  power and {**power, "policy": self.cfg.on_battery},
                                  self.wake_addresses() if self.cfg.wake else ())

    async def read_server(self):
        """What the server beside the agent holds, in read_ollama's shape. Its kind is
        found first (detect_server), and again at every heartbeat while it is not an
        Ollama (cheap probes: a server of OpenAI's API may be replaced by an Ollama, or
        go away); another kind's models come from read_openai_server."""
        if self.server is None or self.server["kind"] != hc.OLLAMA_KIND:
            found = await detect_server(self.cfg.ollama_host,
                                        known=self.server and self.server["kind"])
            if found["kind"] is None:
                self.server = None
                return {"ok": False, "error": found["error"]}
            if self.server is None or self.server["kind"] != found["kind"]:
                self.server = found
            self.server["version"] = found["version"]
        if self.server["kind"] != hc.OLLAMA_KIND:
            try:
                return await read_openai_server(self.cfg.ollama_host, self.server)
            except hc.UpstreamError as e:
                self.server = None
                return {"ok": False, "error": str(e)}
        ollama = await hc.read_ollama(self.cfg.ollama_host, timeout=3)
        if not ollama["ok"]:
            self.server = None
        elif ollama["version"]:
            self.server["version"] = ollama["version"][:64]  # it may have been upgraded
        return ollama

    async def ollama_url(self):
        if self.cfg.ollama_url:
            return self.cfg.ollama_url
        if self.router_url is None:  # no router found yet (a drain before discovery)
            return self.cfg.ollama_host
        router_host, router_port, _ = hc.split_url(self.router_url)
        return await asyncio.to_thread(hc.advertised_ollama_url, self.cfg.ollama_host,
                                       router_host, router_port)

    def _note_ollama(self, ollama):
        if ollama["ok"] != self._ollama_was_ok:
            if ollama["ok"]:
                log.info("Ollama is reachable", extra={"url": self.cfg.ollama_host,
                                                       "event": "ollama_up"})
            else:
                log.warning("Ollama is unreachable", extra={
                    "url": self.cfg.ollama_host, "error": ollama.get("error"),
                    "event": "ollama_down"})
            self._ollama_was_ok = ollama["ok"]

    async def send(self, hb):
        """POST one heartbeat (signed with the token, if any) to every router; the
        first router's answer that took it, with the most requests any router still
        counts running here (`in_flight`, which a drain waits on), else None."""
        urls = self.router_urls
        for url in urls:
            if url not in self.links:
                self.links[url] = RouterLink(url, self.cfg, self.tls)
        answers = [a for a in await asyncio.gather(*(self.links[u].send(hb) for u in urls))
                   if a is not None]
        if not answers:
            return None
        self.sent += 1
        first = dict(answers[0])
        counts = [a["in_flight"] for a in answers if type(a.get("in_flight")) is int]
        if counts:
            first["in_flight"] = max(counts)
        return first

    async def run(self):
        """Heartbeat until cancelled (learning capacity: probe for pauses, save too)."""
        await self.capacity.ensure_loaded()
        if self.router_url is None:
            await self.finder.found.wait()

        async def beat():
            await self.send(await self.snapshot())
        duties = [(beat, self.cfg.heartbeat_interval, "heartbeat"),
                  (self.watch_sleep, RESUME_CHECK_S, "sleep watch"),
                  *self.capacity.duties()]
        async with asyncio.TaskGroup() as tg:
            for step, interval, what in duties:
                tg.create_task(hc.repeat(step, interval, log, what), name=what)

    async def watch_sleep(self):
        """After the machine slept (the wall clock ran on while the monotonic one, which
        the heartbeat's wait counts in, stood still), beat at once: the router may hold
        a request for this node, woken for it (Wake-on-LAN)."""
        wall, mono = self.clock(), time.monotonic()
        last, self._clocks = self._clocks, (wall, mono)
        if last is not None and slept(last, (wall, mono)):
            log.info("the machine woke from sleep: heartbeat now", extra={"event": "resumed"})
            await self.send(await self.snapshot())

    def save_state(self, hb):
        """Write what this node knows of its capacity, for a person or a later run."""
        path = os.path.join(self.cfg.data_dir, f"node-state-{self.node_id}.json")
        state = {"node_id": self.node_id, "saved_at": hc.now_rfc3339(), "reason": "drain",
                 "heartbeats_sent": self.sent, "ollama": hb["ollama"],
                 "memory": hb["memory"], "hardware": hb["hardware"],
                 "models_loaded": [m.get("model") or m.get("name") for m in hb["loaded"]]}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=2)
        os.replace(tmp, path)  # never a half-written file
        return path

    async def drain(self, hurry=None):
        """Save our state and leave the fleet gently: the router first hears that we
        drain (no new work here), then, once the requests running here have finished
        (Ollama keeps running; the router counts them), that we have left. `hurry`, an
        event, ends the wait early (a second Ctrl-C)."""
        hb = await self.snapshot(draining=True)
        try:
            path = await self.capacity.save(only_if_changed=False)
            if path:
                log.info("capacity learner saved", extra={"url": path,
                                                          "event": "capacity_saved"})
        except OSError as e:
            log.warning(f"could not save the capacity learner: {e}",
                        extra={"event": "capacity_saved"})
        try:
            path = await asyncio.to_thread(self.save_state, hb)
            log.info("state saved", extra={"url": path, "event": "state_saved"})
        except OSError as e:
            log.warning(f"could not save state: {e}", extra={"event": "state_saved"})
        if self.router_url is None:
            return False
        answer = await self.send(hb)
        deadline = time.monotonic() + self.cfg.drain_timeout
        while answer and answer.get("in_flight") and time.monotonic() < deadline:
            log.info(f"draining: {answer['in_flight']} requests still running here",
                     extra={"event": "drain"})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(1.0, self.cfg.heartbeat_interval)):
                    await (hurry or asyncio.Event()).wait()
            if hurry is not None and hurry.is_set():
                break
            answer = await self.send(await self.snapshot(draining=True))
        left = await self.send(await self.snapshot(draining=True, leaving=True))
        log.info("left the fleet" if left is not None else "could not tell the router we "
                 "left", extra={"event": "drain"})
        return left is not None


RESUME_CHECK_S = 1.0  # how often the agent looks whether the machine slept
SLEPT_S = 3.0  # wall-clock seconds beyond the monotonic ones that mean it slept


def slept(before, now):
    """Did the machine sleep between two (wall, monotonic) readings? The monotonic clock
    stands still while it sleeps (Linux, macOS), the wall clock does not."""
    return (now[0] - before[0]) - (now[1] - before[1]) > SLEPT_S


def read_wake(psutil):
    """This machine's network interfaces a Wake-on-LAN packet can reach: each one's MAC
    and the broadcast address of its IPv4 subnet (loopback and interfaces without an
    IPv4 address left out)."""
    try:
        interfaces = psutil.net_if_addrs()
    except (AttributeError, OSError, RuntimeError):
        return []
    found = []
    for addrs in interfaces.values():
        mac = next((a.address for a in addrs if a.family == psutil.AF_LINK), None)
        ipv4 = next((a for a in addrs if a.family == socket.AF_INET), None)
        if not mac or ipv4 is None or not ipv4.netmask or \
                ipaddress.ip_address(ipv4.address).is_loopback:
            continue
        mac = mac.lower().replace("-", ":")
        if not hc.MAC_ADDRESS.fullmatch(mac) or mac == "00:00:00:00:00:00":
            continue
        try:
            net = ipaddress.IPv4Network(f"{ipv4.address}/{ipv4.netmask}", strict=False)
        except ValueError:
            continue
        found.append({"mac": mac, "broadcast": str(net.broadcast_address)})
    return found[:hc.MAX_WAKE_ADDRESSES]


def read_battery(psutil):
    """The machine's battery, as {"on_battery", "percent"}; None where it has none
    (a desktop, or a system psutil cannot read it on)."""
    try:
        battery = psutil.sensors_battery()
    except (AttributeError, NotImplementedError, OSError, RuntimeError):
        return None
    if battery is None:
        return None
    percent = battery.percent if isinstance(battery.percent, (int, float)) and \
        math.isfinite(battery.percent) else None
    return {"on_battery": battery.power_plugged is False,
            "percent": None if percent is None else round(max(0.0, min(100.0, percent)), 1)}


def on_battery(capacity, power, policy):
    """The capacity section as the battery makes it (FLEET_NODE_ON_BATTERY): on battery,
    "pause" pauses the node, "avoid" leaves the fleet nothing of it (its availability
    0, which the router weighs; the router also scores it down) and pauses it below
    BATTERY_PAUSE_PERCENT; plugged in, or "serve", as it was."""
    if not power or not power["on_battery"] or policy == "serve":
        return capacity
    percent = power["percent"]
    low = percent is not None and percent < hc.BATTERY_PAUSE_PERCENT
    if policy == "pause" or low:
        charge = f" at {percent:g} %" if percent is not None else ""
        return {**capacity, "availability": 0.0, "mode": "paused",
                "paused_reason": capacity.get("paused_reason") or f"on battery{charge}"}
    return {**capacity, "availability": 0.0}


class RouterLink:
    """One router an agent reports to, and what it last said, each said once: whether
    it takes our heartbeats, whether its answers can be read, whether it checks our
    signature."""

    def __init__(self, url, cfg, tls):
        self.url, self.cfg, self.tls = url, cfg, tls
        self.ok = None  # did the last heartbeat go through (None: none sent yet)
        self.token_unchecked = False
        self.answer_error = None  # why its last answer could not be read

    async def send(self, hb):
        """POST one heartbeat; its answer when it took it, else None."""
        try:
            status, headers, body = await hc.http_call(self.url, "POST", "/heartbeat", hb,
                                                       timeout=5, tls=self.tls,
                                                       sign=self.cfg.token or None)
        except hc.UpstreamError as e:
            self._note_router(False, str(e))
            return None
        if status != 200:
            self._note_router(False, refusal_text(self.url, status, headers, body))
            return None
        self._note_router(True, None)
        try:
            answer = hc.read_json_answer(body, "the router")
        except hc.UpstreamError as e:
            self._note_answer(str(e))
            return {}
        self._note_answer(None)
        answer = answer if isinstance(answer, dict) else {}
        self._note_token(answer)
        return answer

    def _note_token(self, answer):
        """A router with no FLEET_TOKEN takes our signed heartbeats without checking
        them (it says token_checked: false): say so once, until that changes."""
        unchecked = bool(self.cfg.token) and answer.get("token_checked") is False
        if unchecked and not self.token_unchecked:
            log.warning("the router has no FLEET_TOKEN: it does not check this agent's "
                        "signature, and any host can join its fleet. Set FLEET_TOKEN on the "
                        "router to this agent's FLEET_NODE_TOKEN",
                        extra={"url": self.url, "event": "token_unchecked"})
        self.token_unchecked = unchecked

    def _note_answer(self, error):
        """Say once that the router's answers cannot be read, not at every beat (the
        heartbeats are taken all the same); and once that they can again."""
        if error and not self.answer_error:
            log.warning(f"heartbeat taken, but {error} (said once, until an answer can "
                        f"be read again)", extra={"url": self.url, "event": "router_answer"})
        self.answer_error = error

    def _note_router(self, ok, error):
        if ok != self.ok or not ok:
            if ok:
                log.info("heartbeats accepted", extra={"url": self.url, "event": "router_ok"})
            else:
                level = logging.WARNING if self.ok is not False else logging.DEBUG
                log.log(level, "heartbeat failed", extra={"url": self.url, "error": error,
                                                          "event": "heartbeat_failed"})
        self.ok = ok


def refusal_text(router_url, status, headers, body):
    """A refused heartbeat's status and message; when no Herd router answered (an
    unknown route), what answered instead: an agent pointed at Ollama's port gets
    Ollama's plain-text 404 "404 page not found" (gin's answer to an unknown path)."""
    text = f"{status}: {body[:200].decode('utf-8', 'replace')}"
    if status not in (404, 405) or hc.from_herd(headers):
        return text
    what = "an Ollama" if body.startswith(b"404 page not found") else "no Herd router"
    return (f"{text} ({router_url} is {what}, not the router: {hc.PORTS_HINT}; set "
            f"--router-url or FLEET_NODE_ROUTER_URL to the router's)")


####################################################################################
# Run
####################################################################################


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="herd_node.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Herd node agent: reports this machine's Ollama to the Herd router.",
        epilog=hc.format_settings_help(NODE_SETTINGS))
    parser.add_argument("--router-url", help="router URL (or several, comma-separated), "
                                             "skipping mDNS "
                                             "(FLEET_NODE_ROUTER_URL)")
    parser.add_argument("--node-id", help="this node's name (FLEET_NODE_NODE_ID)")
    parser.add_argument("--ollama-host", "--server-url", dest="ollama_host", metavar="URL",
                        help="where Ollama (or another inference server) listens "
                             "(FLEET_NODE_OLLAMA_HOST, or FLEET_NODE_SERVER_URL)")
    parser.add_argument("--token", help="the router's FLEET_TOKEN (FLEET_NODE_TOKEN)")
    hc.add_service_flags(parser)
    return parser.parse_args(argv)


SERVER_URL_NAME = "FLEET_NODE_SERVER_URL"  # FLEET_NODE_OLLAMA_HOST's other name


def load_node_config(environ, args, tuned=None):
    """The frozen config from the environment and command line; ConfigError if bad.
    `tuned` sets fixed values by name (tests only)."""
    environ = server_url_as_ollama_host(environ)
    cfg = hc.load_config(NODE_SETTINGS, environ, "FLEET_NODE_", {
        "router_url": args.router_url, "node_id": args.node_id,
        "ollama_host": args.ollama_host, "token": args.token}, NODE_FIXED, tuned)
    hc.check_log_level("FLEET_LOG_LEVEL", cfg.log_level)
    hc.check_log_level("FLEET_CONSOLE_LOG_LEVEL", cfg.console_log_level)
    routers = tuple(u.strip().rstrip("/") for u in cfg.router_url.split(",") if u.strip())
    for url in routers:
        try:
            hc.split_url(url)
        except ValueError as e:
            raise hc.ConfigError(f"FLEET_NODE_ROUTER_URL: {e}") from None
    for name in ("ollama_host", "ollama_url", "image_url", "transcribe_url", "media_url"):
        if getattr(cfg, name):
            try:
                hc.split_url(getattr(cfg, name))
                if name in ("ollama_host", "ollama_url", "media_url") and \
                        hc.is_https(getattr(cfg, name)):
                    raise ValueError("Ollama is spoken to over plain http://")
            except ValueError as e:
                raise hc.ConfigError(f"FLEET_NODE_{name.upper()}: {e}") from None
    if cfg.ca:
        try:
            ssl.create_default_context(cafile=os.path.expanduser(cfg.ca))
        except (OSError, ssl.SSLError) as e:
            raise hc.ConfigError(f"FLEET_NODE_CA={cfg.ca}: {e}") from None
    if cfg.node_id:
        try:
            hc.check_node_id(cfg.node_id)
        except ValueError as e:
            raise hc.ConfigError(f"FLEET_NODE_NODE_ID: {e}") from None
    if cfg.heartbeat_interval <= 0:
        raise hc.ConfigError("FLEET_NODE_HEARTBEAT_INTERVAL must be above 0")
    if cfg.on_battery not in hc.BATTERY_POLICIES:
        raise hc.ConfigError(f"FLEET_NODE_ON_BATTERY={cfg.on_battery!r}: use "
                             f"{', '.join(hc.BATTERY_POLICIES)}")
    if cfg.drain_timeout < 0:
        raise hc.ConfigError("FLEET_NODE_DRAIN_TIMEOUT must not be negative")
    if cfg.media_timeout <= 0:
        raise hc.ConfigError("FLEET_NODE_MEDIA_TIMEOUT must be above 0")
    values = cfg.as_dict()
    values["data_dir"] = hc.expand_dir(cfg.data_dir)
    values["router_urls"] = tuple(dict.fromkeys(routers))  # each once, in the order given
    values["ca"] = os.path.expanduser(cfg.ca) if cfg.ca else ""
    values["ollama_host"] = values["ollama_host"].rstrip("/")
    if values["ollama_host"] and "://" not in values["ollama_host"]:
        values["ollama_host"] = "http://" + values["ollama_host"]
    values["misnamed"] = tuple(hc.misnamed_settings(
        environ, NODE_SETTINGS, hc.ROUTER_SETTINGS, bool(cfg.token), fixed=NODE_FIXED,
        other_fixed=hc.ROUTER_FIXED))
    return hc.Config(values, cfg.sources)


def server_url_as_ollama_host(environ):
    """FLEET_NODE_SERVER_URL is FLEET_NODE_OLLAMA_HOST by another name (the server there
    need not be an Ollama); both set, to different places, is a ConfigError."""
    if SERVER_URL_NAME not in environ:
        return environ
    host = environ.get("FLEET_NODE_OLLAMA_HOST")
    if host is not None and host != environ[SERVER_URL_NAME]:
        raise hc.ConfigError(f"{SERVER_URL_NAME} and FLEET_NODE_OLLAMA_HOST are one setting; "
                             f"they name different places: set one")
    return {k: v for k, v in environ.items() if k != SERVER_URL_NAME} | {
        "FLEET_NODE_OLLAMA_HOST": environ[SERVER_URL_NAME]}


async def run(cfg):
    finder = None
    if not cfg.router_url:
        interfaces = [i.strip() for i in cfg.mdns_interfaces.split(",") if i.strip()]
        finder = RouterFinder(interfaces)
        await finder.start()
    agent = Agent(cfg, finder)
    if agent.media.configured():  # a URL set, or a tool on PATH: serve images or speech
        try:
            await agent.media.start()
        except OSError as e:
            log.error(f"media server cannot listen on port {cfg.media_port}: "
                      f"{e.strerror or e}", extra={"event": "media_down"})
    psutil.cpu_percent(interval=None)  # start the CPU meter; the first reading is 0
    log.info(f"herd node {hc.VERSION} '{agent.node_id}' reporting Ollama at "
             f"{cfg.ollama_host}", extra={"node_id": agent.node_id})
    task = asyncio.create_task(agent.run(), name="heartbeat")
    stopper = asyncio.create_task(hc.stop_signal().wait(), name="stop-signal")
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for t in (task, stopper):
        t.cancel()
    await asyncio.wait({task, stopper})
    if not task.cancelled() and task.exception() is not None:
        log.error("heartbeat loop failed", exc_info=task.exception())
    await agent.drain(hurry=hc.stop_signal())  # a second signal stops the wait
    await agent.media.stop()
    if finder is not None:
        await finder.close()
    log.info("stopped", extra={"node_id": agent.node_id})
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if hc.service_asked(args):
        return hc.service_main("herd_node", args, os.environ, load_node_config, NODE_SETTINGS,
                               __file__, lambda cfg: cfg.drain_timeout, ollama_settings)
    return hc.run_program("herd_node", os.environ, args, load_node_config, "herd-node.jsonl",
                          run)


def ollama_settings(cfg):
    """Ollama's own OLLAMA_* settings, read from its process now, for the service: a
    service (as its own user) may not be able to read them there, Ollama's service
    running as user ollama."""
    host, port, _ = hc.split_url(cfg.ollama_host)
    if not hc.is_loopback_host(host):
        return {}
    found, _ = hc.find_ollama_settings(psutil, port)
    return {k: v for k, v in (found or {}).items() if k in hc.OLLAMA_SETTING_VARS}


if __name__ == "__main__":
    sys.exit(main())
