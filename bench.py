#!/usr/bin/env python3
"""bench.py: what the Herd router costs, measured against direct-to-Ollama in one run.

It starts fake_ollama.py (16 parallel slots) and herd.py serving it as its local node,
then sends the same requests to each, from raw keep-alive sockets (a client library
would cost more than the router and hide it):

    time to first chunk    p50 / p99 at concurrency 1 and 16, and what the router adds
    throughput             requests/s at concurrency 16, router / direct
    relay cost             2,000-chunk streams, Ollama NDJSON and OpenAI SSE: chunks/s
                           and router CPU per relayed chunk
    memory                 router RSS idle after start-up, and after the load
    chaos                  steady load on three nodes while one Ollama is killed and
                           restarted: requests completed, failed clearly, lost, hung

Run:   python bench.py            (about 20 s on 2 cores)
       python bench.py --quick    (about 8 s)    --json out.json   saves the numbers

Sample (2 cores, Python 3.11):
    | measure | direct | router | router cost | target |
    | time to first chunk p50, c=1 | 0.45 ms | 1.48 ms | +1.03 ms | <= 1 ms MISS |
"""

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = "llama3.2:3b"

####################################################################################
# Processes
####################################################################################


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_fake(port, chunks, chunk_delay=0.0):
    env = {**os.environ, "OLLAMA_NUM_PARALLEL": "16"}
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_ollama.py"),
                             "--port", str(port), "--models", MODEL, "--chunks", str(chunks),
                             "--chunk-delay", str(chunk_delay), "--num-parallel", "16"],
                            env=env, stdout=subprocess.PIPE)
    proc.stdout.readline()  # "fake ollama listening on ..." once it is bound
    return proc


def start_router(port, ollama_port, data_dir):
    env = {**os.environ, "FLEET_HOST": "127.0.0.1", "FLEET_PORT": str(port),
           "FLEET_DATA_DIR": data_dir, "FLEET_MDNS": "true",
           "FLEET_LOCAL_OLLAMA_URL": f"http://127.0.0.1:{ollama_port}",
           "FLEET_LOCAL_NODE_INTERVAL": "1", "FLEET_CONSOLE_LOG_LEVEL": "WARNING"}
    return subprocess.Popen([sys.executable, os.path.join(HERE, "herd.py")], env=env)


def wait_for_node(port, timeout=20):
    """Poll /fleet/status until the local node is online with its 16 slots."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/fleet/status") as r:
                nodes = json.load(r)["nodes"]
            if nodes and nodes[0]["status"] == "online" and nodes[0]["num_parallel"] == 16:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("the router did not see its local node in time")


def cpu_seconds(proc):
    t = proc.cpu_times()
    return t.user + t.system


####################################################################################
# Load: raw HTTP/1.1 keep-alive clients
####################################################################################


def request_bytes(path, body):
    data = json.dumps(body).encode()
    return (b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))


SHORT = request_bytes("/api/generate", {"model": MODEL, "prompt": "x",
                                        "options": {"num_predict": 8}})
LONG = {
    "ndjson": request_bytes("/api/generate", {"model": MODEL, "prompt": "x"}),
    "sse": request_bytes("/v1/chat/completions", {
        "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]}),
}


async def exchange(reader, writer, request):
    """One request; returns (seconds to the first body chunk, chunks received)."""
    t0 = time.perf_counter()
    writer.write(request)
    buf, first, pieces = b"", None, 0
    while True:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        buf += data
        if first is None and b"\r\n\r\n" in buf:
            head, _, body = buf.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.split(b"\r\n")[0].decode())
            if body:
                first = time.perf_counter() - t0
        if buf.endswith(b"\r\n0\r\n\r\n"):
            body = buf.partition(b"\r\n\r\n")[2]
            pieces = body.count(b'\n{"') + body.count(b"data: {")
            return first, pieces + body.startswith(b"{")


async def worker(port, request, count, ttfts, chunks):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            first, n = await exchange(reader, writer, request)
            ttfts.append(first)
            chunks.append(n)
    finally:
        writer.close()


async def load(port, request, concurrency, per_worker):
    ttfts, chunks = [], []
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(port, request, per_worker, ttfts, chunks)
                           for _ in range(concurrency)))
    return ttfts, sum(chunks), time.perf_counter() - t0


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


####################################################################################
# Phases
####################################################################################


def measure_ttft(ports, router, concurrency, per_worker):
    """Short streams: time to first chunk and throughput, direct then router."""
    out = {}
    for label, port in ports.items():
        asyncio.run(load(port, SHORT, concurrency, 5))  # warm-up
        cpu0 = cpu_seconds(router)
        ttfts, _, elapsed = asyncio.run(load(port, SHORT, concurrency, per_worker))
        out[label] = {"p50_ms": percentile(ttfts, 0.5) * 1000,
                      "p99_ms": percentile(ttfts, 0.99) * 1000,
                      "rps": len(ttfts) / elapsed,
                      "router_cpu_ms_per_1000": (cpu_seconds(router) - cpu0) / len(ttfts) * 1e6}
    return out


def measure_paced(scale):
    """16 streams of 300 chunks, one chunk a millisecond: each token its own read,
    as with a real model, so nothing is coalesced in the router's favour."""
    fake_port, router_port = free_port(), free_port()
    fake = start_fake(fake_port, 300, 0.001)
    router_proc = start_router(router_port, fake_port, tempfile.mkdtemp(prefix="herd-bench-"))
    try:
        wait_for_node(router_port)
        router = psutil.Process(router_proc.pid)
        cpu0 = cpu_seconds(router)
        _, chunks, elapsed = asyncio.run(load(router_port, LONG["ndjson"], 16, scale))
        return {"chunks": chunks, "chunks_per_s": chunks / elapsed,
                "router_us_per_chunk": (cpu_seconds(router) - cpu0) / chunks * 1e6}
    finally:
        for proc in (router_proc, fake):
            proc.terminate()
            proc.wait(10)


def measure_relay(ports, router, kind, sequential, concurrent):
    """2,000-chunk streams: chunks per second and router CPU per chunk."""
    out = {}
    for label, port in ports.items():
        cpu0 = cpu_seconds(router)
        _, n1, t1 = asyncio.run(load(port, LONG[kind], 1, sequential))
        _, n2, t2 = asyncio.run(load(port, LONG[kind], concurrent, 1))
        out[label] = {"chunks": n1 + n2, "chunks_per_s": (n1 + n2) / (t1 + t2),
                      "router_us_per_chunk": (cpu_seconds(router) - cpu0) / (n1 + n2) * 1e6}
    return out


async def chaos_request(port, request, timeout):
    """One streamed request: completed, failed (a clear error), lost, or hung."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(request)
                data = b""
                while chunk := await reader.read(65536):
                    data += chunk
            finally:
                writer.close()
    except TimeoutError:
        return "hung"
    except OSError:
        return "lost"
    head, _, body = data.partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 200") and b'"done":true' in body and b'"error"' not in body:
        return "completed"
    if b'"error"' in body:
        return "failed"  # a status with an error body, or an error line mid-stream
    return "lost"


async def chaos_load(port, seconds, workers):
    request = request_bytes("/api/generate", {"model": MODEL, "prompt": "x"})
    request = request.replace(b"Host: localhost\r\n", b"Host: localhost\r\nConnection: close\r\n")
    outcomes = []
    deadline = time.monotonic() + seconds

    async def worker():
        while time.monotonic() < deadline:
            outcomes.append(await chaos_request(port, request, 30))
    await asyncio.gather(*(worker() for _ in range(workers)))
    return outcomes


def measure_chaos(seconds):
    """Steady load on three nodes (real agents) while one Ollama is killed, then back."""
    router_port = free_port()
    fake_ports = [free_port() for _ in range(3)]
    data_dir = tempfile.mkdtemp(prefix="herd-chaos-")
    env = {**os.environ, "FLEET_HOST": "127.0.0.1", "FLEET_PORT": str(router_port),
           "FLEET_DATA_DIR": data_dir, "FLEET_MDNS": "false", "FLEET_LOCAL_NODE": "false",
           "FLEET_HEARTBEAT_TIMEOUT": "2", "FLEET_HEARTBEAT_OFFLINE": "4",
           "FLEET_CONSOLE_LOG_LEVEL": "ERROR"}
    router = subprocess.Popen([sys.executable, os.path.join(HERE, "herd.py")], env=env)
    fakes = [start_fake(p, 20, 0.01) for p in fake_ports]
    agents = [subprocess.Popen(
        [sys.executable, os.path.join(HERE, "herd_node.py"), "--router-url",
         f"http://127.0.0.1:{router_port}", "--node-id", f"node-{i}", "--ollama-host",
         f"http://127.0.0.1:{p}"], stderr=subprocess.DEVNULL,
        env={**os.environ, "FLEET_NODE_HEARTBEAT_INTERVAL": "0.5",
             "FLEET_NODE_DATA_DIR": data_dir}) for i, p in enumerate(fake_ports)]
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{router_port}/fleet/status") as r:
                    if len(json.load(r)["nodes"]) == 3:
                        break
            except OSError:
                pass
            time.sleep(0.1)

        async def run():
            load = asyncio.create_task(chaos_load(router_port, seconds, 8))
            await asyncio.sleep(seconds / 3)
            fakes[0].kill()  # the power goes off on node-0's Ollama
            fakes[0].wait()
            await asyncio.sleep(seconds / 3)
            fakes[0] = start_fake(fake_ports[0], 20, 0.01)  # and comes back
            return await load
        outcomes = asyncio.run(run())
    finally:
        for proc in agents + fakes + [router]:
            proc.terminate()
            proc.wait(10)
    return {k: outcomes.count(k) for k in ("completed", "failed", "lost", "hung")} | {
        "sent": len(outcomes)}


def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor()) \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    return (f"{model}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total >> 30} GiB, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


####################################################################################
# Report
####################################################################################


def verdict(ok):
    return "PASS" if ok else "MISS"


def table(r):
    rows = ["| measure | direct | router | router cost | target |", "|---|---|---|---|---|"]
    for c in (1, 16):
        t = r[f"ttft_c{c}"]
        for q, limit in (("p50", 1.0), ("p99", 2.0)):
            added = t["router"][f"{q}_ms"] - t["direct"][f"{q}_ms"]
            rows.append(f"| time to first chunk {q}, c={c} | {t['direct'][f'{q}_ms']:.2f} ms | "
                        f"{t['router'][f'{q}_ms']:.2f} ms | +{added:.2f} ms | "
                        f"<= {limit:g} ms {verdict(added <= limit)} |")
    t = r["ttft_c16"]
    ratio = t["router"]["rps"] / t["direct"]["rps"]
    rows.append(f"| throughput, c=16, 8-chunk streams | {t['direct']['rps']:.0f} req/s | "
                f"{t['router']['rps']:.0f} req/s | x{ratio:.2f} | >= x0.95 {verdict(ratio >= 0.95)} |")
    rows.append(f"| router CPU per 1,000 streamed requests | | "
                f"{t['router']['router_cpu_ms_per_1000']:.0f} ms | | |")
    for kind, name in (("ndjson", "Ollama NDJSON"), ("sse", "OpenAI SSE")):
        x = r[f"relay_{kind}"]
        us = x["router"]["router_us_per_chunk"]
        rows.append(f"| {name} 2,000-chunk relay | {x['direct']['chunks_per_s']:,.0f} chunks/s | "
                    f"{x['router']['chunks_per_s']:,.0f} chunks/s | {us:.1f} us CPU/chunk | "
                    f"<= 20 us {verdict(us <= 20)} |")
    p = r["relay_paced"]
    rows.append(f"| NDJSON, 16 streams paced 1 chunk/ms | | {p['chunks_per_s']:,.0f} chunks/s | "
                f"{p['router_us_per_chunk']:.1f} us CPU/chunk | <= 20 us "
                f"{verdict(p['router_us_per_chunk'] <= 20)} |")
    rows.append(f"| router RSS idle / after load | | {r['rss_idle_mb']:.1f} / "
                f"{r['rss_after_mb']:.1f} MB | | idle <= 40 MB {verdict(r['rss_idle_mb'] <= 40)} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    scale = 1 if args.quick else 4
    fake_port, router_port = free_port(), free_port()
    data_dir = tempfile.mkdtemp(prefix="herd-bench-")
    fake = start_fake(fake_port, 2000)
    router_proc = start_router(router_port, fake_port, data_dir)
    try:
        wait_for_node(router_port)
        router = psutil.Process(router_proc.pid)
        time.sleep(1.0)  # let start-up allocations settle before reading idle memory
        results = {"machine": machine(), "rss_idle_mb": router.memory_info().rss / 1e6}
        ports = {"direct": fake_port, "router": router_port}
        results["ttft_c1"] = measure_ttft(ports, router, 1, 100 * scale)
        results["ttft_c16"] = measure_ttft(ports, router, 16, 10 * scale)
        for kind in ("ndjson", "sse"):
            results[f"relay_{kind}"] = measure_relay(ports, router, kind, 2 * scale, 4)
        results["rss_after_mb"] = router.memory_info().rss / 1e6
    finally:
        for proc in (router_proc, fake):
            proc.terminate()
            proc.wait(10)
    results["relay_paced"] = measure_paced(scale)
    results["chaos"] = measure_chaos(6 if args.quick else 15)
    print(f"Machine: {results['machine']}\n")
    print(table(results))
    c = results["chaos"]
    print(f"\nChaos: steady load on 3 nodes, one Ollama killed and restarted: {c['sent']} "
          f"sent, {c['completed']} completed, {c['failed']} failed with a clear error, "
          f"{c['lost']} lost, {c['hung']} hung "
          f"({verdict(c['lost'] == 0 and c['hung'] == 0)}: none lost or hung)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
