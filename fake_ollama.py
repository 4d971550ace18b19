#!/usr/bin/env python3
"""fake_ollama.py: a stand-in Ollama for Herd's tests, demos and benchmark.

It answers like the real server where a client can tell (../shared/ollama-api.md):
field names, NDJSON and SSE framing, error bodies and codes, parallel slots with FIFO
waiting, slow model loads, unload on keep_alive 0, the loopback Host-header guard,
and faults on demand (refuse, reset, stall, 500, 503, death or stall mid-stream, error line).
It imports nothing from Herd: it is the reference the router is checked against.

Run:   python fake_ollama.py --port 11434 --models llama3.2:3b,qwen2.5:7b --num-parallel 4
    $ curl -s localhost:11434/api/generate -d '{"model":"llama3.2:3b","prompt":"hi"}'
    {"model":"llama3.2:3b","created_at":"2026-11-22T12:00:00.000000Z","response":"w0 ","done":false}
    ...
    {"model":"llama3.2:3b","created_at":"...","response":"","done":true,"done_reason":"stop",...}
"""

import argparse
import asyncio
import collections
import datetime
import hashlib
import json
import math
import os
import re
import signal
import socket
import struct
import sys
import time

import h11

BUSY = "server busy, please try again.  maximum pending requests exceeded"
JSON = b"application/json; charset=utf-8"
NDJSON = b"application/x-ndjson"
SSE = b"text/event-stream"
INFERENCE = {"/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
             "/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
ROUTES = {("GET", "/"), ("HEAD", "/"), ("GET", "/api/version"), ("HEAD", "/api/version"),
          ("GET", "/api/tags"), ("HEAD", "/api/tags"), ("GET", "/api/ps"),
          ("POST", "/api/show"), ("POST", "/api/pull"), ("DELETE", "/api/delete"),
          ("GET", "/v1/models"), *(("POST", p) for p in INFERENCE)}

####################################################################################
# Models
####################################################################################


def canonical(name):
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def describe_model(name, overrides=None):
    """A /api/tags entry with defaults derived from the name."""
    o = overrides or {}
    m = re.search(r"(\d+(?:\.\d+)?)b", name.split(":")[-1])
    params = float(m.group(1)) if m else 3.0
    embed = "embed" in name
    family = o.get("family") or re.split(r"[\d.:-]", name.split("/")[-1])[0] or "llama"
    return {
        "name": name, "model": name,
        "modified_at": "2026-10-01T10:00:00.000000000-07:00",
        "size": int(o.get("size", params * 0.6 * (1 << 30))),
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": {"parent_model": "", "format": "gguf", "family": family,
                    "families": [family],
                    "parameter_size": o.get("parameter_size", f"{params:g}B"),
                    "quantization_level": o.get("quantization_level", "Q4_K_M")},
        "capabilities": o.get("capabilities", ["embedding"] if embed
                              else ["completion", "tools"]),
        "_context_length": int(o.get("context_length", 131072)),
    }


def public(entry):
    return {k: v for k, v in entry.items() if not k.startswith("_")}


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def expires_in(seconds):
    t = datetime.datetime.now().astimezone() + datetime.timedelta(seconds=seconds)
    return t.isoformat()


####################################################################################
# The server
####################################################################################


class Abort(Exception):
    """Drop the connection without a response (faults)."""


class FakeOllama:
    """A fake Ollama on h11; see the module docstring."""

    def __init__(self, models=None, *, num_parallel=1, chunks=5, chunk_delay=0.0,
                 load_delay=0.0, version="0.12.6", embedding_dim=8, host_guard=True):
        self.num_parallel = num_parallel
        self.chunks, self.chunk_delay, self.load_delay = chunks, chunk_delay, load_delay
        self.version, self.embedding_dim, self.host_guard = version, embedding_dim, host_guard
        self.fault, self.die_after = None, 2
        self.requests = []
        self.active = self.max_active = self.waiting = 0
        self.completed = self.cancelled = self.load_count = 0
        self.loaded = {}
        self.port = None
        self._slots = {}
        self._load_locks = {}
        self._server = None
        self._conns = set()
        self._loopback = True
        self.set_models(models)

    def set_models(self, models):
        if models is None:
            models = ["llama3.2:3b", "qwen2.5:7b", "nomic-embed-text:latest"]
        if not isinstance(models, dict):
            models = {m: {} for m in models}
        self.models = {canonical(n): describe_model(canonical(n), o) for n, o in models.items()}

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    async def start(self, host="127.0.0.1", port=0):
        self._loopback = host.startswith("127.") or host in ("localhost", "::1")
        self._server = await asyncio.start_server(self._on_connect, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self):
        self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        await self._server.wait_closed()

    # -- connection loop ----------------------------------------------------------

    async def _on_connect(self, reader, writer):
        task = asyncio.current_task()
        self._conns.add(task)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await self._next(conn, reader)
                if not isinstance(event, h11.Request):
                    break
                body = b""
                while True:
                    ev = await self._next(conn, reader)
                    if isinstance(ev, h11.EndOfMessage):
                        break
                    if not isinstance(ev, h11.Data):
                        return
                    body += ev.data
                await self._answer(Exchange(self, conn, reader, writer, event, body))
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:
                    break
        except (Abort, ConnectionError, h11.ProtocolError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    async def _next(self, conn, reader):
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await reader.read(65536))

    async def _answer(self, ex):
        method, path = ex.method, ex.path
        if self.host_guard and self._loopback and not host_allowed(ex.headers.get("host", "")):
            return await ex.send(403, b"", b"text/plain")
        self.requests.append({"method": method, "path": path, "headers": ex.headers,
                              "body": try_json(ex.body)})
        if (method, path) not in ROUTES and not (method == "GET" and
                                                 path.startswith("/v1/models/")):
            if any(p == path for _, p in ROUTES):
                return await ex.send(405, b"405 method not allowed", b"text/plain")
            return await ex.send(404, b"404 page not found", b"text/plain")
        if method in ("GET", "HEAD"):
            return await self._answer_get(ex)
        openai = path.startswith("/v1/")
        try:
            req = parse_body(ex.body)
            name = req.get("model") or req.get("name")
            if not isinstance(name, str) or not name:
                raise BadRequest("model is required")
        except BadRequest as e:
            return await ex.error(400, str(e), openai)
        model = canonical(name)
        if path == "/api/pull":
            return await self._pull(ex, req, model)
        if model not in self.models:
            msg = (f'model "{name}" not found, try pulling it first'
                   if path in ("/api/embeddings", "/api/embed") else f"model '{name}' not found")
            return await ex.error(404, msg, openai)
        if path == "/api/show":
            return await ex.json(200, self._show(model))
        if path == "/api/delete":
            del self.models[model]
            self.loaded.pop(model, None)
            return await ex.send(200, b"", JSON)
        await self._infer(ex, req, model, openai)

    async def _answer_get(self, ex):
        path = ex.path
        if path == "/":
            return await ex.send(200, b"Ollama is running", b"text/plain; charset=utf-8")
        if path == "/api/version":
            return await ex.json(200, {"version": self.version})
        if path == "/api/tags":
            return await ex.json(200, {"models": [public(m) for m in self.models.values()]})
        if path == "/api/ps":
            return await ex.json(200, {"models": self._ps()})
        if path == "/v1/models":
            return await ex.json(200, {"object": "list", "data": [
                oa_model(m) for m in self.models.values()]})
        name = canonical(path[len("/v1/models/"):])
        if name not in self.models:
            return await ex.error(404, f"model '{name}' not found", True)
        await ex.json(200, oa_model(self.models[name]))

    def _ps(self):
        out = []
        for name, info in self.loaded.items():
            m = self.models.get(name) or describe_model(name)
            details = dict(m["details"], parent_model="")
            out.append({"name": name, "model": name, "size": m["size"], "size_vram": 0,
                        "digest": m["digest"], "details": details,
                        "expires_at": info["expires_at"],
                        "context_length": info["context_length"]})
        out.sort(key=lambda e: e["expires_at"], reverse=True)
        return out

    def _show(self, model):
        m = self.models[model]
        fam = m["details"]["family"]
        return {"license": "", "modelfile": f"FROM {model}\n",
                "parameters": "temperature 0.8", "template": "{{ .Prompt }}",
                "details": m["details"], "capabilities": m["capabilities"],
                "model_info": {"general.architecture": fam,
                               f"{fam}.context_length": m["_context_length"],
                               f"{fam}.embedding_length": self.embedding_dim},
                "modified_at": m["modified_at"]}

    async def _pull(self, ex, req, model):
        stream = req.get("stream", True) is not False
        if "doesnotexist" in model:
            if not stream:
                return await ex.error(500, "pull model manifest: file does not exist", False)
            await ex.start(200, NDJSON)
            await ex.line({"status": "pulling manifest"})
            await ex.line({"error": "pull model manifest: file does not exist"})
            return await ex.end()
        digest = "sha256:" + hashlib.sha256(model.encode()).hexdigest()
        lines = [{"status": "pulling manifest"}]
        lines += [{"status": f"pulling {digest[7:19]}", "digest": digest, "total": 1000,
                   "completed": c} for c in (0, 500, 1000)]
        lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"},
                  {"status": "success"}]
        self.models[model] = describe_model(model)
        if not stream:
            return await ex.json(200, {"status": "success"})
        await ex.start(200, NDJSON)
        for line in lines:
            await ex.line(line)
        await ex.end()

    # -- inference ----------------------------------------------------------------

    async def _infer(self, ex, req, model, openai):
        if self.fault in ("refuse", "reset", "stall", "http500", "http503"):
            return await self._fail_early(ex, openai)
        path = ex.path
        options = req.get("options") if isinstance(req.get("options"), dict) else {}
        num_ctx = options.get("num_ctx") if isinstance(options.get("num_ctx"), int) else 4096
        empty = (path == "/api/generate" and not req.get("prompt")) or \
                (path == "/api/chat" and not req.get("messages"))
        if empty and is_zero(req.get("keep_alive")):
            self.loaded.pop(model, None)
            return await ex.json(200, self._final(path, model, "unload", ""))
        watcher = asyncio.create_task(ex.watch_eof())
        try:
            await self._load(model, num_ctx)
            if empty:
                return await ex.json(200, self._final(path, model, "load", ""))
            await self._with_slot(model, self._generate(ex, req, model, openai))
        except asyncio.CancelledError:
            if ex.gone:
                self.cancelled += 1
                raise Abort() from None
            raise
        finally:
            watcher.cancel()
            await asyncio.wait([watcher])  # the next request must not race its read

    async def _fail_early(self, ex, openai):
        if self.fault == "refuse":
            raise Abort()
        if self.fault == "reset":
            sock = ex.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ex.writer.transport.abort()
            raise Abort()
        if self.fault == "stall":
            await asyncio.Event().wait()
        if self.fault == "http500":
            return await ex.error(500, "llama runner process has terminated: exit status 2",
                                  openai)
        await ex.error(503, BUSY, openai)

    async def _load(self, model, num_ctx):
        lock = self._load_locks.setdefault(model, asyncio.Lock())
        async with lock:
            info = self.loaded.get(model)
            if info is None or info["context_length"] != num_ctx:
                if self.load_delay:
                    await asyncio.sleep(self.load_delay)
                self.load_count += 1
                self.loaded[model] = {"context_length": num_ctx, "expires_at": expires_in(300),
                                      "size_vram": 0}

    async def _with_slot(self, model, coro):
        slot = self._slots.setdefault(model, Slots(self.num_parallel))
        self.waiting += 1
        try:
            await slot.acquire()
        except BaseException:
            coro.close()
            raise
        finally:
            self.waiting -= 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await coro
        finally:
            self.active -= 1
            slot.release()
            if model in self.loaded:
                self.loaded[model]["expires_at"] = expires_in(300)

    async def _generate(self, ex, req, model, openai):
        path = ex.path
        if path in ("/api/embed", "/api/embeddings", "/v1/embeddings"):
            return await self._embed(ex, req, model)
        stream = req.get("stream")
        stream = (not openai) if stream is None else bool(stream)
        n = self.chunks
        opts = req.get("options") if isinstance(req.get("options"), dict) else {}
        if isinstance(opts.get("num_predict"), int) and opts["num_predict"] > 0:
            n = min(n, opts["num_predict"])
        if isinstance(req.get("max_tokens"), int) and req["max_tokens"] > 0:
            n = min(n, req["max_tokens"])
        words = [f"w{i} " for i in range(n)]
        if openai:
            writer = SseWriter(ex, req, model, path == "/v1/chat/completions")
        else:
            writer = NdjsonWriter(ex, self, path, model)
        if not stream:
            if self.fault == "die_mid_stream":
                await ex.start(200, JSON, length=10000)
                await ex.raw_data(b'{"model":')
                raise Abort()
            if self.chunk_delay:  # generating takes as long when not streamed
                await asyncio.sleep(self.chunk_delay * n)
            await writer.whole("".join(words), n)
            self.completed += 1
            return
        await writer.start()
        for i, word in enumerate(words):
            if self.fault in ("die_mid_stream", "error_line", "stall_mid_stream") \
                    and i == self.die_after:
                if self.fault == "stall_mid_stream":
                    await asyncio.Event().wait()  # a runner that hangs mid-answer
                if self.fault == "die_mid_stream":
                    ex.writer.transport.abort()
                    raise Abort()
                await writer.error("an error was encountered while running the model")
                return
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            await writer.token(word)
        await writer.finish(n)
        self.completed += 1

    async def _embed(self, ex, req, model):
        path = ex.path
        inputs = req.get("input") if path != "/api/embeddings" else req.get("prompt", "")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            return await ex.error(400, "invalid input type", path.startswith("/v1/"))
        vectors = [self._vector(text, normalise=path != "/api/embeddings") for text in inputs]
        self.completed += 1
        if path == "/api/embeddings":
            return await ex.json(200, {"embedding": vectors[0] if req.get("prompt") else []})
        if path == "/api/embed":
            return await ex.json(200, {"model": model, "embeddings": vectors,
                                       "total_duration": 1000000, "load_duration": 1000,
                                       "prompt_eval_count": len(inputs)})
        await ex.json(200, {"object": "list", "model": model, "data": [
            {"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}})

    def _vector(self, text, normalise):
        seed = hashlib.sha256(text.encode()).digest()
        v = [(seed[i % 32] - 128) / 128.0 + 0.01 for i in range(self.embedding_dim)]
        if normalise:
            norm = math.sqrt(sum(x * x for x in v)) or 1.0
            v = [x / norm for x in v]
        return v

    def _final(self, path, model, reason, text):
        out = {"model": model, "created_at": now_utc()}
        if path == "/api/chat":
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        out.update(done=True, done_reason=reason)
        return out


class Slots:
    """num_parallel slots; waiters served first come, first served."""

    def __init__(self, n):
        self.free = n
        self.waiters = collections.deque()

    async def acquire(self):
        if self.free and not self.waiters:
            self.free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()
            elif fut in self.waiters:
                self.waiters.remove(fut)
            raise

    def release(self):
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1


####################################################################################
# Writing answers
####################################################################################


class BadRequest(Exception):
    pass


def parse_body(body):
    if not body:
        raise BadRequest("missing request body")
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise BadRequest(f"invalid character in JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadRequest("json: cannot unmarshal array into Go value of type api.Request")
    return obj


def try_json(body):
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def is_zero(keep_alive):
    if isinstance(keep_alive, bool):
        return False
    if isinstance(keep_alive, (int, float)):
        return keep_alive == 0
    return isinstance(keep_alive, str) and re.fullmatch(r"0+[a-z]*", keep_alive.strip()) is not None


def host_allowed(host):
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")]
    elif host.count(":") == 1:
        host = host.split(":")[0]
    if host in ("", "localhost", socket.gethostname().lower()):
        return True
    if host.endswith((".localhost", ".local", ".internal")):
        return True
    import ipaddress
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_unspecified or ip.is_link_local


def oa_model(m):
    name = m["model"]
    return {"id": name, "object": "model", "created": 1759338000,
            "owned_by": name.split("/")[-2] if "/" in name else "library"}


def dumps(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


class Exchange:
    """One request on one connection, with helpers to answer it."""

    def __init__(self, fake, conn, reader, writer, event, body):
        self.fake, self.conn, self.reader, self.writer = fake, conn, reader, writer
        self.method = event.method.decode()
        self.path = event.target.decode().split("?")[0].rstrip("/") or "/"
        self.headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
        self.body = body
        self.gone = False
        self.owner = asyncio.current_task()

    async def watch_eof(self):
        """Cancel the request's work when the client hangs up mid-answer."""
        while True:
            data = await self.reader.read(65536)
            if not data:
                self.gone = True
                self.owner.cancel()
                return
            self.conn.receive_data(data)

    async def send(self, status, body, ctype, headers=()):
        hdrs = [(b"content-type", ctype), (b"content-length", str(len(body)).encode()),
                *headers]
        out = self.conn.send(h11.Response(status_code=status, headers=hdrs))
        if body and self.method != "HEAD":
            out += self.conn.send(h11.Data(data=body))
        out += self.conn.send(h11.EndOfMessage())
        self.writer.write(out)
        await self.writer.drain()

    async def json(self, status, obj):
        await self.send(status, dumps(obj), JSON)

    async def error(self, status, message, openai):
        if openai:
            kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status,
                                                                               "api_error")
            return await self.json(status, {"error": {"message": message, "type": kind,
                                                      "param": None, "code": None}})
        await self.json(status, {"error": message})

    async def start(self, status, ctype, length=None):
        hdrs = [(b"content-type", ctype)]
        if length is not None:
            hdrs.append((b"content-length", str(length).encode()))
        self.writer.write(self.conn.send(h11.Response(status_code=status, headers=hdrs)))
        await self.writer.drain()

    async def raw_data(self, data):
        self.writer.write(data)
        await self.writer.drain()

    async def data(self, data):
        # Chunked framing by hand: this is the benchmark's hot path.
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await self.writer.drain()

    async def line(self, obj):
        await self.data(dumps(obj) + b"\n")

    async def end(self):
        self.writer.write(self.conn.send(h11.EndOfMessage()))
        await self.writer.drain()


class NdjsonWriter:
    """Ollama's native answers: NDJSON chunks, or one JSON when not streaming."""

    def __init__(self, ex, fake, path, model):
        self.ex, self.fake, self.path, self.model = ex, fake, path, model
        self.chat = path == "/api/chat"
        self.started = time.monotonic_ns()
        stamp = now_utc()
        key = '"message":{"role":"assistant","content":%s}' if self.chat else '"response":%s'
        self.template = ('{"model":%s,"created_at":"%s",%s,"done":false}\n'
                         % (json.dumps(model), stamp, key)).encode()

    def metrics(self, n):
        total = time.monotonic_ns() - self.started
        return {"total_duration": total, "load_duration": 1000, "prompt_eval_count": 3,
                "prompt_eval_duration": 1000, "eval_count": n, "eval_duration": max(1, total)}

    async def start(self):
        await self.ex.start(200, NDJSON)

    async def token(self, word):
        await self.ex.data(self.template % json.dumps(word).encode())

    async def finish(self, n):
        final = self.fake._final(self.path, self.model, "stop", "")
        final.update(self.metrics(n))
        await self.ex.line(final)
        await self.ex.end()

    async def whole(self, text, n):
        final = self.fake._final(self.path, self.model, "stop", text)
        final.update(self.metrics(n))
        await self.ex.json(200, final)

    async def error(self, message):
        await self.ex.line({"error": message})
        await self.ex.end()


class SseWriter:
    """Ollama's OpenAI layer: SSE chunks ending in [DONE], or one object."""

    def __init__(self, ex, req, model, chat):
        self.ex, self.model, self.chat = ex, model, chat
        self.usage = bool((req.get("stream_options") or {}).get("include_usage"))
        self.created = int(time.time())
        self.id = ("chatcmpl-" if chat else "cmpl-") + str(int(time.time() * 1000) % 999)
        self.first = True

    def _chunk(self, choice, usage=None):
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat
               else "text_completion", "created": self.created, "model": self.model,
               "system_fingerprint": "fp_ollama", "choices": [choice] if choice else []}
        if usage is not None:
            obj["usage"] = usage
        return b"data: " + dumps(obj) + b"\n\n"

    async def start(self):
        await self.ex.start(200, SSE)

    async def token(self, word):
        if self.chat:
            delta = {"role": "assistant", "content": word} if self.first else {"content": word}
            choice = {"index": 0, "delta": delta, "finish_reason": None}
        else:
            choice = {"text": word, "index": 0, "finish_reason": None}
        self.first = False
        await self.ex.data(self._chunk(choice))

    async def finish(self, n):
        if self.chat:
            await self.ex.data(self._chunk({"index": 0, "delta": {}, "finish_reason": "stop"}))
        else:
            await self.ex.data(self._chunk({"text": "", "index": 0, "finish_reason": "stop"}))
        if self.usage:
            await self.ex.data(self._chunk(None, {"prompt_tokens": 3, "completion_tokens": n,
                                                  "total_tokens": 3 + n}))
        await self.ex.data(b"data: [DONE]\n\n")
        await self.ex.end()

    async def whole(self, text, n):
        usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": "stop"}
        else:
            choice = {"text": text, "index": 0, "finish_reason": "stop"}
        await self.ex.json(200, {"id": self.id, "object": "chat.completion" if self.chat
                                 else "text_completion", "created": self.created,
                                 "model": self.model, "system_fingerprint": "fp_ollama",
                                 "choices": [choice], "usage": usage})

    async def error(self, message):
        # Ollama's OpenAI layer does not translate a mid-stream error; it just stops.
        await self.ex.end()


####################################################################################
# Run
####################################################################################


async def serve(args):
    fake = FakeOllama(args.models.split(",") if args.models else None,
                      num_parallel=args.num_parallel, chunks=args.chunks,
                      chunk_delay=args.chunk_delay, load_delay=args.load_delay)
    port = await fake.start(args.host, args.port)
    print(f"fake ollama listening on http://{args.host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await fake.stop()


def main():
    p = argparse.ArgumentParser(description="A fake Ollama for tests and benchmarks.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11434)
    p.add_argument("--models", default="")
    p.add_argument("--num-parallel", type=int,
                   default=int(os.environ.get("OLLAMA_NUM_PARALLEL") or 1))
    p.add_argument("--chunks", type=int, default=5)
    p.add_argument("--chunk-delay", type=float, default=0.0)
    p.add_argument("--load-delay", type=float, default=0.0)
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
