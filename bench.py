#!/usr/bin/env python3
"""bench.py: what the Herd router costs, measured against direct-to-Ollama in one run.

It starts fake_ollama.py (16 parallel slots) with herd.py serving it as its local node,
sends the same requests to the fake directly and through the router, alternating, from
raw HTTP/1.1 keep-alive sockets (one per concurrent worker; a client library would cost
more than the router and hide it), and prints a Markdown table (docs/benchmarks.md):

    time to first chunk   p50 / p99 at concurrency 1 and 16, 8-chunk streams, and the
                          time the router adds: Ollama NDJSON and OpenAI SSE against a
                          fake that answers flat out, NDJSON against one that writes a
                          chunk every 5 ms
    throughput            requests/s at concurrency 16, router / direct, each of those
    router CPU            per 1,000 streamed requests (the 8-chunk phases)
    relay cost            2,000-chunk streams (a second fake), Ollama NDJSON and OpenAI
                          SSE, one stream at a time and four at once: chunks/s, and
                          router CPU (user + system) per chunk the client received
    paced relay           16 streams of 300 chunks, one a millisecond, as a model
                          writes them (a third fake): one chunk per read in the router
    memory                router RSS idle after start-up, and after the load
    chaos                 steady load on three nodes with real agents while one Ollama
                          is killed and restarted: completed, failed clearly, lost, hung

Every process listens on 127.0.0.1 (free ports), with a temporary FLEET_DATA_DIR, and
is terminated on exit or Ctrl-C. The router runs with its default settings (the JSONL
debug line per request included) but FLEET_MDNS=false and FLEET_LOCAL_NODE=true; it is
used once /fleet/status shows its node online with 16 slots.

Run:   python bench.py                   (about 3 min on 2 cores)
       python bench.py --quick           (about 45 s)
       python bench.py --json out.json   (also writes every number, and each target met
                                          or not, as JSON)

docs/benchmarks.md shows full runs and explains each row.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

try:
    import psutil
except ImportError:  # pragma: no cover
    sys.exit("bench.py needs psutil: pip install psutil")

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = "llama3.2:3b"
SLOTS = 16
NDJSON, SSE = b"\n", b"data:"  # what the client counts: NDJSON lines, SSE events
SETTLE = 0.3  # seconds after a run before reading CPU times: trace writes land late
READY_TIMEOUT = 30.0
# Targets: what the router may add or use (the paced row is held to the relay's limit).
ADDED_FIRST_CHUNK_MS = {50: 1.0, 99: 2.0}
MIN_THROUGHPUT_RATIO = 0.95
MAX_CPU_PER_CHUNK_US = 20.0
MAX_IDLE_RSS_MB = 40.0
# Two backends for the 8-chunk streams: "short" answers as fast as the fake can (every
# process is then CPU-bound on the same two cores, so the router's CPU is taken from
# the backend's); "steady" writes a chunk every 5 ms, 200 tokens/s per stream, the fast
# end of a real model, so the backend has CPU and slots to spare.
SHORT_PHASES = (("short", "NDJSON, backend flat out"), ("short_sse", "SSE, backend flat out"),
                ("steady", "NDJSON, backend at 5 ms a chunk"))
STEADY_CHUNK_S = 0.005


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much load each phase sends (per path and round; rounds alternate paths)."""

    rounds: int
    c1_requests: int  # at concurrency 1
    c16_per_worker: int  # at concurrency 16
    steady_c1_requests: int  # the same against a fake at 5 ms a chunk
    steady_c16_per_worker: int
    relay_sequential: int  # 2,000-chunk streams one after another
    relay_concurrent: int  # per worker, 4 workers
    paced_per_worker: int  # 300-chunk paced streams, 16 workers
    chaos_seconds: float


PLANS = {
    "quick": Plan(rounds=2, c1_requests=150, c16_per_worker=12, steady_c1_requests=40,
                  steady_c16_per_worker=6, relay_sequential=5,
                  relay_concurrent=2, paced_per_worker=1, chaos_seconds=6),
    "full": Plan(rounds=3, c1_requests=1000, c16_per_worker=100, steady_c1_requests=200,
                 steady_c16_per_worker=40, relay_sequential=20,
                 relay_concurrent=5, paced_per_worker=2, chaos_seconds=15),
}

####################################################################################
# Processes: fakes, routers and agents on free ports, always stopped
####################################################################################


def free_port():
    """A port nothing listens on now (bind port 0, read it, let it go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent():
    """In the child: get SIGTERM if bench.py dies, even by SIGKILL (Linux only)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_process(exits, argv, env, log_path, stdout=None):
    """Popen a Python script from this folder; `exits` stops it (terminate, wait)."""
    log = open(log_path, "ab")
    exits.callback(log.close)
    # Its own session: Ctrl-C reaches bench.py alone, which stops the processes in order
    # (a fake that got the SIGINT too would hang up on a request first).
    proc = subprocess.Popen([sys.executable, *argv], cwd=HERE, env={**os.environ, **env},
                            stdout=stdout or log, stderr=log, stdin=subprocess.DEVNULL,
                            start_new_session=True,
                            preexec_fn=die_with_parent if sys.platform == "linux" else None)
    exits.callback(stop_process, proc)
    return proc


def stop_process(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()


def start_fake(exits, workdir, chunks, chunk_delay=0.0, port=0):
    """fake_ollama.py with 16 slots; returns (process, port) once it listens."""
    argv = ["fake_ollama.py", "--host", "127.0.0.1", "--port", str(port), "--models", MODEL,
            "--num-parallel", str(SLOTS), "--chunks", str(chunks),
            "--chunk-delay", str(chunk_delay), "--load-delay", "0"]
    log_path = os.path.join(workdir, "fake.log")
    proc = start_process(exits, argv, {"OLLAMA_NUM_PARALLEL": str(SLOTS)}, log_path,
                         stdout=subprocess.PIPE)
    ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
    line = proc.stdout.readline().decode() if ready else ""
    if "listening on http://" not in line:
        fail_to_start("fake_ollama.py", proc, log_path)
    return proc, int(line.rsplit(":", 1)[1])


def start_router(exits, workdir, settings):
    """herd.py on a free port with a temporary FLEET_DATA_DIR; returns (process, port)."""
    port = free_port()
    env = {"FLEET_HOST": "127.0.0.1", "FLEET_PORT": str(port), "FLEET_MDNS": "false",
           "FLEET_DATA_DIR": os.path.join(workdir, "data"), "FLEET_SHUTDOWN_GRACE": "2",
           "FLEET_CONSOLE_LOG_LEVEL": "WARNING", **settings}
    return start_process(exits, ["herd.py"], env, os.path.join(workdir, "router.log")), port


def fail_to_start(name, proc, log_path):
    """Stop the run with the program's own last words."""
    with open(log_path, errors="replace") as f:
        tail = f.read()[-2000:]
    state = "did not get ready" if proc.poll() is None else f"exited with {proc.returncode}"
    raise SystemExit(f"{name} {state} (log {log_path}):\n{tail}")


def fleet_nodes(port):
    """The router's nodes from /fleet/status, or None while it cannot answer."""
    url = f"http://127.0.0.1:{port}/fleet/status"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.load(r)["nodes"]
    except (OSError, ValueError, KeyError):
        return None


def wait_for_nodes(proc, port, workdir, count):
    """Poll /fleet/status until `count` nodes are online with their 16 slots."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        nodes = fleet_nodes(port) or []
        if sum(n.get("status") == "online" and n.get("num_parallel") == SLOTS
               for n in nodes) >= count:
            return
        time.sleep(0.1)
    fail_to_start("herd.py", proc, os.path.join(workdir, "router.log"))


@dataclasses.dataclass
class Stack:
    """A fake Ollama and a router that serves it as its local node."""

    ports: dict  # "direct" -> the fake's port, "router" -> the router's
    router: psutil.Process
    fake: psutil.Process


@contextlib.contextmanager
def running_stack(workdir, name, chunks, chunk_delay=0.0):
    """Start a fake and its router, yield them ready to route, then stop both."""
    workdir = os.path.join(workdir, name)
    os.makedirs(workdir)
    with contextlib.ExitStack() as exits:
        fake, fake_port = start_fake(exits, workdir, chunks, chunk_delay)
        proc, port = start_router(exits, workdir, {
            "FLEET_LOCAL_NODE": "true",
            "FLEET_LOCAL_OLLAMA_URL": f"http://127.0.0.1:{fake_port}"})
        wait_for_nodes(proc, port, workdir, 1)
        yield Stack({"direct": fake_port, "router": port}, psutil.Process(proc.pid),
                    psutil.Process(fake.pid))


def cpu_seconds(proc):
    """User + system CPU time of a process (all its threads), in seconds. Linux counts
    it in 10 ms ticks, so the full run's phases give the router a second or so of work."""
    t = proc.cpu_times()
    return t.user + t.system


def rss_mb(proc):
    return proc.memory_info().rss / 1e6  # MB as in the target, not MiB


####################################################################################
# The client: raw keep-alive HTTP/1.1, timed in data_received
####################################################################################


def http_request(path, body):
    """The bytes of one POST, as a client would send them to Ollama or the router."""
    data = json.dumps(body).encode()
    return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))


GENERATE = http_request("/api/generate", {"model": MODEL, "prompt": "x"})
CHAT_SSE = http_request("/v1/chat/completions", {
    "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]})


class Answer:
    """One response parsed as it arrives: head, then a chunked or Content-Length body.

    Each step takes the buffer and a position and returns the position after what it
    used, or None when it needs more bytes. Items (NDJSON lines, SSE events) are counted
    in the body's bytes whatever the HTTP chunking, as the router may regroup chunks.
    """

    def __init__(self, marker, done):
        self.marker, self.done = marker, done
        self.sent = time.perf_counter()
        self.step = self.read_head
        self.status, self.left, self.first, self.items = 0, 0, None, 0
        self.carry, self.error = b"", b""

    def feed(self, buf, now):
        """Parse what has arrived; returns how many bytes of `buf` were used."""
        pos = 0
        while not self.done.done():
            after = self.step(buf, pos, now)
            if after is None:
                break
            pos = after
        return pos

    def read_head(self, buf, pos, now):
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            return None
        status_line, *lines = bytes(buf[pos:end]).split(b"\r\n")
        self.status = int(status_line.split(b" ", 2)[1])
        headers = dict(line.lower().split(b":", 1) for line in lines)
        if headers.get(b"transfer-encoding", b"").strip() == b"chunked":
            self.step = self.read_size
        else:
            self.left, self.step = int(headers.get(b"content-length", 0)), self.read_fixed
        return end + 4

    def read_size(self, buf, pos, now):
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        self.left = int(bytes(buf[pos:end]).split(b";")[0], 16)
        self.step = self.read_data if self.left else self.read_trailer
        return end + 2

    def read_data(self, buf, pos, now):
        take = min(self.left, len(buf) - pos)
        if not take:
            return None
        self.take(buf[pos:pos + take], now)
        self.left -= take
        if not self.left:
            self.step = self.read_chunk_end
        return pos + take

    def read_chunk_end(self, buf, pos, now):
        if len(buf) - pos < 2:
            return None
        self.step = self.read_size
        return pos + 2

    def read_trailer(self, buf, pos, now):
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        if end == pos:  # the blank line after the last chunk (and any trailers)
            self.finish(now)
        return end + 2

    def read_fixed(self, buf, pos, now):
        take = min(self.left, len(buf) - pos)
        self.take(buf[pos:pos + take], now)
        self.left -= take
        if not self.left:
            self.finish(now)
        return pos + take if take or not self.left else None

    def take(self, piece, now):
        """Body bytes: the first marks the time to first chunk; count the items."""
        if self.first is None and piece:
            self.first = now - self.sent
        if self.status != 200:
            self.error += piece[:500]
        if len(self.marker) == 1:
            self.items += piece.count(self.marker)
            return
        joined = self.carry + piece  # a marker split across reads is counted once
        self.items += joined.count(self.marker)
        self.carry = joined[len(joined) - len(self.marker) + 1:]

    def finish(self, now):
        if self.status != 200:
            self.done.set_exception(RuntimeError(
                f"HTTP {self.status}: {self.error[:300].decode(errors='replace')}"))
        else:
            self.done.set_result((self.first if self.first is not None else now - self.sent,
                                  self.items))


class StreamClient(asyncio.Protocol):
    """One keep-alive connection, one request at a time; parsing runs in the callback,
    so no task wakes per read and the client costs little next to what it measures."""

    def __init__(self):
        self.transport, self.answer, self.lost = None, None, None
        self.buf = bytearray()

    def connection_made(self, transport):
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                      socket.TCP_NODELAY, 1)
        self.transport = transport

    def connection_lost(self, exc):
        self.lost = exc or ConnectionError("the server closed the keep-alive connection")
        if self.answer and not self.answer.done.done():
            self.answer.done.set_exception(ConnectionError(
                f"the server hung up mid-answer ({self.lost})"))

    def exchange(self, request, marker):
        """Send one request; a future of (seconds to first body chunk, items)."""
        if self.lost:
            raise ConnectionError(f"cannot send: {self.lost}")
        self.answer = Answer(marker, asyncio.get_running_loop().create_future())
        self.transport.write(request)
        return self.answer.done

    def data_received(self, data):
        now = time.perf_counter()
        self.buf += data
        if self.answer is None or self.answer.done.done():
            self.transport.close()  # bytes nobody asked for: the framing is off
            return
        try:
            used = self.answer.feed(self.buf, now)
        except ValueError as e:
            self.answer.done.set_exception(RuntimeError(f"unparsable response: {e}"))
            self.transport.close()
            return
        del self.buf[:used]


@dataclasses.dataclass(frozen=True)
class Load:
    """What one run sends: a request, how its items are counted, workers, repeats."""

    request: bytes
    marker: bytes
    concurrency: int
    per_worker: int
    warmup: int = 3


@dataclasses.dataclass
class Run:
    """What one run measured (several runs pool into one)."""

    firsts: list  # seconds to the first body chunk, one per request
    items: int = 0  # NDJSON lines or SSE events received
    elapsed: float = 0.0  # wall seconds of the timed part
    cpu: dict = dataclasses.field(default_factory=dict)  # process -> CPU seconds

    def add(self, other):
        self.firsts += other.firsts
        self.items += other.items
        self.elapsed += other.elapsed
        for name, seconds in other.cpu.items():
            self.cpu[name] = self.cpu.get(name, 0.0) + seconds


def cpu_snapshot(stack):
    """CPU seconds so far of the client (this process), the fake and the router."""
    return {"client": time.process_time(), "fake": cpu_seconds(stack.fake),
            "router": cpu_seconds(stack.router)}


async def exchange_many(client, load, count, firsts):
    items = 0
    for _ in range(count):
        first, n = await client.exchange(load.request, load.marker)
        firsts.append(first)
        items += n
    return items


async def drive(stack, path, load):
    """Connect the workers, warm up, then time `per_worker` requests on each."""
    loop, port = asyncio.get_running_loop(), stack.ports[path]
    clients = [(await loop.create_connection(StreamClient, "127.0.0.1", port))[1]
               for _ in range(load.concurrency)]
    try:
        await asyncio.gather(*(exchange_many(c, load, load.warmup, []) for c in clients))
        gc.collect()
        gc.disable()  # no collector pause in the client lands in a timing
        run = Run([])
        cpu0, t0 = cpu_snapshot(stack), time.perf_counter()
        counts = await asyncio.gather(*(exchange_many(c, load, load.per_worker, run.firsts)
                                        for c in clients))
        run.elapsed, run.items = time.perf_counter() - t0, sum(counts)
        await asyncio.sleep(SETTLE)
        run.cpu = {k: v - cpu0[k] for k, v in cpu_snapshot(stack).items()}
        return run
    finally:
        gc.enable()
        for c in clients:
            c.transport.close()


def compare(stack, load, rounds):
    """The same load direct and through the router, in turns (direct first in even
    rounds, router first in odd ones, so a drift in the machine hits both alike)."""
    pooled = {"direct": Run([]), "router": Run([])}
    for i in range(rounds):
        for path in ("direct", "router")[::1 if i % 2 == 0 else -1]:
            pooled[path].add(asyncio.run(drive(stack, path, load)))
    return {path: summarise(run, path == "router") for path, run in pooled.items()}


def percentile(values, q):
    """Nearest-rank percentile (q in 0..100)."""
    values = sorted(values)
    return values[max(0, min(len(values) - 1, -(-len(values) * q // 100) - 1))]


def summarise(run, is_router):
    n = len(run.firsts)
    out = {"requests": n, "items": run.items, "seconds": run.elapsed,
           "requests_per_s": n / run.elapsed, "items_per_s": run.items / run.elapsed,
           **{f"first_chunk_p{q}_ms": percentile(run.firsts, q) * 1e3
              for q in (50, 90, 99)},
           "first_chunk_max_ms": max(run.firsts) * 1e3,
           "cpu_us_per_request": {k: v / n * 1e6 for k, v in run.cpu.items()}}
    if is_router:  # the router's CPU is only its cost when it carried the load
        cpu = run.cpu["router"]
        out.update(router_cpu_s=cpu, router_cpu_ms_per_1000_requests=cpu / n * 1e6,
                   router_cpu_us_per_item=cpu / run.items * 1e6)
    return out


####################################################################################
# Phases
####################################################################################


def measure_idle(stack):
    """Router CPU over one idle second (it polls its node), then its RSS."""
    cpu0 = cpu_seconds(stack.router)
    time.sleep(1.0)
    return {"router_idle_cpu_ms_per_s": (cpu_seconds(stack.router) - cpu0) * 1e3,
            "rss_idle_mb": rss_mb(stack.router)}


def measure_short(stack, plan, c1_requests, c16_per_worker, request=None, marker=NDJSON):
    """8-chunk streams at concurrency 1 and 16: time to first chunk, throughput, CPU."""
    out = {}
    for c, per_worker in ((1, c1_requests), (16, c16_per_worker)):
        cell = out[f"c{c}"] = compare(stack, Load(request or GENERATE, marker, c, per_worker),
                                      plan.rounds)
        d, x = cell["direct"], cell["router"]
        for q in (50, 99):
            cell[f"added_p{q}_ms"] = x[f"first_chunk_p{q}_ms"] - d[f"first_chunk_p{q}_ms"]
        cell["throughput_ratio"] = x["requests_per_s"] / d["requests_per_s"]
    return out


def measure_relay(stack, plan):
    """2,000-chunk streams, NDJSON and SSE, one at a time and four at once."""
    out = {}
    for kind, request, marker in (("ndjson", GENERATE, NDJSON), ("sse", CHAT_SSE, SSE)):
        out[kind] = {
            "sequential": compare(stack, Load(request, marker, 1, plan.relay_sequential, 1),
                                  plan.rounds),
            "concurrent": compare(stack, Load(request, marker, 4, plan.relay_concurrent, 1),
                                  plan.rounds)}
    return out


def measure_paced(stack, plan):
    """16 streams of 300 chunks a millisecond apart: one chunk per read, like a model."""
    return compare(stack, Load(GENERATE, NDJSON, SLOTS, plan.paced_per_worker, 1),
                   plan.rounds)


async def chaos_request(port, request, timeout):
    """One streamed request on its own connection: completed, failed, lost or hung."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(request)
                data = await reader.read(-1)
            finally:
                writer.close()
    except TimeoutError:
        return "hung"
    except OSError:
        return "lost"
    head, _, body = data.partition(b"\r\n\r\n")
    ok = head.startswith(b"HTTP/1.1 200") and b'"done":true' in body
    if ok and b'"error"' not in body:
        return "completed"
    if b'"error"' in body:
        return "failed"  # a status with an error body, or an error line mid-stream
    return "lost"  # cut off with no word of why


async def chaos_load(port, seconds, workers, outcomes):
    request = GENERATE.replace(b"Host: 127.0.0.1\r\n",
                               b"Host: 127.0.0.1\r\nConnection: close\r\n")
    deadline = time.monotonic() + seconds

    async def worker():
        while time.monotonic() < deadline:
            outcomes.append(await chaos_request(port, request, 30))
    await asyncio.gather(*(worker() for _ in range(workers)))


async def kill_and_restart(exits, workdir, fakes, fake_ports, seconds):
    """A third of the way in, node-0's Ollama dies; two thirds in, it is back."""
    await asyncio.sleep(seconds / 3)
    fakes[0].kill()
    fakes[0].wait()
    await asyncio.sleep(seconds / 3)
    start_fake(exits, workdir, 20, 0.01, port=fake_ports[0])


def measure_chaos(workdir, plan):
    """Three fakes with real agents, steady load, one Ollama killed and restarted."""
    workdir = os.path.join(workdir, "chaos")
    os.makedirs(workdir)
    with contextlib.ExitStack() as exits:
        router, port = start_router(exits, workdir, {
            "FLEET_LOCAL_NODE": "false", "FLEET_HEARTBEAT_TIMEOUT": "2",
            "FLEET_HEARTBEAT_OFFLINE": "4", "FLEET_CONSOLE_LOG_LEVEL": "ERROR"})
        fakes, fake_ports = zip(*(start_fake(exits, workdir, 20, 0.01) for _ in range(3)))
        fakes = list(fakes)
        for i, fake_port in enumerate(fake_ports):
            start_process(exits, ["herd_node.py", "--node-id", f"node-{i}",
                                  "--router-url", f"http://127.0.0.1:{port}",
                                  "--ollama-host", f"http://127.0.0.1:{fake_port}"],
                          {"FLEET_NODE_HEARTBEAT_INTERVAL": "0.5",
                           "FLEET_NODE_DATA_DIR": os.path.join(workdir, "agents"),
                           "FLEET_CONSOLE_LOG_LEVEL": "ERROR"},
                          os.path.join(workdir, f"agent-{i}.log"))
        wait_for_nodes(router, port, workdir, 3)
        outcomes = []

        async def run():
            await asyncio.gather(chaos_load(port, plan.chaos_seconds, 8, outcomes),
                                 kill_and_restart(exits, workdir, fakes, fake_ports,
                                                  plan.chaos_seconds))
        asyncio.run(run())
    return {"sent": len(outcomes),
            **{k: outcomes.count(k) for k in ("completed", "failed", "lost", "hung")}}


####################################################################################
# Report
####################################################################################


def describe_machine():
    """CPU model, cores, memory, Python, OS, and how busy the machine was at the start."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), model)
    return {"cpu": model, "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30),
            "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}",
            "load_1min": os.getloadavg()[0]}


def relay_cells(r):
    """(name, key, cell) of each relay measurement, in table order."""
    for kind, name in (("ndjson", "Ollama NDJSON"), ("sse", "OpenAI SSE")):
        for mode, streams in (("sequential", "1 stream"), ("concurrent", "4 streams")):
            yield f"{name} relay, 2,000 chunks, {streams}", f"{kind}_{mode}", \
                r["relay"][kind][mode]
    yield "NDJSON paced 1 chunk/ms, 16 streams", "paced", r["paced"]


def judge_targets(r):
    """Each target: its value, its limit and whether it was met."""
    out = {}
    for phase, _ in SHORT_PHASES:
        for c in (1, 16):
            for q, limit in ADDED_FIRST_CHUNK_MS.items():
                value = r[phase][f"c{c}"][f"added_p{q}_ms"]
                out[f"{phase}_added_first_chunk_p{q}_ms_c{c}"] = (value, limit, value <= limit)
        ratio = r[phase]["c16"]["throughput_ratio"]
        out[f"{phase}_throughput_ratio_c16"] = (ratio, MIN_THROUGHPUT_RATIO,
                                                ratio >= MIN_THROUGHPUT_RATIO)
    for _, key, cell in relay_cells(r):
        us = cell["router"]["router_cpu_us_per_item"]
        out[f"router_cpu_us_per_chunk_{key}"] = (us, MAX_CPU_PER_CHUNK_US,
                                                 us <= MAX_CPU_PER_CHUNK_US)
    rss = r["memory"]["rss_idle_mb"]
    out["rss_idle_mb"] = (rss, MAX_IDLE_RSS_MB, rss <= MAX_IDLE_RSS_MB)
    return out


def verdict(target, template):
    """The target column: the limit in `template` ("<= {} ms"), then PASS or MISS."""
    _, limit, ok = target
    return template.format(f"{limit:g}") + (" PASS" if ok else " MISS")


def latency_rows(r, t, phase, label):
    rows = []
    for c in (1, 16):
        cell = r[phase][f"c{c}"]
        for q in ADDED_FIRST_CHUNK_MS:
            d, x = (cell[p][f"first_chunk_p{q}_ms"] for p in ("direct", "router"))
            rows.append((f"time to first chunk p{q}, c={c}, {label}", f"{d:.2f} ms",
                         f"{x:.2f} ms", f"{cell[f'added_p{q}_ms']:+.2f} ms",
                         verdict(t[f"{phase}_added_first_chunk_p{q}_ms_c{c}"], "<= {} ms")))
    return rows


def throughput_rows(r, t, phase, label):
    cell, c1 = r[phase]["c16"], r[phase]["c1"]
    d, x = cell["direct"]["requests_per_s"], cell["router"]["requests_per_s"]
    per_1000 = [s["router"]["router_cpu_ms_per_1000_requests"] for s in (c1, cell)]
    return [(f"throughput, c=16, 8-chunk streams, {label}", f"{d:,.0f} req/s",
             f"{x:,.0f} req/s", f"x{cell['throughput_ratio']:.2f}",
             verdict(t[f"{phase}_throughput_ratio_c16"], ">= x{}")),
            (f"router CPU per 1,000 streamed requests, c=1 / c=16, {label}", "", "",
             f"{per_1000[0]:,.0f} / {per_1000[1]:,.0f} ms", "")]


def relay_rows(r, t):
    return [(name, f"{cell['direct']['items_per_s']:,.0f} chunks/s",
             f"{cell['router']['items_per_s']:,.0f} chunks/s",
             f"{cell['router']['router_cpu_us_per_item']:.1f} us CPU/chunk",
             verdict(t[f"router_cpu_us_per_chunk_{key}"], "<= {} us"))
            for name, key, cell in relay_cells(r)]


def memory_rows(r, t):
    m = r["memory"]
    return [("router RSS idle after start-up", "", f"{m['rss_idle_mb']:.1f} MB", "",
             verdict(t["rss_idle_mb"], "<= {} MB")),
            ("router RSS after load (8-chunk / relay)", "",
             f"{m['rss_after_short_mb']:.1f} / {m['rss_after_relay_mb']:.1f} MB", "", "")]


def markdown_table(r):
    t = judge_targets(r)
    rows = []
    for phase, label in SHORT_PHASES:
        rows += latency_rows(r, t, phase, label) + throughput_rows(r, t, phase, label)
    rows += relay_rows(r, t) + memory_rows(r, t)
    lines = ["| measure | direct | router | router cost | target |",
             "|---|---|---|---|---|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def chaos_line(c):
    return (f"Chaos (three nodes with agents, one Ollama killed and restarted mid-run): "
            f"{c['sent']} sent, {c['completed']} completed, {c['failed']} failed with a "
            f"clear error, {c['lost']} lost, {c['hung']} hung "
            f"({'PASS' if c['lost'] == c['hung'] == 0 else 'MISS'}: none lost or hung)")


def print_report(r):
    m = r["machine"]
    print(f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
          f"Python {m['python']}, {m['os']}, load {m['load_1min']:.2f}\n")
    print(markdown_table(r))
    print("\n" + textwrap.fill(chaos_line(r["chaos"]), 90))


####################################################################################
# Run
####################################################################################


def run_phases(workdir, plan):
    """Each phase on its own fake and router, stopped before the next starts."""
    r = {"machine": describe_machine(), "plan": dataclasses.asdict(plan)}
    started = time.monotonic()
    with running_stack(workdir, "short", chunks=8) as stack:
        r["memory"] = measure_idle(stack)
        r["short"] = measure_short(stack, plan, plan.c1_requests, plan.c16_per_worker)
        r["short_sse"] = measure_short(stack, plan, plan.c1_requests, plan.c16_per_worker,
                                       CHAT_SSE, SSE)
        r["memory"]["rss_after_short_mb"] = rss_mb(stack.router)
    with running_stack(workdir, "steady", chunks=8, chunk_delay=STEADY_CHUNK_S) as stack:
        r["steady"] = measure_short(stack, plan, plan.steady_c1_requests,
                                    plan.steady_c16_per_worker)
    with running_stack(workdir, "relay", chunks=2000) as stack:
        r["relay"] = measure_relay(stack, plan)
        r["memory"]["rss_after_relay_mb"] = rss_mb(stack.router)
    with running_stack(workdir, "paced", chunks=300, chunk_delay=0.001) as stack:
        r["paced"] = measure_paced(stack, plan)
    r["chaos"] = measure_chaos(workdir, plan)
    r["seconds"] = time.monotonic() - started
    return r


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # unwinds through every `with`, which stops the processes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a reduced run (under a minute)")
    parser.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        with tempfile.TemporaryDirectory(prefix="herd-bench-") as workdir:
            results = run_phases(workdir, PLANS["quick" if args.quick else "full"])
    except KeyboardInterrupt:
        sys.exit("bench.py: interrupted; its processes are stopped")
    print_report(results)
    if args.json:
        targets = judge_targets(results)
        results["targets"] = {name: {"value": value, "limit": limit, "met": ok}
                              for name, (value, limit, ok) in targets.items()}
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
