#!/usr/bin/env python3
"""herd.py: the Herd router. One URL in front of every Ollama in the house.

It speaks Ollama's API (/api/*), OpenAI's (/v1/*, Responses too) and Anthropic's Messages
API (/v1/messages) on port 11435, as the Ollamas behind it do (and images and speech:
/v1/images/generations, /api/generate-image, /v1/audio/transcriptions, /api/transcribe,
served by Ollama's image models or by node agents themselves), picks the machine
that will answer fastest for each request (elimination, seven scored signals, a queue
per node+model), relays the answer chunk by chunk, and writes one trace row per request
to ~/.fleet-manager/latency.db. Node agents (herd_node.py) find it by mDNS and send
heartbeats; an Ollama on this machine is served by itself with no agent at all.

Run:   python herd.py            (python herd.py --help lists every FLEET_* setting)
Key settings: FLEET_PORT (11435), FLEET_HOST (0.0.0.0), FLEET_DATA_DIR (~/.fleet-manager),
              FLEET_TOKEN (the secret agents sign heartbeats with; unset, any host can
              join), FLEET_API_KEYS / FLEET_ADMIN_KEY (client and admin keys; unset, open),
              FLEET_MODEL_ALIASES (one model's names on different servers)

    $ curl -s localhost:11435/api/chat -d '{"model":"llama3.2:3b","stream":false,
        "messages":[{"role":"user","content":"hi"}]}'
    {"model":"llama3.2:3b","created_at":"2026-11-22T12:00:00.1Z","message":{"role":
    "assistant","content":"Hello! How can I help?"},"done":true,"done_reason":"stop",...}
    $ curl -s localhost:11435/fleet/queue
    {"queues":[{"node_id":"mac-studio","model":"llama3.2:3b","active":1,"waiting":0,
    "limit":4,"estimated_wait_s":0.0}],"total_active":1,"total_waiting":0,"holding":0}

The sections below follow a request, after the settings: the HTTP API (Api: the route
table, handle -> guard -> handler; Guard, who may call what; Cors, which web pages may;
Hosts, which Host names are the router's; Catalogue, FleetApi, DashboardApi: the routes
answered from what the router knows); the proxy (Exchange, the request's one record;
Records: open it, see it to its end, write its row; Proxy: serve -> attempts;
NodeRelay: attempt -> send upstream -> relay; MediaRoute and Upload for images and
speech); Ollama's routes on a server of OpenAI's API (Translation, both ways; a
TranslatedRelay says a stream otherwise on its way, Renaming a model's alias);
routing (Scheduler: candidates -> elimination -> scores -> a queue); placement
(the plan routing follows); the fleet (nodes, queues, what each holds: the only code
that changes them); learning (what each node+model was seen to do); stats. Then what
runs beside requests: pulls and pre-warm (the Warmer makes the plan's moves); managing
models (ModelAdmin: delete, copy, create and its blobs, push); health;
background duties; mDNS; run (RouterServer builds every part once and hands each what
it uses).
"""

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import hashlib
import hmac
import itertools
import ipaddress
import json
import logging
import math
import os
import re
import socket
import statistics
import sys
import tempfile
import time
import urllib.parse

import herd_common as hc  # first: it refuses a Python older than 3.11, in one line

try:
    import psutil
    from zeroconf import InterfaceChoice, IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
except ImportError:  # pragma: no cover
    sys.exit("Herd needs h11, psutil and zeroconf: pip install h11 psutil zeroconf")

log = logging.getLogger("herd.router")
fleet_log = logging.getLogger("herd.fleet")
proxy_log = logging.getLogger("herd.proxy")

ROUTER_SETTINGS = hc.ROUTER_SETTINGS  # herd_common's settings section: FLEET_*
ROUTER_FIXED = hc.ROUTER_FIXED  # and the fixed values beside them

# Fields a client may add for the router; they never reach Ollama.
ROUTING_FIELDS = ("fallback_models",)
NATIVE_INFERENCE = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings")
OPENAI_INFERENCE = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                    "/v1/images/generations")  # image models answer it (experimental)
# Image generation and speech-to-text: served by Ollama's image models (images only) or
# by node agents themselves (a command-line tool on the node, or a server it points at).
# The product's own routes are translated here; OpenAI's pass through to an agent.
IMAGE_ROUTES = ("/v1/images/generations", "/api/generate-image")
TRANSCRIBE_ROUTES = ("/v1/audio/transcriptions", "/api/transcribe")
AGENT_PATHS = {"/api/generate-image": "/v1/images/generations",
               "/api/transcribe": "/v1/audio/transcriptions"}
# What each kind needs on a node, for the 404 that says no node has it.
MEDIA_HINTS = {
    hc.IMAGE: "pull an Ollama image model on a node (ollama pull x/z-image-turbo), install "
              "mflux or DiffusionKit on an Apple-Silicon node (pip install mflux, pip "
              "install diffusionkit: the agent finds mflux-generate and diffusionkit-cli on "
              "its PATH), or set FLEET_NODE_IMAGE_URL on a node to an OpenAI-compatible "
              "image server",
    hc.TRANSCRIPTION: "install mlx-qwen3-asr on an Apple-Silicon node (pip install "
                      "mlx-qwen3-asr: the agent finds it on its PATH), or set "
                      "FLEET_NODE_TRANSCRIBE_URL on a node to an OpenAI-compatible "
                      "transcription server (whisper.cpp, faster-whisper)",
}
# Routes newer Ollama releases added, with the first release that serves each: Anthropic's
# Messages API and OpenAI's stateless Responses API. An older Ollama answers them with
# a bare 404, so a node that reports one is left out of their routing.
NEWER_INFERENCE = {"/v1/responses": "0.13.3", "/v1/messages": "0.14.0"}
# Routes an Ollama serves that the router does not route, and why: answered with a 404
# in the route's own API shape (Ollama's, OpenAI's, Anthropic's), not a bare one.
NOT_ROUTED = (
    ("/api/status", "the router has no cloud status of its own: /api/status is each "
                    "machine's; ask a node's Ollama"),
    ("/api/me", "signing in to ollama.com is per machine: run `ollama signin` on the node"),
    ("/api/signout", "signing out of ollama.com is per machine: run `ollama signout` on the "
                     "node"),
    ("/api/experimental/", "Ollama's experimental routes (web search, web fetch, model "
                           "recommendations) use a machine's own ollama.com sign-in: call "
                           "a node's Ollama for them"),
    ("/v1/messages/count_tokens", "counting tokens is not served by Ollama's Anthropic "
                                  "layer, nor by the router"),
    ("/v1/audio/speech", "text-to-speech is not routed: no node serves it through the "
                         "router"),
    ("/v1/audio/translations", "translating speech is not routed: the router routes "
                               "transcriptions (/v1/audio/transcriptions) only"),
)
BUSY_ERROR = "server busy, please try again.  maximum pending requests exceeded"
METRICS = [  # what GET /metrics exposes, in the Prometheus text format
    ("herd_requests_total", "counter", "Requests finished, by served model, node, status "
     "and kind (chat, embedding, image, transcription, admin)."),
    ("herd_request_duration_seconds", "histogram", "Time from request to last byte."),
    ("herd_time_to_first_token_seconds", "histogram", "Time from request to first chunk."),
    ("herd_tokens_total", "counter", "Prompt and completion tokens, as Ollama counted them."),
    ("herd_retries_total", "counter", "Attempts that failed before the first chunk."),
    ("herd_fallbacks_total", "counter", "Requests served by another model than asked."),
    ("herd_cancellations_total", "counter", "Requests whose client went away."),
    ("herd_queue_in_flight", "gauge", "Requests running, per node and model."),
    ("herd_queue_waiting", "gauge", "Requests queued, per node and model."),
    ("herd_holding_requests", "gauge", "Requests waiting for any node that can serve them."),
    ("herd_node_status", "gauge", "1 for the node's current status."),
    ("herd_node_memory_bytes", "gauge", "Node memory, total and available."),
    ("herd_events_total", "counter", "Routing decisions (context protection, ...)."),
    ("herd_zombies_reaped_total", "counter", "Requests stopped by the zombie reaper."),
    ("herd_trace_rows_dropped_total", "counter", "Trace rows lost to a full writer queue."),
    ("herd_connection_events_total", "counter", "Client connections refused (over the caps), "
     "closed for a slow request head, refused for a body too large or too slow, or from "
     "the head before the body (no key); TLS handshakes failed; accept pauses."),
]
MAX_MOVES = 8  # a queued request follows the rebalancer this often, then routes freely
MAX_FALLBACKS = 8  # fallback_models a request may name
# A node's status: it takes work (online; degraded is scored lower), its agent is
# leaving and lets running requests finish (draining), its agent stopped cleanly and
# said so (left: what its owner did, not a fault), or it went silent (offline).
ONLINE, DEGRADED, DRAINING, LEFT, OFFLINE = "online", "degraded", "draining", "left", "offline"
ASLEEP = "asleep"  # how /fleet/status shows an offline node that can be woken
NODE_STATUSES = (ONLINE, DEGRADED, DRAINING, LEFT, OFFLINE)
GONE = (LEFT, OFFLINE)  # no work, no heartbeats expected; its id may move to a new address
LEFT_LISTED_S = 3600.0  # a node that left is listed this long (FLEET_FORGET_OFFLINE_AFTER
# if shorter): long enough to see that it left, not a day of clutter
# Ollama's built-in origins (OLLAMA_ORIGINS adds to them): pages served from this
# machine, on any port, and the schemes of desktop apps and editor views.
OLLAMA_ORIGINS = tuple(
    f"{scheme}://{host}{port}" for host in ("localhost", "127.0.0.1", "0.0.0.0")
    for scheme in ("http", "https") for port in ("", ":*")
) + ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")
MAX_NODES_PER_ADDRESS = 8  # node ids one address may report (agents for several Ollamas)
ROUTER_WORD_S = 12.0  # how long a load or unload the router caused beats a heartbeat
PIN_KEEP_ALIVE_S = 3600  # a planned model's keep_alive at least (Proxy._pin)
PINNED_ENDPOINTS = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings")
UNLOAD_TIMEOUT_S = 10.0  # an unload before a load: Ollama answers it at once
THRASH_WINDOW_S = 600.0  # a model back in a node's memory this soon after it left: thrash


def load_router_config(environ, args, tuned=None):
    """The frozen config from the environment and command line; ConfigError if bad.
    `tuned` sets fixed values by name (tests only)."""
    cfg = hc.load_config(ROUTER_SETTINGS, environ, "FLEET_",
                         {"host": args.host, "port": args.port}, ROUTER_FIXED, tuned)
    hc.check_log_level("FLEET_LOG_LEVEL", cfg.log_level)
    hc.check_log_level("FLEET_CONSOLE_LOG_LEVEL", cfg.console_log_level)
    if cfg.port > 65535:
        raise hc.ConfigError(f"FLEET_PORT={cfg.port} is not a port number")
    if cfg.context_protection not in ("strip", "warn", "passthrough"):
        raise hc.ConfigError(f"FLEET_CONTEXT_PROTECTION={cfg.context_protection!r}: use "
                             f"strip, warn or passthrough")
    for name in ("heartbeat_timeout", "rebalance_interval", "local_node_interval",
                 "stale_timeout"):
        if getattr(cfg, name) <= 0:
            raise hc.ConfigError(f"FLEET_{name.upper()} must be above 0")
    if cfg.heartbeat_offline < cfg.heartbeat_timeout:
        raise hc.ConfigError("FLEET_HEARTBEAT_OFFLINE must not be shorter than "
                             "FLEET_HEARTBEAT_TIMEOUT")
    for name in ("header_timeout", "max_connections", "max_connections_per_client",
                 "max_nodes", "forget_offline_after", "max_blob_gb"):
        if getattr(cfg, name) <= 0:
            raise hc.ConfigError(f"FLEET_{name.upper()} must be above 0")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise hc.ConfigError("FLEET_TLS_CERT and FLEET_TLS_KEY go together: set both")
    values = cfg.as_dict()
    values["data_dir"] = hc.expand_dir(cfg.data_dir)
    values["client_keys"] = read_keys(cfg.api_keys)
    values["ollama_hosts_allowed"] = comma_set(cfg.allowed_ollama_hosts)
    values["registries_allowed"] = comma_set(cfg.pull_registries)
    values["origins_allowed"] = read_origins(cfg.origins)
    values["model_aliases"] = read_aliases(cfg.model_aliases)
    values["alert_target"] = read_alert_url(cfg.alert_url)
    values["wake_target"] = read_wake_address(cfg.wake_address)
    if cfg.learned_from:
        try:
            hc.split_url(cfg.learned_from)
        except ValueError as e:
            raise hc.ConfigError(f"FLEET_LEARNED_FROM: {e}") from None
    values["tls"] = server_tls(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
    values["misnamed"] = tuple(hc.misnamed_settings(
        environ, ROUTER_SETTINGS, hc.NODE_SETTINGS, bool(cfg.token), skip_prefix="FLEET_NODE_",
        fixed=ROUTER_FIXED))
    return hc.Config(values, cfg.sources)


def comma_set(text):
    return frozenset(t.strip().lower() for t in text.split(",") if t.strip())


def read_origins(setting):
    """FLEET_ORIGINS on top of Ollama's default origins; ConfigError for one that is
    not an origin pattern (scheme://host[:port], at most one *; or * alone)."""
    extra = [o.strip().lower().rstrip("/") for o in setting.split(",") if o.strip()]
    for origin in extra:
        if origin != "*" and ("://" not in origin or origin.count("*") > 1):
            raise hc.ConfigError(f"FLEET_ORIGINS: {origin!r} is not an origin such as "
                                 f"http://notes.local:3000 or chrome-extension://*")
    return tuple(extra) + OLLAMA_ORIGINS


def read_keys(setting):
    """FLEET_API_KEYS: 'key1,key2' or '@/path/to/file' with one key a line."""
    if not setting.startswith("@"):
        return frozenset(k.strip() for k in setting.split(",") if k.strip())
    try:
        with open(os.path.expanduser(setting[1:]), encoding="utf-8") as f:
            keys = frozenset(line.strip() for line in f if line.strip()
                             and not line.lstrip().startswith("#"))
    except OSError as e:
        raise hc.ConfigError(f"FLEET_API_KEYS={setting}: {e.strerror or e}") from None
    if not keys:
        raise hc.ConfigError(f"FLEET_API_KEYS={setting}: the file holds no key")
    return keys


def read_aliases(setting):
    """FLEET_MODEL_ALIASES: 'name=other[,other...];...' or '@/path/to/file' with one
    entry a line. Returns {each name: its entry's first name}, in Ollama's lookup form
    (lower case, with a tag); ConfigError for an entry that is not one, or a name in
    two entries (which would make two models one by guesswork)."""
    if setting.startswith("@"):
        try:
            with open(os.path.expanduser(setting[1:]), encoding="utf-8") as f:
                entries = [line.strip() for line in f if line.strip()
                           and not line.lstrip().startswith("#")]
        except OSError as e:
            raise hc.ConfigError(f"FLEET_MODEL_ALIASES={setting}: {e.strerror or e}") \
                from None
    else:
        entries = [e.strip() for e in setting.split(";") if e.strip()]
    aliases = {}
    for entry in entries:
        first, eq, others = entry.partition("=")
        names = [first.strip()] + [n.strip() for n in others.split(",") if n.strip()]
        if not eq or len(names) < 2:
            raise hc.ConfigError(f"FLEET_MODEL_ALIASES: {entry!r} is not "
                                 f"name=other[,other...]")
        try:
            names = [hc.canonical_model(hc.check_model_name(n)) for n in names]
        except ValueError as e:
            raise hc.ConfigError(f"FLEET_MODEL_ALIASES: {entry!r}: {e}") from None
        for name in names:
            if aliases.get(name, names[0]) != names[0]:
                raise hc.ConfigError(f"FLEET_MODEL_ALIASES: {name} is in two entries")
            aliases[name] = names[0]
    return aliases


def server_tls(cert, key):
    """The TLS context for FLEET_TLS_CERT / FLEET_TLS_KEY; ConfigError if unusable."""
    import ssl  # only with TLS on: the module costs memory a plain router never uses
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(os.path.expanduser(cert), os.path.expanduser(key))
    except (OSError, ssl.SSLError) as e:
        raise hc.ConfigError(f"FLEET_TLS_CERT / FLEET_TLS_KEY: {e}") from None
    return ctx


####################################################################################
# HTTP API: the route table and thin handlers that delegate
####################################################################################


class Api:
    """Every route the router answers: Ollama's, OpenAI's, Anthropic's, the fleet's, the
    dashboard's."""

    def __init__(self, cfg, fleet, scheduler, proxy, pulls, stats, traces, local, counters,
                 dashboard, learner):
        self.cfg, self.fleet, self.proxy = cfg, fleet, proxy
        self.pulls, self.stats = pulls, stats
        self.port = cfg.port  # the port bound (RouterServer sets it once listening)
        self.guard = Guard(cfg)
        self.cors = Cors(cfg.origins_allowed)
        self.hosts = Hosts(cfg.origins_allowed, socket.gethostname())
        self.admin = ModelAdmin(cfg, fleet, proxy, pulls, self.guard)
        self.nodes = FleetApi(cfg, fleet, scheduler, pulls, stats, traces, local, counters,
                              learner)
        self.spools = SpoolBudget(int(cfg.max_upload_mb * (1 << 20)))
        self.in_flight = 0
        self.all_done = asyncio.Event()
        self.catalogue = Catalogue(fleet)
        self.routes = {
            **self.catalogue.routes(),
            ("POST", "/api/show"): self.show,
            ("POST", "/api/pull"): self.pull,
            ("DELETE", "/api/delete"): self.admin.delete,
            ("POST", "/api/copy"): self.admin.copy,
            ("POST", "/api/create"): self.admin.create,
            ("POST", "/api/push"): self.admin.push,  # and HEAD, POST /api/blobs/<digest>
            **self.nodes.routes(),
            **dashboard.routes(),
        }
        for path in NATIVE_INFERENCE + OPENAI_INFERENCE + tuple(NEWER_INFERENCE):
            self.routes[("POST", path)] = self.inference
        self.routes[("POST", "/api/generate-image")] = self.generate_image
        for path in TRANSCRIBE_ROUTES:
            self.routes[("POST", path)] = self.transcribe
        # Every route that reaches a node is traced: its handler is given the request's
        # record (an Exchange) and answers through it; Proxy.recorded writes the row.
        self.traced = {self.inference, self.generate_image, self.transcribe, self.show,
                       self.pull, self.admin.delete, self.admin.copy, self.admin.create,
                       self.admin.push, self.admin.blob}

    # -- dispatch -----------------------------------------------------------------

    async def handle(self, request, conn):
        """The HttpConnection handler: one call per request."""
        self.in_flight += 1
        try:
            kind = self.guard.kind_of(request.path)
            if not self.needs_proof(kind) and not self.hosts.allows(request.header("host")):
                return await self.refuse(request, conn, 403, self.hosts.refusal(
                    request.header("host"), self.port))
            if await self.cross_origin(request, conn):
                return
            handler = self.routes.get((request.method, request.path)) or \
                self._prefix_route(request)
            refusal = self.guard.refuse(request, kind)
            if refusal:
                await self.refuse(request, conn, *refusal)
            elif handler in self.traced:
                await self.proxy.records.recorded(handler, request, conn)
            elif handler is not None:
                await handler(request, conn)
            elif (why := not_routed(request.path)) is not None:
                await conn.send_response(404, hc.error_body(hc.api_of(request.path), 404,
                                                            f"{request.path}: {why}"))
            else:
                await self.no_route(request, conn)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.all_done.set()

    def needs_proof(self, kind):
        """Does a route of `kind` answer only to a proof a web page cannot have: a key,
        or for heartbeats the fleet token's signature? (Then any Host may reach it.)"""
        return self.guard.needs_key(kind) or (kind == NODE and
                                              self.nodes.signatures is not None)

    def _prefix_route(self, request):
        """The handler of a path with a name in it, or None."""
        if request.method == "GET" and request.path.startswith("/v1/models/"):
            return self.catalogue.openai_model
        if request.method in BLOB_METHODS and request.path.startswith("/api/blobs/"):
            return self.admin.blob
        return None

    async def no_route(self, request, conn):
        """404, or 405 for a path known with other methods, in the shape of the API
        the client speaks (Ollama's own are plain text, which clients show raw)."""
        path = request.path
        methods = sorted({m for m, p in self.routes if p == path} or (
            BLOB_METHODS if path.startswith("/api/blobs/") else ()))
        shown = path[:200]
        if methods:
            status, message = 405, f"method {request.method[:16]} not allowed on {shown}"
            headers = [(b"allow", ", ".join(methods).encode())]
        else:
            status, message, headers = 404, f"404 page not found: {shown}", []
        await conn.send_response(status, hc.error_body(hc.api_of(path), status, message),
                                 headers=headers)

    async def cross_origin(self, request, conn):
        """A browser's request from another origin: refused (403, as Ollama does) unless
        its origin is allowed; then its preflight is answered here, before any key is
        asked for (a browser sends none with it), and every response to it carries the
        Access-Control headers. True when answered."""
        origin = self.cors.origin_of(request)
        if origin is None:
            return False
        if not self.cors.allows(origin):
            await self.refuse(request, conn, 403, f"origin {origin[:100]} is not allowed "
                                                  f"(the router's FLEET_ORIGINS)")
            return True
        conn.extra_headers = self.cors.headers_for(origin)
        if request.method == "OPTIONS" and request.header("access-control-request-method"):
            await conn.send_response(204, b"", None, self.cors.preflight_headers())
            return True
        return False

    async def refuse(self, request, conn, status, message):
        """A 401 or 403 in the shape of the API the client speaks."""
        status, body, headers = self.refusal(request, status, message)
        await conn.send_response(status, body, headers=headers)

    @staticmethod
    def refusal(request, status, message):
        """(status, body, headers) of a 401 or 403 in the shape of the client's API."""
        headers = [(b"www-authenticate", b'Bearer realm="herd"')] if status == 401 else []
        body = hc.error_body(hc.api_of(request.path), status, message,
                             "invalid_api_key" if status == 401 else None)
        return status, body, headers

    def check_head(self, request):
        """The HttpConnection's check of a request head that has a body: its refusal,
        (status, body, headers), sent before any of the body is read (and without 100
        Continue), or None. The same checks as handle() and heartbeat() make, on what
        the head alone shows: an origin not allowed, a key missing, an unsigned or
        stale heartbeat. A megabyte a key-less client cannot send is one the router
        never holds."""
        origin = self.cors.origin_of(request)
        cors = () if origin is None or not self.cors.allows(origin) else \
            self.cors.headers_for(origin)
        if origin is not None and not cors:
            return self.refusal(request, 403, f"origin {origin[:100]} is not allowed "
                                              f"(the router's FLEET_ORIGINS)")
        if request.path == "/heartbeat" and self.nodes.signatures is not None:
            why = self.nodes.signatures.refuse_head(request)
            if why is not None:
                self.stats.count_event("heartbeat_refused", f"heartbeat refused: {why}",
                                       level=logging.WARNING, client=request.client)
                return 401, hc.ollama_error_body(why), list(cors)
        refused = self.guard.refuse(request, self.guard.kind_of(request.path))
        if refused is None:
            return None
        status, body, headers = self.refusal(request, *refused)
        return status, body, headers + list(cors)

    async def wait_in_flight(self, timeout):
        """Wait until no request is being answered (idle connections do not count)."""
        self.all_done.clear()
        if self.in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.all_done.wait()

    # -- inference ----------------------------------------------------------------

    async def inference(self, request, conn, ex):
        try:
            body = hc.parse_json_body(request.body, request.shape)
            model = hc.check_model_name(body.get("model"))
        except ValueError as e:
            raise RouteError(400, str(e)) from None
        ex.ask(model)
        fallbacks = body.get("fallback_models", [])
        if not isinstance(fallbacks, list) or len(fallbacks) > MAX_FALLBACKS:
            raise RouteError(400, f"fallback_models must be a list of at most "
                                  f"{MAX_FALLBACKS} model names")
        for name in fallbacks:
            try:
                hc.check_model_name(name, "fallback_models entry")
            except ValueError as e:
                raise RouteError(400, str(e)) from None
        stream = body.get("stream")
        asked = hc.canonical_model(model)
        ex.ask(self.fleet.model_key(asked), (ex.api == "ollama") if stream is None
               else bool(stream), asked=asked)
        if ex.api == "ollama" and is_unload(request.path, body):
            refusal = self.guard.refuse(request, ADMIN)
            if refusal:
                status, body, headers = self.refusal(request, *refusal)
                return await ex.reply(status, body, headers=headers)
            return await self.proxy.unload(ex, body)
        await self.proxy.serve(ex, body, may_pull=self.guard.refuse(request, ADMIN) is None)

    # -- images and speech --------------------------------------------------------

    async def generate_image(self, request, conn, ex):
        """POST /api/generate-image: model, prompt, width, height, steps, seed; the
        picture comes back as PNG bytes (or base64 JSON with response_format b64_json)."""
        try:
            body = hc.parse_json_body(request.body, request.shape)
            model = hc.check_model_name(body.get("model"))
            read_image_settings(body)
        except ValueError as e:
            raise RouteError(400, str(e)) from None
        ex.ask(hc.canonical_model(model))
        await self.proxy.serve(ex, body, may_pull=False)

    async def transcribe(self, request, conn, ex):
        """POST /v1/audio/transcriptions (OpenAI's form: file, model, language,
        response_format) and /api/transcribe (the same form; the answer is the product's
        {"model", "text", ...}): the form is read until its model is known (a file
        before it is spooled to disk), then the upload streams on to a node that serves
        the model."""
        with Upload(request, conn, int(self.cfg.media_replay_mb * (1 << 20)),
                    self.spools) as upload:
            try:
                fields = await upload.read_fields(request.header("content-type"))
                text = {k: v.decode("utf-8", "replace") for k, v in fields.items()}
                model = hc.check_model_name(text.get("model"))
            except hc.BodyTooLarge:
                raise RouteError(413, upload.too_large()) from None
            except SpoolFull as e:
                raise RouteError(e.status, str(e)) from None
            except TimeoutError:
                raise RouteError(408, "the client stopped sending its upload") from None
            except ConnectionError as e:  # the body's framing is broken, or the client left
                if conn.client_gone:
                    raise
                raise RouteError(400, str(e)) from None
            except ValueError as e:
                message = str(e)
                if message == "model is required":
                    message = "model is required: the form needs a model field (curl: " \
                              "-F model=... -F file=@audio.wav)"
                raise RouteError(400, message) from None
            ex.ask(hc.canonical_model(model))
            await self.proxy.serve(ex, text, may_pull=False, upload=upload)

    async def show(self, request, conn, ex):
        """POST /api/show: asked of the node best placed to answer for the model."""
        body, name = read_model_request(request)
        ex.ask(hc.canonical_model(name), body=request.body, fields=body)
        node = self.fleet.best_holder(ex.model)
        if node is None:
            raise RouteError(404, f"model '{name}' not found")
        ex.node_id = node.node_id
        try:
            status, headers, data = await hc.http_call(
                node.ollama_url, "POST", "/api/show", request.body,
                timeout=self.cfg.first_byte_timeout)
        except hc.UpstreamError as e:
            raise RouteError(502, f"node {node.node_id}: {e}") from None
        await ex.reply(status, data, content_type(headers) or hc.JSON_TYPE,
                       [(b"x-fleet-node", node.node_id.encode())])

    async def pull(self, request, conn, ex):
        """Pull through the router: onto the node named in "node", else the node with
        the most free memory; Ollama's progress is relayed as it comes."""
        body, name = read_model_request(request)
        try:
            name = self.pulls.check_name(name)
        except ValueError as e:
            raise RouteError(400, str(e)) from None
        ex.ask(hc.canonical_model(name), body.get("stream") is not False, fields=body)
        if body.get("insecure") and not self.guard.is_admin(request):
            raise RouteError(403, "'insecure' pulls are for the admin (FLEET_ADMIN_KEY)")
        wanted = body.get("node")
        if wanted is not None and not isinstance(wanted, str):
            raise RouteError(400, "node must be a string")
        node = self.pulls.pick_node(wanted)
        if node is None:
            raise RouteError(404, f"node '{wanted}' is not online") if wanted else \
                RouteError(503, "no online node to pull onto")
        forwarded = hc.dump_json({k: v for k, v in body.items() if k != "node"})

        async def refresh():  # the new model is listed before the client sees the end
            await self.pulls.refresh_models(node)
        await self.proxy.forward(ex, node, forwarded, refresh)

class Catalogue:
    """What the fleet has, answered as one Ollama (and OpenAI's list) would: the root,
    /api/version, /api/tags, /api/ps, /v1/models."""

    def __init__(self, fleet):
        self.fleet = fleet

    def routes(self):
        return {("GET", "/"): self.root, ("HEAD", "/"): self.root,
                ("GET", "/api/version"): self.version, ("HEAD", "/api/version"): self.version,
                ("GET", "/api/tags"): self.tags, ("HEAD", "/api/tags"): self.tags,
                ("GET", "/api/ps"): self.ps,
                ("GET", "/v1/models"): self.openai_models}

    async def root(self, request, conn):
        await conn.send_response(200, b"Ollama is running", b"text/plain; charset=utf-8")

    async def version(self, request, conn):
        """The lowest Ollama version among the nodes not offline: what a client can
        rely on. A node that reports no release number is not counted: a server that
        only imitates Ollama (no /api/version), or a build from source (0.0.0). With no
        such node, 0.0.0: nothing can be relied on, yet the router answers (tools that
        check the connection this way see it up)."""
        versions = [v for v in (n.hb.ollama_version for n in self.fleet.online_nodes())
                    if RELEASE_RE.fullmatch(v) and any(version_key(v))]
        await conn.send_json(200, {"version": min(versions, key=version_key)
                                   if versions else "0.0.0"})

    async def tags(self, request, conn):
        await conn.send_json(200, {"models": self.fleet.merged_models()})

    async def ps(self, request, conn):
        await conn.send_json(200, {"models": self.fleet.running_models()})

    # -- OpenAI's model list ------------------------------------------------------

    async def openai_models(self, request, conn):
        await conn.send_json(200, {"object": "list", "data": self._openai_models()})

    def _openai_models(self):
        """The fleet's union: every Ollama model, and the image and speech models the
        agents serve themselves (OpenAI's list has them all; /api/tags only Ollama's)."""
        listed = [openai_model(e) for e in self.fleet.merged_models()]
        seen = {hc.canonical_model(m["id"]) for m in listed}
        for name in self.fleet.agent_models():
            if hc.canonical_model(name) not in seen:
                seen.add(hc.canonical_model(name))
                listed.append(openai_model({"model": name}))
        return listed

    async def openai_model(self, request, conn):
        wanted = request.path[len("/v1/models/"):]
        wanted = hc.canonical_model(urllib.parse.unquote(wanted))
        for model in self._openai_models():
            if hc.canonical_model(model["id"]) == wanted:
                return await conn.send_json(200, model)
        await conn.send_response(404, hc.openai_error_body(
            404, f"model '{wanted}' not found", "model_not_found"))


class FleetApi:
    """The fleet's own routes: the nodes' heartbeats (signed, checked field by field,
    applied), /fleet/status, /fleet/queue and /metrics."""

    def __init__(self, cfg, fleet, scheduler, pulls, stats, traces, local, counters,
                 learner):
        self.cfg, self.fleet, self.scheduler, self.pulls = cfg, fleet, scheduler, pulls
        self.stats, self.traces, self.local, self.learner = stats, traces, local, learner
        self.counters = counters  # the connections' own
        self.port = cfg.port  # the port bound (RouterServer sets it once listening)
        self.signatures = hc.SignatureCheck(cfg.token, nonce_path=os.path.join(
            cfg.data_dir, NONCE_FILE)) if cfg.token else None
        self.started = time.time()

    def routes(self):
        return {("POST", "/heartbeat"): self.heartbeat,
                ("GET", "/fleet/status"): self.fleet_status,
                ("GET", "/fleet/queue"): self.fleet_queue,
                ("GET", "/fleet/learned"): self.fleet_learned,
                ("GET", "/metrics"): self.metrics,
                ("GET", "/dashboard/api/overview"): self.fleet_status,
                ("GET", "/dashboard/api/queues"): self.fleet_queue}

    async def heartbeat(self, request, conn):
        """A node's report: signed (with FLEET_TOKEN), checked field by field, from the
        address the node id belongs to, naming an Ollama at that address."""
        refusal = self.signatures.refuse(request) if self.signatures else None
        if refusal:
            return await self.refuse_heartbeat(request, conn, 401, refusal)
        try:
            hb = hc.Heartbeat(hc.parse_json_body(request.body, request.shape))
        except ValueError as e:
            return await self.refuse_heartbeat(request, conn, 400, f"bad heartbeat: {e}")
        source = conn.client_ip
        if self.local.is_router(hb.ollama_url, self.port):
            return await self.refuse_heartbeat(
                request, conn, 400, f"ollama_url {hb.ollama_url} is this router, not an "
                                    f"Ollama: point FLEET_NODE_OLLAMA_HOST at Ollama's port "
                                    f"(Ollama listens on {hc.OLLAMA_PORT}, this router on "
                                    f"{self.port})")
        if not ollama_url_allowed(hb.ollama_url, source, self.cfg.ollama_hosts_allowed):
            return await self.refuse_heartbeat(
                request, conn, 403, f"ollama_url {hb.ollama_url} is not at {source}, where "
                                    f"this heartbeat comes from (list its host in the "
                                    f"router's FLEET_ALLOWED_OLLAMA_HOSTS to allow it)")
        if hb.media and not ollama_url_allowed(hb.media["url"], source,
                                               self.cfg.ollama_hosts_allowed):
            return await self.refuse_heartbeat(
                request, conn, 403, f"media.url {hb.media['url']} is not at {source}, where "
                                    f"this heartbeat comes from (list its host in the "
                                    f"router's FLEET_ALLOWED_OLLAMA_HOSTS to allow it)")
        self.local.yield_to(hb)
        try:
            node = self.fleet.apply_heartbeat(hb, source)
        except NodeRefused as e:
            return await self.refuse_heartbeat(request, conn, e.status, str(e))
        if self.signatures is None:
            self.note_unchecked_signature(node, request)
        # token_checked tells a signing agent whether its signature meant anything.
        await conn.send_json(200, {"status": "ok", "node_status": node.status,
                                   "in_flight": self.fleet.in_flight(node.node_id),
                                   "router_version": hc.VERSION,
                                   "token_checked": self.signatures is not None})

    @staticmethod
    def note_unchecked_signature(node, request):
        """A signed heartbeat to a router with no FLEET_TOKEN: the agent has a token the
        router never checks. Said once per node (the health check open_fleet names it)."""
        signs = bool(request.header("x-herd-signature"))
        if signs and not node.signs:
            fleet_log.warning(
                "this node signs its heartbeats (its agent has FLEET_NODE_TOKEN), but this "
                "router has no FLEET_TOKEN: it checks no signature, and any host can join. "
                "Set FLEET_TOKEN here to the agents' FLEET_NODE_TOKEN",
                extra={"node_id": node.node_id, "event": "token_unchecked"})
        node.signs = signs

    async def refuse_heartbeat(self, request, conn, status, message):
        """Refuse, log and count a heartbeat (the health checks report the count)."""
        self.stats.count_event("heartbeat_refused", f"heartbeat refused: {message}",
                               level=logging.WARNING, client=request.client)
        await conn.send_response(status, hc.ollama_error_body(message))

    async def fleet_status(self, request, conn):
        self.fleet.refresh_status()
        nodes = [node_summary(self.fleet, n, self.learner) for n in self.fleet.nodes.values()]
        counts = collections.Counter(n["status"] for n in nodes)
        await conn.send_json(200, {
            "router": {"version": hc.VERSION, "uptime_s": round(time.time() - self.started),
                       "nodes_online": counts[ONLINE], "nodes_degraded": counts[DEGRADED],
                       "nodes_draining": counts[DRAINING], "nodes_left": counts[LEFT],
                       "nodes_offline": counts[OFFLINE], "holding": self.scheduler.holding,
                       "zombies_reaped": self.stats.events["zombie_reaped"],
                       "events": dict(self.stats.events),
                       "traces_written": self.traces.written,
                       "traces_dropped": self.traces.dropped,
                       "open_fleet": not self.cfg.token,
                       "connections": {k: self.counters[k] for k in CONNECTION_COUNTERS}},
            "placement": self.scheduler.placement.view(),
            "pulls": self.pulls.shown(),
            "alerts": self.fleet.alerts.view(),
            "nodes": nodes})

    async def fleet_queue(self, request, conn):
        await conn.send_json(200, self.scheduler.queue_report())

    async def fleet_learned(self, request, conn):
        """What this router learned of each node+model, as it saves it: for a standby
        router to start from (FLEET_LEARNED_FROM)."""
        await conn.send_json(200, {"learned": self.learner.export()})

    async def metrics(self, request, conn):
        self.fleet.refresh_status()
        text = self.stats.render(self.fleet, self.scheduler.holding, self.traces.dropped,
                                 self.counters)
        await conn.send_response(200, text.encode(), b"text/plain; version=0.0.4; charset=utf-8")


# The overview's figures: counts, errors and percentiles over the last hour, a point a
# minute for its sparklines, and rates over the last five minutes (a load average: what
# the fleet is doing now, steadier than the last minute alone).
GLANCE_WINDOW_S, GLANCE_BUCKET_S, GLANCE_RECENT_S = 3600, 60, 300
GLANCE_PERCENTILES = (50, 95)
# A bucket with no request: counts are 0, means and speeds unknown (null, not 0).
EMPTY_BUCKET = {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0,
                "mean_latency_ms": None, "mean_ttft_ms": None, "tokens_per_s": None}


def fill_buckets(rows, span, bucket, now):
    """One point per `bucket` seconds, from the start of the bucket the last `span`
    seconds begin in up to the one now: a row's own, else an EMPTY_BUCKET. A chart
    then spans its whole range, however few requests it holds."""
    by_start = {int(r["t"]): r for r in rows}
    first = int((now - span) // bucket * bucket)
    return [by_start.get(t) or {"t": t, **EMPTY_BUCKET}
            for t in range(first, int(now) + 1, bucket)]


def percentile_fields(found):
    """{q: value} as {"p50": 812.3, "p95": ...} (None where nothing was timed)."""
    return {f"p{q}": _round(found.get(q)) for q in GLANCE_PERCENTILES}


class DashboardApi:
    """The dashboard: its page and the JSON it reads (curl users can read it too)."""

    def __init__(self, cfg, fleet, traces, health):
        self.cfg, self.fleet, self.traces, self.health = cfg, fleet, traces, health

    def routes(self):
        return {
            ("GET", "/dashboard"): self.dashboard,
            ("GET", "/dashboard/api/health"): self.health_report,
            ("GET", "/dashboard/api/summary"): self.summary,
            ("GET", "/dashboard/api/requests"): self.requests,
            ("GET", "/dashboard/api/models"): self.models,
            ("GET", "/dashboard/api/apps"): self.apps,
            ("GET", "/dashboard/api/trends"): self.trends,
            ("GET", "/dashboard/api/settings"): self.settings,
        }

    async def health_report(self, request, conn):
        await conn.send_json(200, await self.health.report())

    async def dashboard(self, request, conn):
        """dashboard.html from beside this script, read each time (edit and reload); an
        installed router's (pip, pipx) from its environment's share/herd."""
        path = dashboard_path()
        try:
            page = await asyncio.to_thread(read_bytes, path)
        except OSError:
            return await conn.send_response(404, b"dashboard.html is missing: copy it next "
                                                 b"to herd.py", b"text/plain; charset=utf-8")
        await conn.send_response(200, page, b"text/html; charset=utf-8", page_headers(page))

    async def settings(self, request, conn):
        """The effective configuration, each value with where it came from; then the
        fixed values (not settings: shown so that a curl user sees what they are)."""
        values, rows = self.cfg.as_dict(), []
        for st in ROUTER_SETTINGS:
            attr = st.name.removeprefix("FLEET_").lower()
            value = "(set)" if st.name in SECRET_SETTINGS and values[attr] else values[attr]
            rows.append({"name": st.name, "value": value, "default": st.default,
                         "source": self.cfg.sources.get(attr, "default"), "help": st.help,
                         "group": st.group})
        fixed = [{"name": st.name, "value": values[st.name.removeprefix("FLEET_").lower()],
                  "help": st.help} for st in ROUTER_FIXED]
        await conn.send_json(200, {"settings": rows, "fixed": fixed})

    async def requests(self, request, conn):
        """Recent traces, filtered: ?status=&model=&node=&tag=&since=<s ago>&limit="""
        q = {k: v[-1] for k, v in request.query.items()}
        try:
            since = float(q.get("since", 3600))
            limit = max(1, min(1000, int(q.get("limit", 100))))
            if not 0 <= since < 1e10:  # NaN and infinities fail this too
                raise ValueError(since)
        except ValueError:
            return await conn.send_response(400, hc.ollama_error_body(
                "since (seconds, 0 or more) and limit must be numbers"))
        rows = await self.traces.recent(time.time() - since, limit, q.get("status"),
                                        q.get("model"), q.get("node"), q.get("tag"))
        await conn.send_json(200, {"requests": rows})

    async def models(self, request, conn):
        """Per model: where it lives, hot or cold, and a day of usage per node."""
        usage = collections.defaultdict(list)
        for r in await self.traces.model_usage(time.time() - 86400):
            usage[r.pop("model")].append(r)
        models = {}

        def entry(name):
            return models.setdefault(name, {"model": name, "kinds": [], "on_disk": [],
                                            "loaded": []})
        for node in self.fleet.nodes.values():
            for name, listed in node.models.items():
                m = entry(name)
                m["on_disk"].append(node.node_id)
                if name in node.loaded:
                    m["loaded"].append(node.node_id)
                kind = hc.IMAGE if listed.can("image") else \
                    hc.EMBEDDING if listed.can("embedding") else hc.CHAT
                if kind not in m["kinds"]:
                    m["kinds"].append(kind)
            for kind, served in node.media_models.items():
                for name in served:  # an agent's tool or server is always ready: hot
                    m = entry(name)
                    m["on_disk"].append(node.node_id)
                    m["loaded"].append(node.node_id)
                    if kind not in m["kinds"]:
                        m["kinds"].append(kind)
        for name in usage:
            entry(name)
        for name, m in models.items():
            m["usage_24h"] = usage.get(name, [])
        await conn.send_json(200, {"models": sorted(models.values(),
                                                    key=lambda m: m["model"])})

    async def apps(self, request, conn):
        """Per tag (X-Herd-Tags / metadata.tags): a day of requests, errors, speed."""
        apps = await self.traces.app_usage(time.time() - 86400)
        await conn.send_json(200, {"window_s": 86400, "apps": apps})

    async def trends(self, request, conn):
        """Requests, errors, latency, time to first token, decode speed and tokens over
        time: ?range=1h (a point a minute), 6h (10 minutes), 24h (an hour), 7d (6 hours)
        or 30d (a day); every bucket of the range is listed, empty ones too."""
        name = request.query.get("range", ["24h"])[-1]
        if name not in hc.TREND_RANGES:
            return await conn.send_response(400, hc.ollama_error_body(
                f"range must be one of {', '.join(hc.TREND_RANGES)}"))
        span, bucket = hc.TREND_RANGES[name]
        points = fill_buckets(await self.traces.trends(span, bucket), span, bucket,
                              time.time())
        await conn.send_json(200, {"range": name, "range_s": span, "bucket_s": bucket,
                                   "points": points})

    async def summary(self, request, conn):
        """The fleet at a glance: the last hour's requests, errors, latency and time to
        first token (p50, p95), tokens and decode speed, a point a minute, and the
        request and token rates of the last five minutes."""
        now = time.time()
        hour, recent, latency, ttft, minutes, p50s = await asyncio.gather(
            self.traces.totals(now - GLANCE_WINDOW_S), self.traces.totals(now - GLANCE_RECENT_S),
            self.traces.percentiles("latency_ms", now - GLANCE_WINDOW_S, GLANCE_PERCENTILES),
            self.traces.percentiles("ttft_ms", now - GLANCE_WINDOW_S, GLANCE_PERCENTILES),
            self.traces.trends(GLANCE_WINDOW_S, GLANCE_BUCKET_S),
            self.traces.percentiles("latency_ms", (now - GLANCE_WINDOW_S) // GLANCE_BUCKET_S
                                    * GLANCE_BUCKET_S, (50,), GLANCE_BUCKET_S))
        points = [{"t": p["t"], "requests": p["requests"], "errors": p["errors"],
                   "completion_tokens": p["completion_tokens"],
                   "decode_tokens_per_s": p["tokens_per_s"],
                   "latency_p50_ms": _round(p50s.get(p["t"], {}).get(50))}
                  for p in fill_buckets(minutes, GLANCE_WINDOW_S, GLANCE_BUCKET_S, now)]
        await conn.send_json(200, {
            "window_s": GLANCE_WINDOW_S, "hour": self.hour_figures(hour, latency, ttft),
            "recent_s": GLANCE_RECENT_S, "recent": self.rates(recent),
            "bucket_s": GLANCE_BUCKET_S, "points": points})

    @staticmethod
    def hour_figures(t, latency, ttft):
        """The hour's totals: errors are failed and broken-off answers (a refused request
        is the client's error: `rejected`); decode speed is completion tokens over the
        time Ollama spent generating them, pooled over the answers that report both."""
        n = t["requests"]
        return {"requests": n, "errors": t["errors"], "rejected": t["rejected"],
                "cancelled": t["cancelled"],
                "error_rate": round(t["errors"] / n, 4) if n else None,
                "prompt_tokens": t["prompt_tokens"], "completion_tokens": t["completion_tokens"],
                "decode_tokens_per_s": _round(t["decoded_tokens"] * 1000 / t["decode_ms"])
                if t["decode_ms"] else None,
                "latency_ms": percentile_fields(latency),  # completed requests
                "ttft_ms": percentile_fields(ttft)}  # completed streamed requests

    @staticmethod
    def rates(t):
        """The last five minutes as rates: requests a minute, completion tokens a second
        (the fleet's output, all nodes together)."""
        return {"requests": t["requests"], "completion_tokens": t["completion_tokens"],
                "requests_per_min": round(t["requests"] * 60 / GLANCE_RECENT_S, 2),
                "completion_tokens_per_s": round(t["completion_tokens"] / GLANCE_RECENT_S, 2)}


# Who may call a route: anyone, a node (signed heartbeats), a client key, the admin.
OPEN, NODE, CLIENT, ADMIN, SCRAPE = "open", "node", "client", "admin", "scrape"
OPEN_PATHS = frozenset({"/", "/api/version", "/dashboard"})  # health checks, the page
ADMIN_PATHS = frozenset({"/api/pull", "/api/delete", "/api/copy", "/api/create",
                         "/api/push", "/dashboard/api/requests"})  # and /api/blobs/...
BLOB_METHODS = ("HEAD", "POST")
NONCE_FILE = "heartbeat-nonces.txt"  # in FLEET_DATA_DIR: the signature window's nonces
CONNECTION_COUNTERS = ("connections_refused", "header_timeouts", "bodies_too_large",
                       "bodies_too_slow", "refused_before_body", "handshakes_failed",
                       "accept_paused")
SECRET_SETTINGS = frozenset({"FLEET_TOKEN", "FLEET_API_KEYS", "FLEET_ADMIN_KEY",
                             "FLEET_METRICS_KEY"})


class Guard:
    """Client keys (FLEET_API_KEYS), the admin key and the metrics key. Each one unset
    opens what it guards, so a router with no key set answers everyone."""

    def __init__(self, cfg):
        self.client_keys = [k.encode() for k in sorted(cfg.client_keys)]
        self.admin_key = [cfg.admin_key.encode()] if cfg.admin_key else []
        self.metrics_key = [cfg.metrics_key.encode()] if cfg.metrics_key else []
        self.open = not (self.client_keys or self.admin_key or self.metrics_key)

    @staticmethod
    def kind_of(path):
        if path in OPEN_PATHS:
            return OPEN
        if path == "/heartbeat":
            return NODE
        if path == "/metrics":
            return SCRAPE
        return ADMIN if path in ADMIN_PATHS or path.startswith("/api/blobs/") else CLIENT

    @staticmethod
    def presented(request):
        """The key a request carries: Authorization: Bearer <key>, or x-api-key."""
        auth = request.header("authorization") or ""
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip().encode("latin-1")
        key = request.header("x-api-key")
        return key.strip().encode("latin-1") if key else b""

    @staticmethod
    def _one_of(given, keys):
        found = False
        for key in keys:  # every key compared, each in constant time
            found |= hmac.compare_digest(given, key)
        return bool(given) and found

    def is_admin(self, request):
        return self._one_of(self.presented(request), self.admin_key)

    def refuse(self, request, kind):
        """(status, message) when `request` may not use a route of `kind`, else None."""
        return self._refuse_key(self.presented(request), kind)

    def needs_key(self, kind):
        """Is a route of `kind` closed to a request that carries no key?"""
        return self._refuse_key(b"", kind) is not None

    def _refuse_key(self, given, kind):
        if self.open or kind in (OPEN, NODE):
            return None
        if self._one_of(given, self.admin_key):
            return None  # the admin may do everything
        if kind == SCRAPE and self.metrics_key:
            if self._one_of(given, self.metrics_key):
                return None
            return self._refusal(given, "FLEET_METRICS_KEY or FLEET_ADMIN_KEY")
        if kind in (ADMIN, SCRAPE) and self.admin_key:
            return self._refusal(given, "the admin key (FLEET_ADMIN_KEY)")
        if not self.client_keys or self._one_of(given, self.client_keys):
            return None
        return 401, ("missing or unknown API key: send Authorization: Bearer <key> "
                     "(one of the router's FLEET_API_KEYS)")

    def _refusal(self, given, needed):
        if self._one_of(given, self.client_keys) or self._one_of(given, self.metrics_key):
            return 403, f"this route needs {needed}, not a client key"
        return 401, f"this route needs {needed}"


class Cors:
    """Which browser pages may call the router, decided as Ollama decides it for itself
    (gin-contrib/cors, with OLLAMA_ORIGINS): an origin listed, or matching a pattern
    with one `*` (`http://localhost:*`, `chrome-extension://*`), or any with `*`."""

    METHODS = b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
    # Ollama's list (its own clients' and the OpenAI SDK's headers), then the ones
    # this router reads: its key header, its own headers, the Anthropic SDK's.
    HEADERS = (b"Authorization, Content-Type, User-Agent, Accept, X-Requested-With, "
               b"OpenAI-Beta, x-stainless-arch, x-stainless-async, "
               b"x-stainless-custom-poll-interval, x-stainless-helper-method, "
               b"x-stainless-lang, x-stainless-os, x-stainless-package-version, "
               b"x-stainless-poll-helper, x-stainless-retry-count, x-stainless-runtime, "
               b"x-stainless-runtime-version, x-stainless-timeout, "
               b"x-stainless-read-timeout, "
               b"x-api-key, X-Herd-Tags, X-Herd-Session, X-Herd-Node, anthropic-version, "
               b"anthropic-beta, anthropic-dangerous-direct-browser-access")
    EXPOSE = (b"X-Fleet-Node, X-Fleet-Served-Model, X-Fleet-Requested-Model, "
              b"X-Fleet-Retries, X-Fleet-Score, X-Fleet-Fallback, X-Fleet-Failed")
    MAX_AGE = b"43200"  # 12 hours, gin-contrib/cors's default, which Ollama keeps

    def __init__(self, allowed):
        self.any = "*" in allowed
        self.exact = frozenset(o for o in allowed if "*" not in o)
        self.patterns = [tuple(o.split("*")) for o in allowed if "*" in o and o != "*"]

    @staticmethod
    def origin_of(request):
        """The Origin of a cross-origin request, or None (none, or this router's own,
        as a page it serves sends: not a cross-origin request, as for Ollama)."""
        origin = request.header("origin")
        host = request.header("host")
        if origin is None or (host and origin in (f"http://{host}", f"https://{host}")):
            return None
        return origin

    def allows(self, origin):
        origin = origin.lower()
        return self.any or origin in self.exact or any(
            len(origin) >= len(head) + len(tail) and origin.startswith(head)
            and origin.endswith(tail) for head, tail in self.patterns)

    def headers_for(self, origin):
        """What every response to an allowed origin carries."""
        if self.any:
            return [(b"access-control-allow-origin", b"*"),
                    (b"access-control-expose-headers", self.EXPOSE)]
        return [(b"access-control-allow-origin", origin.encode("latin-1")),
                (b"vary", b"Origin"), (b"access-control-expose-headers", self.EXPOSE)]

    def preflight_headers(self):
        return [(b"access-control-allow-methods", self.METHODS),
                (b"access-control-allow-headers", self.HEADERS),
                (b"access-control-max-age", self.MAX_AGE)]


class Hosts:
    """Which Host headers name this router: the guard against DNS rebinding. A web page
    whose own host name an attacker re-points at the router's address is, to the
    browser, of the router's origin (its Origin header matches its Host); only the
    Host, an attacker's name, tells. Ollama refuses such a Host when it listens on
    loopback (allowedHostsMiddleware); the router, which serves the LAN, refuses it on
    every route no key guards (a page cannot know a key). The router's names: an IP
    literal, a name with no dot and the suffixes below (only the local network answers
    for them), this machine's host name, and the hosts of FLEET_ORIGINS' http(s)
    origins (pages that may call the router anyway; * for any)."""

    # .localhost (RFC 6761), .local (mDNS), the private-network names of RFC 6762's
    # appendix G, home.arpa (RFC 8375): no public DNS answers for any of them.
    LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".intranet", ".private",
                      ".corp", ".home", ".lan", ".home.arpa")

    def __init__(self, origins, hostname):
        self.own = hostname.lower().rstrip(".")
        self.any = "*" in origins
        hosts = [host_name(o.partition("://")[2]) for o in origins
                 if o.startswith(("http://", "https://"))]
        self.any |= "*" in hosts
        self.exact = frozenset(h for h in hosts if "*" not in h)
        self.patterns = [tuple(h.split("*")) for h in hosts if "*" in h]

    def allows(self, header):
        """Is the Host header `header` (None: none sent) one of the router's names?"""
        name = host_name(header or "")
        if self.any or "." not in name or name == self.own or \
                name.endswith(self.LOCAL_SUFFIXES) or name in self.exact:
            return True
        if any(len(name) >= len(head) + len(tail) and name.startswith(head)
               and name.endswith(tail) for head, tail in self.patterns):
            return True
        try:  # an IP literal: no name to rebind
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    @staticmethod
    def refusal(header, port):
        name = hc.printable(host_name(header))[:100]
        return (f"Host {name} is not one of this router's names, and a web page that DNS "
                f"rebinding points at the router sends such a Host: refused. Reach the "
                f"router by its address or host name, or list http://{name}:{port} in "
                f"its FLEET_ORIGINS")


def host_name(header):
    """The host in a Host header (host[:port], [v6][:port]): lower case, no final dot."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def read_model_request(request):
    """(body, model name) of a native request; RouteError(400) in Ollama's words."""
    try:
        body = hc.parse_json_body(request.body, request.shape)
        return body, hc.check_model_name(body.get("model") or body.get("name"))
    except ValueError as e:  # "name" is the older spelling
        raise RouteError(400, str(e)) from None


def not_routed(path):
    """Why the router does not route this path an Ollama serves, or None (NOT_ROUTED)."""
    return next((why for route, why in NOT_ROUTED
                 if path == route or route.endswith("/") and path.startswith(route)), None)


def ollama_url_allowed(url, source, allowed):
    """Does a heartbeat from `source` name an Ollama it may name? Its own address; for
    an agent on this machine (plain loopback), localhost too; or a host the operator
    listed in FLEET_ALLOWED_OLLAMA_HOSTS. A stranger cannot point a node elsewhere."""
    host = hc.split_url(url)[0].lower()
    if "*" in allowed or host in allowed:
        return True
    if source in ("127.0.0.1", "::1") and host in ("localhost", "127.0.0.1", "::1"):
        return True
    return same_address(host, source)  # a name never is: the router does not resolve it


def same_address(a, b):
    """Two IP literals for one address (2001:db8::1 and 2001:DB8:0::1 are the same)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_pton(family, a) == socket.inet_pton(family, b)
        except (OSError, TypeError):
            continue
    return False


def openai_model(entry):
    """An /api/tags entry as OpenAI's model object."""
    name = entry.get("model") or entry.get("name")
    owner = name.split("/")[-2] if name.count("/") else "library"
    out = {"id": name, "object": "model",
           "created": hc.rfc3339_to_unix(entry.get("modified_at")), "owned_by": owner}
    if "nodes" in entry:
        out["nodes"] = entry["nodes"]
    return out


def node_summary(fleet, node, learner):
    """One node as /fleet/status shows it."""
    hb = node.hb
    return {  # offline, but it said how to wake it: asleep
        "node_id": node.node_id, "status": ASLEEP if fleet.waker.asleep(node) else node.status,
        "local": node.local, "wake": list(hb.wake),
        "last_wake_s": fleet.waker.took.get(node.node_id),  # packet to heartbeat, if woken
        "ollama_url": node.ollama_url,
        "last_heartbeat_s": round(time.monotonic() - node.last_seen, 1),
        "agent_version": hb.agent_version or None, "hardware": hb.hardware,
        "memory": hb.memory, "cpu": {"percent": hb.cpu_percent}, "disk": hb.disk,
        "ollama": hb.ollama, "server": {"kind": hb.server_kind, "version": hb.server_version,
                                        "loads": hb.server_loads, "load": hb.server_load},
        "power": hb.power,
        "draining": node.status == DRAINING or hb.draining,
        "paused": hb.paused, "capacity": hb.capacity, "num_parallel": fleet.slots_for(node),
        "capabilities": node.capabilities(), "media": hb.media,
        "models_on_disk": sorted(node.models),
        "models_loaded": [
            {"model": name, "size": e.size, "size_vram": e.size_vram,
             "context_length": e.context_length, "expires_at": e.expires_at}
            for name, e in sorted(node.loaded.items())],
        "queues": {model: {"active": q.active, "waiting": q.waiting, "limit": q.limit}
                   for (nid, model), q in fleet.queues.items() if nid == node.node_id},
        "learned": learner.view(node.node_id, node.models,
                                {m: fleet.limit_for(node, m) for m in node.models}),
    }


def page_headers(page):
    """A Content-Security-Policy that lets the page run only its own inline script and
    style (by hash) and talk only to this router: a value from the API that slipped into
    the page as markup could still not run or send anything anywhere."""
    hashes = {}
    for tag in (b"script", b"style"):
        blocks = re.findall(rb"<" + tag + rb">(.*?)</" + tag + rb">", page, re.S)
        hashes[tag] = " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'"
            for b in blocks) or "'none'"
    policy = (f"default-src 'none'; script-src {hashes[b'script']}; "
              f"style-src {hashes[b'style']}; connect-src 'self'; img-src 'self' data:; "
              f"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return [(b"content-security-policy", policy.encode()),
            (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


def dashboard_path():
    """dashboard.html beside herd.py; else, for a router installed with pip or pipx, in
    its install's share/herd (its data files go to <prefix>/share/herd, and herd.py to
    <prefix>/lib/pythonX.Y/site-packages, or <prefix>/Lib/site-packages on Windows)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for up in ("", "../..", "../../.."):
        path = os.path.normpath(os.path.join(here, up, "share/herd" if up else "",
                                             "dashboard.html"))
        if os.path.exists(path):
            return path
    return os.path.join(here, "dashboard.html")  # missing: the 404 says where it goes


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


RELEASE_RE = re.compile(r"v?\d+(\.\d+){1,3}(-[0-9A-Za-z.-]+)?")


def version_key(version):
    return tuple(int(p) for p in re.findall(r"\d+", version.lstrip("v").split("-")[0]))


####################################################################################
# Proxy: one request to one node at a time, relayed chunk by chunk
#
# Theory: every request on a route that reaches a node has one record, an Exchange,
# from its head to its trace row. Proxy.recorded() opens it, runs the route's handler
# with it and, in one `finally`, writes the row (Proxy.finish); an error the handler
# raises (RouteError) is answered there, in the client's API's shape. Handlers answer
# only through the record: Exchange.reply() and fail(), or a node's answer relayed.
# Proxy.serve() runs the attempts of a routed request: choose a node, wait for a slot
# in its queue, then NodeRelay.attempt() sends the request and relays the answer
# (MediaRoute says where an image or speech request goes on the node, and how its
# answer comes back). A node that fails before the first chunk reached the client is
# excluded and the next best one tried (each such attempt is a `retried` row of its
# own); after the first chunk the answer is the client's, so a failure then ends the
# stream with an error line in the client's framing. The Exchange collects facts
# (status code, started, answered, client left, reaped); Exchange.outcome() is the
# one place that turns them into the trace's status.
####################################################################################

NON_STREAM_BUFFER = 16 << 20  # a non-streamed answer up to this size is checked whole
# Ollama writes its counts and timings last, so the answer's tail has them: the native
# final chunk, OpenAI's usage, Anthropic's message_delta (input and output tokens), the
# Responses API's response.completed. Only the native API has timings, and llama-server's
# OpenAI answers theirs (`timings`, in ms); the others carry counts alone (so no decode
# speed is learned from them). They are read from the JSON
# object that holds them, parsed, never matched as text: a server may write
# "eval_count": 8 as well as Go's "eval_count":8.
USAGE_KEYS = {  # trace field -> the names the APIs give it
    "prompt_tokens": ("prompt_eval_count", "prompt_tokens", "input_tokens"),
    "completion_tokens": ("eval_count", "completion_tokens", "output_tokens"),
    "load_ns": ("load_duration",),
    "prompt_eval_ns": ("prompt_eval_duration",),
    "eval_ns": ("eval_duration",),
}
USAGE_MARKS = (b'"usage"', b'"eval_count"', b'"prompt_eval_count"', b'"timings"')
# llama-server's timings: trace field -> (its name, the factor to the trace's unit)
TIMINGS_KEYS = {"prompt_tokens": ("prompt_n", 1), "completion_tokens": ("predicted_n", 1),
                "prompt_eval_ns": ("prompt_ms", 1e6), "eval_ns": ("predicted_ms", 1e6)}
USAGE_MAX = 1 << 62  # a count or a duration in ns beyond this is not believed
USAGE_EVENTS = 8  # of a stream's head or tail, the events looked at for its counts
USAGE_CHUNKS = 6  # the chunks unframed for those events: Ollama flushes an event a
#                  chunk, and may split a long final line (generate's context) in two
WHOLE_USAGE_MAX = 256 << 10  # a whole answer parsed for its counts on the loop (about
#                              1 ms); of a larger one only its last members are
EMBED_ENDPOINTS = ("/api/embed", "/api/embeddings", "/v1/embeddings")


class AttemptFailed(Exception):
    """A node failed before anything reached the client: another node may try. `status`
    is the client's answer if none can: 504 when the node said it timed out, else 502."""

    def __init__(self, message, status=502):
        super().__init__(message)
        self.status = status


class Exchange:
    """The record of one request on a traced route, from its head to its trace row:
    Api.handle opens it (Proxy.recorded), the handler answers only through it (reply,
    fail, or a relay from a node), and one `finally` writes its row. What the request
    asked for is filled in once its body is read (ask)."""

    def __init__(self, request, conn):
        self.request_id = os.urandom(8).hex()  # 16 hex digits
        self.t0, self.wall = time.monotonic(), time.time()
        self.request, self.conn, self.endpoint = request, conn, request.path
        self.api = hc.api_of(request.path)
        self.kind = request_kind(request.path)
        self.upload = None  # an Upload: a speech file streamed from the client
        self.model = self.served_model = ""
        self.asked = ""  # the model's name as the client asked (model: its FLEET_MODEL_ALIASES key)
        self.name_sent = None  # the name the body gives the model served (a fallback's)
        self.node_model = None  # the node's own name for it, where that is another
        self.stream = False
        self.body = self.client_body = b""  # what goes to the node / what the client sent
        self.fields = {}  # the client's parsed body
        self.node_id = self.score = self.breakdown = self.tags = None
        self.retries = 0
        # Its node's InFlight while it holds a slot there, and (monotonic, that one's
        # decode_area) at its first token.
        self.flight = self.decoding_since = None
        self.ttft = self.queue_wait = None
        self.usage = {}  # USAGE_KEYS' fields found in the answer
        self.task = asyncio.current_task()
        self.progress = None  # monotonic time of the last sign of life once sent to a node
        self.relay = None
        # The facts outcome() reads.
        self.http_status = self.error = None
        self.started = self.answered = False  # the first byte / the last byte went out
        self.answer_failed = False  # Ollama's error line ended a 200 answer
        self.client_left = self.reaped = False
        self.before_end = None  # coroutine function run before a good answer's last byte
        self.may_pull = False  # a model no node has may be pulled for this request
        self.chosen = False  # sent to the node the client chose: its 5xx is the answer
        self.session_key = None  # what the conversation's next turn will be known by
        self.stale_after = None  # seconds without progress before the reaper stops it
        self.first_expected_s = 0.0  # from its slot to its first token, as forecast

    @property
    def ttft(self):
        """Seconds from its head to the first byte of its answer (None: not yet)."""
        return self._ttft

    @ttft.setter
    def ttft(self, value):
        self._ttft = value
        if value is not None and self.stream and self.flight is not None and \
                self.decoding_since is None:
            self.decoding_since = (self.flight.decode(1), self.flight.decode_area)

    def decode_crowd(self):
        """Done on its node: the mean number of answers streaming there while its own
        did, itself included (None: it never streamed a first token there). A whole
        answer's first byte is its last, so its decoding is not seen, nor counted."""
        since, flight = self.decoding_since, self.flight
        self.flight = self.decoding_since = None
        if since is None:
            return None
        now = flight.decode(-1)
        return (flight.decode_area - since[1]) / (now - since[0]) if now > since[0] else 1.0

    def ask(self, model, stream=False, body=b"", fields=None, asked=None):
        """What the client asked for: the model, streamed or not, the body for the node
        (`fields`: the client's own, parsed); `asked`: the name it used, where `model`
        is its alias's."""
        self.model = self.served_model = model
        self.asked = asked or model
        self.stream = stream
        self.body = self.client_body = body
        self.fields = fields or {}

    async def reply(self, status, body, ctype=hc.JSON_TYPE, headers=(), error=None):
        """Answer the client with this whole response; an error status's trace error is
        `error`, else the message its body gives."""
        self.http_status = status
        if status >= 400:
            self.error = error or error_text(body)
        await self.conn.send_response(status, body, ctype, list(headers))
        self.answered = True

    async def fail(self, status, message, headers=()):
        """Answer the client with an error in the shape of the API it speaks."""
        await self.reply(status, self.error_body(status, message), headers=headers,
                         error=message)

    def pace(self, now, usual_tps, started):
        """How fast its answer goes against `usual_tps` (1.0: as usual), or None if it
        cannot tell yet. Streaming: its tokens/s from the chunks relayed since the first
        (a token a chunk), once LIVE_MIN_CHUNKS have come. Before the first chunk of a
        streamed answer, from `started` (when it had its slot): once that wait is
        LATE_FIRST times the first token's expected wait (and LATE_MIN_S at least), at
        most expected / waited."""
        if self.ttft is None:
            if not self.stream:
                return None  # a whole answer's first byte is its last: nothing is late
            waited, expected = now - started, self.first_expected_s
            if expected and waited > max(LATE_MIN_S, LATE_FIRST * expected):
                return expected / waited
            return None
        if self.relay is None or not usual_tps:
            return None
        chunks, since = self.relay.chunks_seen - 1, now - self.t0 - self.ttft
        if chunks < LIVE_MIN_CHUNKS or since <= 0:
            return None
        return chunks / since / usual_tps

    def outcome(self):
        """The request's trace status, from what happened to it."""
        if self.reaped:
            return hc.FAILED
        if self.client_left:
            return hc.CANCELLED
        if not self.answered:
            return hc.INCOMPLETE if self.started else hc.FAILED
        if self.http_status >= 500 or self.answer_failed:
            return hc.FAILED
        return hc.REJECTED if self.http_status >= 400 else hc.COMPLETED

    def touch(self):
        self.progress = time.monotonic()

    def last_progress(self):
        if self.progress is None:
            return None
        return max(self.progress, self.relay.last_progress if self.relay else 0.0)

    def reset_body(self):
        self.body, self.served_model = self.client_body, self.model
        self.name_sent, self.node_model = self.fields.get("model"), None

    def use_model(self, model, name_as_sent):
        """Serve another model (a fallback, a larger context): the body names it."""
        self.served_model, self.name_sent = model, name_as_sent
        self.rewrite(model=name_as_sent)

    def rewrite(self, num_ctx=None, **fields):
        """Forward the body with these top-level fields (and options.num_ctx) changed."""
        out = {k: v for k, v in json.loads(self.body).items() if k not in ROUTING_FIELDS}
        out.update(fields)
        if num_ctx is not None:
            out["options"] = {**(out.get("options") or {}), "num_ctx": num_ctx}
        self.body = hc.dump_json(out)

    def error_body(self, status, message):
        return hc.error_body(self.api, status, message)

    def read_usage(self, body):
        """Token counts and Ollama's timings of a whole answer: one JSON object."""
        obj = event_object(body if len(body) <= WHOLE_USAGE_MAX else last_members(body))
        if obj is not None:
            self.usage.update(counts_in(obj))

    def read_stream_head(self, first):
        """Counts a stream gives at its head (Anthropic's message_start names the input
        tokens); the tail's, when it has them, replace these."""
        head = hc.unframe_chunks(first, USAGE_CHUNKS)
        self.usage.update(stream_counts(last_events(self.api, head, end=False)))

    def read_stream_end(self, relay):
        """What a relayed stream's last events say: its counts, and whether it broke off
        with an error. True when its last event is one that ends an answer."""
        events = last_events(self.api, hc.unframe_last_chunks(relay.tail, USAGE_CHUNKS))
        self.usage.update(stream_counts(events))
        frames = relay.chunks_seen
        if "completion_tokens" not in self.usage and frames and self.api == "openai":
            # A token an event, but for the finish chunk and [DONE] (Ollama writes and
            # flushes each event alone: one chunk of the body each).
            self.usage["completion_tokens"] = max(0, frames - 2)
        ended, failure = final_event(self.api, events)
        if failure is not None:
            self.answer_failed, self.error = True, failure
        return ended

    def client_gone(self, why):
        """The client hung up: a cancellation, unless its answer had all reached it."""
        if not self.answered:
            self.client_left, self.error = True, why

    def trace_row(self, status=None, error=None):
        ms = (time.monotonic() - self.t0) * 1000
        u = self.usage
        return {
            "request_id": self.request_id, "timestamp": self.wall, "model": self.served_model,
            "requested_model": self.asked, "node_id": self.node_id,
            "status": status or self.outcome(), "http_status": self.http_status,
            "latency_ms": round(ms, 2), "ttft_ms": _ms(self.ttft),
            "prompt_tokens": u.get("prompt_tokens"),
            "completion_tokens": u.get("completion_tokens"),
            "retries": self.retries, "score": self.score,
            "score_breakdown": json.dumps(self.breakdown) if self.breakdown else None,
            "client_addr": self.request.client, "api_format": self.api,
            "endpoint": self.endpoint, "stream": int(self.stream),
            "queue_wait_ms": _ms(self.queue_wait), "error_message": error or self.error,
            "tags": self.tags, "load_ms": _ns_to_ms(u.get("load_ns")),
            "prompt_eval_ms": _ns_to_ms(u.get("prompt_eval_ns")),
            "eval_ms": _ns_to_ms(u.get("eval_ns")), "kind": self.kind,
            "node_model": self.node_model,
        }


async def stop_task(task):
    """Cancel `task` and wait until it has ended, without taking its CancelledError for
    this task's own (a cancel of this task while it waits still propagates)."""
    task.cancel()
    await asyncio.wait((task,))
    if not task.cancelled():
        task.exception()  # it ended otherwise meanwhile: retrieved, so never reported


def _ms(seconds):
    return round(seconds * 1000, 2) if seconds is not None else None


def _ns_to_ms(ns):
    return round(ns / 1e6, 2) if ns is not None else None


REFUSALS_TRACED_PER_CLIENT = 30  # a minute: requests refused before any node, traced
REFUSALS_TRACED_IN_ALL = 300  # a minute, from all clients together


class RefusalSampler:
    """Which requests the router refused by itself (a 4xx before any node: an unknown
    model, a bad body, too many in flight) get a trace row and a log line: at most
    REFUSALS_TRACED_PER_CLIENT a minute from one client address and
    REFUSALS_TRACED_IN_ALL from all. Such a refusal costs a client nothing and a
    trace row some 660 bytes on disk, so without this any client could grow the disk
    as fast as it can send; the rest are counted, and said in one line when the next
    minute's first refusal comes."""

    WINDOW_S = 60.0

    def __init__(self, per_client=REFUSALS_TRACED_PER_CLIENT, in_all=REFUSALS_TRACED_IN_ALL):
        self.per_client, self.in_all = per_client, in_all
        self.since = None  # monotonic start of the window
        self.counts = collections.Counter()  # client -> refusals traced in the window
        self.traced = self.skipped = 0  # in the window

    def take(self, client, now):
        """True when this refusal is traced; else it is counted in `skipped`."""
        if self.since is None or now - self.since >= self.WINDOW_S:
            self._roll(now)
        if self.counts[client] >= self.per_client or self.traced >= self.in_all:
            self.skipped += 1
            return False
        self.counts[client] += 1
        self.traced += 1
        return True

    def _roll(self, now):
        if self.skipped:
            proxy_log.warning(f"{self.skipped} requests refused before reaching a node in "
                              f"the last minute were not traced (more than "
                              f"{self.per_client} from one client, or {self.in_all} "
                              f"from all)",
                              extra={"event": "refusals_untraced"})
        self.since, self.counts, self.traced, self.skipped = now, collections.Counter(), 0, 0


class Records:
    """One request, one record, one writer: opens each traced request's Exchange, sees
    it to its end whatever happens (an error raised, a cancel, the reaper, a client
    gone), and writes its trace row, and each retried attempt's."""

    def __init__(self, cfg, stats, traces):
        self.cfg, self.stats, self.traces = cfg, stats, traces
        self.active = {}  # request_id -> Exchange sent to a node, for the reaper
        self.refusals = RefusalSampler()

    async def recorded(self, handler, request, conn):
        """Run a traced route's handler with the request's record (Exchange), and write
        its trace row once, whatever happened: the one place a request of a traced
        route is answered with an error it raised (RouteError), or found cancelled,
        reaped or left by its client."""
        ex = Exchange(request, conn)
        try:
            await handler(request, conn, ex)
        except RouteError as e:
            if conn.response_started:
                ex.error = ex.error or str(e)  # too late to answer: the trace says why
            else:
                await ex.fail(e.status, str(e), e.headers)
        except asyncio.CancelledError:
            if ex.reaped and asyncio.current_task().uncancel() == 0:
                return await self._answer_reaped(conn, ex)  # the reaper's cancel ends here
            if conn.client_gone:
                ex.client_gone("client disconnected")
            else:
                ex.error = ex.error or "router shutting down"
            raise
        except ConnectionError as e:  # writing to the client failed: it is gone
            ex.client_gone(f"client connection lost: {e}")
        except hc.UpstreamError as e:
            ex.error = str(e)
        finally:
            self.active.pop(ex.request_id, None)
            self.finish(ex)

    async def _answer_reaped(self, conn, ex):
        """A request the reaper stopped: say so to the client in its framing."""
        ex.error = (f"no progress for {ex.stale_after or self.cfg.stale_timeout:g}s on node "
                    f"{ex.node_id}: request reaped")
        self.stats.count_event("zombie_reaped", "zombie request reaped", ex,
                               level=logging.WARNING)
        if conn.response_started:
            await end_with_error(conn, ex, ex.error)
        else:
            await ex.fail(504, ex.error)

    def finish(self, ex):
        """Record the trace of a finished request, count it, and log it (a refusal of
        the router's own only as RefusalSampler allows)."""
        row = ex.trace_row()
        self.stats.count_request(ex, row)
        if row["status"] == hc.REJECTED and ex.node_id is None and not self.refusals.take(
                ex.request.client.rpartition(":")[0], time.monotonic()):
            self.stats.events["refusals_untraced"] += 1
            return
        self.traces.record(row)
        # One line per request goes to the JSONL file (DEBUG by default); only trouble
        # reaches the terminal.
        status = row["status"]
        level = logging.DEBUG if status in (hc.COMPLETED, hc.CANCELLED) else logging.WARNING
        proxy_log.log(level, f"{ex.endpoint} {status}", extra={
            "request_id": ex.request_id, "model": ex.served_model, "node_id": ex.node_id,
            "status": status, "client": ex.request.client, "error": ex.error,
            "elapsed_ms": row["latency_ms"]})

    def reap_zombies(self):
        """Stop requests sent to a node that show no progress for FLEET_STALE_TIMEOUT."""
        now, reaped = time.monotonic(), 0
        for ex in list(self.active.values()):
            seen = ex.last_progress()
            limit = ex.stale_after or self.cfg.stale_timeout
            if seen is not None and not ex.reaped and now - seen > limit:
                ex.reaped = True
                ex.task.cancel(msg="reaped: no progress")
                reaped += 1
        return reaped

    def retried(self, ex, error):
        """An attempt of `ex` that failed before its first chunk: a row of its own."""
        self.traces.record(ex.trace_row(hc.RETRIED, error=error))


class Proxy:
    """Routes, queues and relays requests, with retries before the first chunk."""

    def __init__(self, cfg, fleet, scheduler, learner, pulls, warmer, stats, traces, pool):
        self.cfg, self.fleet, self.scheduler, self.learner = cfg, fleet, scheduler, learner
        self.pulls, self.warmer, self.stats = pulls, warmer, stats
        self.node_relay = NodeRelay(cfg, pool)
        self.records = Records(cfg, stats, traces)
        self.client_in_flight = collections.Counter()

    # -- prepare ------------------------------------------------------------------

    async def serve(self, ex, body, may_pull=True, upload=None):
        """Route, queue and relay `ex` (its model and stream asked for), with retries
        before the first chunk; a model no node has is pulled first if `may_pull`
        (FLEET_AUTO_PULL, and the admin key when one is set: an auto-pull is a pull).
        `body`: the client's, parsed; `upload`: the body is a speech file streamed on
        from the client (an Upload)."""
        ex.body = ex.client_body = strip_routing_fields(ex.request, body)
        ex.fields, ex.upload = body, upload
        ex.may_pull = may_pull and self.cfg.auto_pull and ex.kind not in hc.MEDIA_KINDS
        ex.tags = request_tags(ex.request, body)
        ex.conn.watch_client()
        self.records.active[ex.request_id] = ex
        with self._admit(ex.request.client.rpartition(":")[0]):
            await self._attempts(ex.conn, ex)

    @contextlib.contextmanager
    def _admit(self, client):
        """Count a client's requests in flight; past FLEET_CLIENT_MAX_IN_FLIGHT, 429."""
        limit = self.cfg.client_max_in_flight
        if limit and self.client_in_flight[client] >= limit:
            raise RouteError(429, f"client {client} already has {limit} requests in "
                                  f"flight (FLEET_CLIENT_MAX_IN_FLIGHT)",
                             [(b"retry-after", b"1")])
        self.client_in_flight[client] += 1
        try:
            yield
        finally:
            self.client_in_flight[client] -= 1
            if not self.client_in_flight[client]:
                del self.client_in_flight[client]

    # -- attempts -------------------------------------------------------------------

    async def _attempts(self, conn, ex):
        cfg, name = self.cfg, ex.fields.get("model")
        ask = Ask(requested_context(ex.fields), requested_tokens(ex.fields),
                  endpoint=ex.endpoint, kind=ex.kind)
        lookup, ex.session_key = conversation_keys(ex.request, ex.fields, ex.tags)
        ask.session_node = self.scheduler.sessions.node_for(lookup)
        self.scheduler.placement.count(ex.model, fresh=ask.session_node is None)
        await self.scheduler.placement.ready_for(ex.model)
        models, names = self.scheduler.models_to_try(
            ex.model, ex.fields.get("fallback_models"), ask.requested_ctx,
            ex.endpoint in EMBED_ENDPOINTS)
        exclude, last_error, attempt, prefer, moves, pulled = [], None, 0, None, 0, False
        while attempt <= cfg.max_retries:
            try:
                # A retry takes the next best node now or not at all: no holding queue.
                choice = await self.scheduler.choose(models, ask, exclude, name,
                                                     hold=attempt == 0, prefer=prefer)
            except RouteError as e:
                if e.status == 404 and ex.may_pull and not pulled and \
                        not any(self.fleet.holders(m) for m in models):
                    pulled = True  # no node has it: fetch it once, then route again
                    await self.pulls.ensure(ex.model, name, e)
                    continue
                if last_error is None:
                    raise
                break
            q = self._commit(ex, choice, ask, attempt, names, name)
            try:
                return await self._attempt_on(conn, ex, choice, q, ask)
            except Moved as m:  # drained, or rebalanced to a node with a free slot
                moves += 1
                prefer = m.target if moves < MAX_MOVES else None
            except AttemptFailed as e:
                last_error = e
                proxy_log.warning("attempt failed, trying another node",
                                  extra={"request_id": ex.request_id, "node_id": ex.node_id,
                                         "model": ex.served_model, "error": str(e)})
                self.records.retried(ex, str(e))
                exclude.append(choice.node.node_id)
                attempt += 1
        raise RouteError(last_error.status, f"no node could answer: {last_error}")

    def _commit(self, ex, choice, ask, attempt, names, name):
        """Make `choice` this attempt's: the trace's fields, the body as that node must
        get it, a cold load counted as under way at once; returns its queue."""
        ex.node_id, ex.score, ex.breakdown = choice.node.node_id, choice.score, \
            choice.breakdown
        ex.retries = attempt
        ex.first_expected_s = self._first_expected(ex, choice)
        ex.reset_body()  # a retry must not inherit the last node's rewrites
        if choice.model != ex.model:
            ex.use_model(choice.model, names.get(choice.model, choice.model))
        ex.node_model = node_name(choice.node, choice.model, ex.name_sent)
        self.scheduler.protect_context(ex, choice, ask.requested_ctx)
        self._pin(ex, choice)
        if not choice.hot:
            c = choice.candidate
            self.fleet.residency.start_load(choice.node, choice.model,
                                            c.evicts if c else (),
                                            c.load_estimate_s if c else 0.0)
        q = self.fleet.queue(choice.node, choice.model)
        if ex.kind not in hc.MEDIA_KINDS:  # an image tool has no runner-up to warm
            self.warmer.consider(choice, q, names.get(choice.model, name))
        return q

    def _pin(self, ex, choice):
        """A request for a model the placement plan places on its node keeps it there:
        it carries a keep_alive longer than the node's own default, unless the client
        set one. Ollama evicts the idle runner with the shortest keep_alive first, so a
        load the router did not cause (another app, Ollama's own expiry of a quiet
        model) takes an unplanned model first. Only Ollama's routes take keep_alive."""
        if ex.endpoint not in PINNED_ENDPOINTS or "keep_alive" in ex.fields or \
                choice.node.node_id not in self.scheduler.placement.places(choice.model):
            return
        ex.body = with_field(ex.body, "keep_alive", pin_keep_alive(choice.node))

    def _first_expected(self, ex, choice):
        """Seconds from a slot to the first token, as forecast (0: unknown): a load and
        the usual prompt evaluation, and this prompt's own length (about four bytes a
        token) at the learned prompt speed, so that a long prompt is not taken for a
        slowdown."""
        c = choice.candidate
        if c is None or not c.service_s:
            return 0.0  # nothing forecast
        speed = self.learner.get(choice.node.node_id, choice.model)
        prompt_tps = speed.prompt_tps if speed is not None else None
        prompt_s = len(ex.body or b"") / 4 / prompt_tps if prompt_tps else 0.0
        return max(FIRST_FLOOR_S, c.first_s + prompt_s)

    async def _attempt_on(self, conn, ex, choice, q, ask):
        """Wait for a slot in `q`, then send the request to the chosen node and relay
        its answer. Raises Moved when handed back before it had a slot, AttemptFailed
        when the node failed before the first chunk (another node may then answer)."""
        t_queue = time.monotonic()
        try:
            ticket = await q.acquire(choice.candidate.tokens if choice.candidate else 0.0)
        except Moved:
            ex.queue_wait = (ex.queue_wait or 0.0) + time.monotonic() - t_queue
            if not choice.hot:
                self.fleet.residency.finish_load(choice.node, choice.model, False)  # never sent
            raise
        ticket.exchange, ex.flight = ex, q.flight
        failed = False
        try:
            # Every queue it waited in counts, the ones it was moved out of too: a
            # request rebalanced after 20 s behind the laptop said it had waited none.
            ex.queue_wait = (ex.queue_wait or 0.0) + time.monotonic() - t_queue
            ex.touch()
            self._count_evictions(ex, choice)
            await self._make_room(ex, choice)
            late = self._late_after(ex, choice)
            if late is None:
                await self.node_relay.attempt(conn, ex, choice)
            else:
                await self._attempt_watched(conn, ex, choice, ask, late)
        except AttemptFailed:
            failed = True
            raise
        finally:
            crowd = ex.decode_crowd()
            level = q.release(ticket)
            if not choice.hot:  # a first chunk means Ollama had loaded it
                self.fleet.residency.finish_load(choice.node, choice.model, ex.started)
            if not failed:
                self._learn(ex, choice, level, crowd)

    def _late_after(self, ex, choice):
        """Seconds after which a streamed answer on a hot model with no first token yet
        is late enough to be moved (LATE_FIRST times its forecast, MOVE_LATE_MIN_S at
        least), or None when it is not watched: nothing forecast, no other node, or a
        first byte that would be the last."""
        if not self.cfg.learning or not ex.stream or not ex.first_expected_s or \
                not choice.hot or choice.runner_up is None or ex.kind != hc.CHAT or \
                ex.upload is not None:
            return None
        return max(MOVE_LATE_MIN_S, LATE_FIRST * ex.first_expected_s)

    async def _attempt_watched(self, conn, ex, choice, ask, late):
        """The attempt, given up on if its first token is `late` (and again each second
        after) and another node is then expected to answer the whole request sooner
        than this one can: nothing has reached the client, so another node may start it
        afresh (the node learns it is slow, by how late it is)."""
        attempt = asyncio.ensure_future(self.node_relay.attempt(conn, ex, choice))
        started, wait = time.monotonic(), late
        try:
            while not (await asyncio.wait((attempt,), timeout=wait))[0]:
                if conn.response_started:
                    break  # its first chunk is on its way to the client: it stays
                waited, wait = time.monotonic() - started, 1.0
                if not self._sooner_elsewhere(ex, choice, ask, waited):
                    continue
                await stop_task(attempt)
                factor = ex.first_expected_s / waited
                # A first token this late is mostly a wait (a slot, a load), seldom a
                # machine that slowed that much: the next answer times its decoding.
                self.learner.slowed(choice.node.node_id, choice.model,
                                    max(factor, LATE_CUT_MIN))
                raise AttemptFailed(f"node {choice.node.node_id}: no first token after "
                                    f"{waited:.1f}s ({1 / factor:.0f} times its forecast); "
                                    f"another node is expected to answer sooner", 504)
            await attempt
        finally:
            if not attempt.done():  # this request was cancelled (client gone, reaper)
                await stop_task(attempt)

    def _sooner_elsewhere(self, ex, choice, ask, waited):
        """Is another node expected to answer the whole request sooner than this node,
        slowed by how late its first token is, can finish it? Only a node where the
        model is hot (or loading), or where the placement plan places it: a late answer
        never causes a cold load the plan does not want (a load that stalls one node's
        hot requests would otherwise spread cold loads over the others)."""
        c = choice.candidate
        slow = waited / ex.first_expected_s
        left_here = c.service_s * slow - waited
        ranked, _ = self.scheduler.rank(choice.model, ask, exclude=(choice.node.node_id,))
        places = self.scheduler.placement.places(choice.model)
        return any(0 < hc.expected_s(other) < left_here for _, _, other in ranked
                   if other.hot or other.loading_s or other.node_id in places)

    async def _make_room(self, ex, choice):
        """Before a cold load, unload (keep_alive 0) the models the router chose to push
        out, so that Ollama's own rule never picks another: it evicts the idle runner
        with the shortest keep_alive, then by file name (sched.go, ByDurationAndName),
        which knows nothing of the plan. A busy one goes when its requests end, and the
        load waits for it there as it would have. A failed unload only leaves the choice
        to Ollama."""
        victims = choice.candidate.evicts if choice.candidate and not choice.hot and \
            choice.node.loads_models else ()
        for victim in victims:
            try:
                await send_control(choice.node, victim, True, UNLOAD_TIMEOUT_S)
            except hc.UpstreamError as e:
                proxy_log.info(f"unloading {victim} before a load failed: {e}", extra={
                    "request_id": ex.request_id, "node_id": choice.node.node_id})

    def _count_evictions(self, ex, choice):
        """A cold load the router sends pushes these models out: count each."""
        for victim in choice.candidate.evicts if choice.candidate else ():
            self.stats.count_event("eviction", f"loading {choice.model} on "
                                               f"{choice.node.node_id} evicts {victim}", ex)

    def _learn(self, ex, choice, level, crowd=None):
        if ex.outcome() != hc.COMPLETED or ex.kind in hc.MEDIA_KINDS:
            return  # a picture or a transcript has no tokens to learn a speed from
        self.scheduler.sessions.remember(ex.session_key, choice.node.node_id)
        if not self.cfg.learning:
            return
        c = choice.candidate
        # Sent while a load was under way, it waited for part of it: neither a hot
        # request's timing nor a whole load's.
        hot = None if c and c.loading_s else choice.hot
        speed = self.learner.observe(choice.node.node_id, choice.model, ex, hot,
                                     c.model_size if c else 0, level, crowd)
        slots = self.fleet.slots_for(choice.node)
        self.fleet.set_concurrency(choice.node, choice.model, speed.settle_concurrency(slots))

    # -- requests that are not routed: unloads, pulls onto a chosen node ---------------

    async def unload(self, ex, body):
        """keep_alive 0 with nothing to generate: every node holding the model unloads
        it (Ollama answers done_reason "unload"); answered like Ollama."""
        holders = [n for n in self.fleet.online_nodes() if ex.model in n.loaded and
                   n.loads_models]
        if not holders:  # Ollama answers it (done_reason "unload"); nothing to pull for it
            ex.stream = False  # one small answer, whatever the client asked
            return await self.serve(ex, body, may_pull=False)
        ex.body = strip_routing_fields(ex.request, body)
        ex.node_id = ",".join(n.node_id for n in holders)
        results = await asyncio.gather(*(self._unload_on(n, ex, body) for n in holders),
                                       return_exceptions=True)
        answers = []  # (status, headers, body) of each node that answered
        for node, result in zip(holders, results):
            if isinstance(result, BaseException):
                continue  # it could not be asked: said below if none answered
            answers.append(result)
            if result[0] == 200:
                self.fleet.residency.mark_unloaded(node, ex.model)
        if any(status == 200 for status, _, _ in answers):
            self.scheduler.placement.unloaded(ex.model)
        await self._answer_unload(ex, answers)

    @staticmethod
    async def _unload_on(node, ex, body):
        """(status, headers, body) of one node's unload: Ollama's own answer, or
        another server's (its own API) said as Ollama's."""
        if node.speaks_ollama:
            return await hc.http_call(node.ollama_url, "POST", ex.endpoint, ex.body,
                                      timeout=30)
        status = await send_other_control(node, ex.model, True, 30)
        if status != 200:
            return status, [], hc.ollama_error_body(
                f"node {node.node_id}: the {node.hb.server_kind} server answered the "
                f"unload with {status}")
        said = {"model": body.get("model"), "created_at": hc.now_rfc3339()}
        said.update({"message": {"role": "assistant", "content": ""}}
                    if ex.endpoint == "/api/chat" else {"response": ""})
        return 200, [], hc.dump_json({**said, "done": True, "done_reason": "unload"})

    @staticmethod
    async def _answer_unload(ex, answers):
        """A node's 200 if any unloaded it; else a node's own answer, as it gave it (an
        embedding model's unload through /api/generate is Ollama's 400 `"<model>" does
        not support generate`); 502 only when no node answered at all."""
        done = [a for a in answers if a[0] == 200]
        if not done and not answers:
            raise RouteError(502, f"unload of '{ex.model}' failed on {ex.node_id}")
        status, headers, body = (done or answers)[0]
        await ex.reply(status, body, content_type(headers) or hc.JSON_TYPE,
                       [(b"x-fleet-node", ex.node_id.encode())])

    async def forward(self, ex, node, body, before_end=None):
        """Relay one request to a node the client chose (a pull, a push, a create), as
        it answers: a 5xx of Ollama's too (there is no other node to try). `ex` has
        the model and stream asked for."""
        ex.body = body
        ex.node_id, ex.before_end, ex.chosen = node.node_id, before_end, True
        ex.conn.watch_client()
        try:
            await self.node_relay.attempt(ex.conn, ex, Choice(node, ex.model))
        except AttemptFailed as e:
            raise RouteError(502, str(e)) from None


class NodeRelay:
    """One attempt: the request sent to one node, its answer relayed to the client."""

    def __init__(self, cfg, pool):
        self.cfg, self.pool = cfg, pool
        self.media = MediaRoute(cfg)

    async def attempt(self, conn, ex, choice):
        """Send the request to the chosen node and relay its answer to the client."""
        up = None
        try:
            tr = self._translation(ex, choice)
            if tr is not None and tr.local is not None:
                return await self._answer_here(ex, choice, tr.local)
            up, status, headers = await self._send_upstream(ex, choice, tr)
            ex.http_status = status
            length = content_length(headers)
            renaming = Renaming(ex.node_model, ex.name_sent) \
                if ex.node_model is not None and tr is None else None
            if tr is not None:
                await self._relay_translated(conn, ex, choice, up, status, headers, tr)
            elif ex.endpoint in AGENT_PATHS:
                await self.media.relay_translated(conn, ex, choice, up, status)
            elif length is not None and length <= NON_STREAM_BUFFER:
                await self._relay_whole(conn, ex, choice, up, status, headers, renaming)
            elif renaming is not None:
                renaming.sep = b"\n\n" if b"event-stream" in (content_type(headers) or b"") \
                    else b"\n"
                await self._relay_stream(conn, ex, choice, up, status, headers, TranslatedRelay(
                    up, conn, self.cfg.chunk_timeout, renaming))
            else:
                await self._relay_stream(conn, ex, choice, up, status, headers)
        except hc.UpstreamError as e:
            if conn.response_started:
                raise
            if ex.upload is not None:
                ex.upload.check_replayable(choice.node.node_id, e)
            raise AttemptFailed(f"node {choice.node.node_id}: {e}",
                                504 if e.phase == "timeout" else 502) from None
        finally:
            if up is not None:
                self.pool.release(up) if ex.answered else up.close()

    @staticmethod
    def _translation(ex, choice):
        """The Translation of an Ollama request to a node whose server speaks only
        OpenAI's API, else None; AttemptFailed when that server cannot take it."""
        node = choice.node
        if node.speaks_ollama or ex.endpoint not in OLLAMA_OVER_OPENAI:
            return None
        # The client's fields, naming the model served as the body does (a fallback):
        # the rest of what the router may rewrite (num_ctx, keep_alive) no such server
        # takes, so the body need not be parsed again.
        fields = {**ex.fields, "model": ex.name_sent}
        tr = Translation(ex.endpoint, fields, node.own_name(choice.model),
                         node.hb.server_kind, ex.stream)
        try:
            tr.local = tr.local_answer()
            if tr.local is None:
                tr.path, tr.body = tr.request()
            elif tr.local.get("done_reason") == "unload":
                raise Untranslatable(f"the {tr.kind} server cannot unload a model")
        except Untranslatable as e:
            raise AttemptFailed(f"node {node.node_id}: {e}", 400) from None
        return tr

    def _target(self, ex, choice, tr=None):
        """(host, port, path, body, headers) of one attempt: the node's server for text
        and embeddings (in OpenAI's terms when `tr`, and by the server's own name for
        the model); an image or speech request goes where MediaRoute.target says."""
        node = choice.node
        if ex.kind in hc.MEDIA_KINDS:
            return self.media.target(ex, choice)
        headers, body = forward_headers(ex.request), ex.body
        if not node.speaks_ollama:
            # A server of OpenAI's API reads the body as JSON only when told (FastAPI's
            # servers refuse it otherwise; curl -d says it is a form).
            headers = [(k, v) for k, v in headers if k != b"content-type"]
            headers.append((b"content-type", hc.JSON_TYPE))
        if tr is not None:
            return node.host, node.port, tr.path, tr.body, headers
        if ex.node_model is not None:
            body = hc.dump_json({**json.loads(body), "model": ex.node_model})
        return node.host, node.port, ex.request.target, body, headers

    async def _send_upstream(self, ex, choice, tr=None):
        """Send the request and wait for the response head, on a kept-alive connection
        when there is one; a kept-alive connection the node has closed meanwhile is
        replaced by a fresh one, once (that is no failure of the node)."""
        cfg = self.cfg
        host, port, path, body, headers = self._target(ex, choice, tr)
        wait = self.media.tool_wait(ex, choice)
        if wait is None:
            wait = cfg.first_byte_timeout
        else:  # the reaper gives the tool as long
            ex.stale_after = max(cfg.stale_timeout, wait)
        if ex.upload is not None:
            return await self.media.send_upload(ex, host, port, path, headers, wait)
        up = await self.pool.connect(host, port, cfg.connect_timeout)
        for fresh in (False, True):
            try:
                await up.send_request(ex.request.method.encode(), path.encode(), headers,
                                      body)
                status, headers_in = await up.receive_head(wait)
                return up, status, headers_in
            except hc.UpstreamError as e:
                up.close()
                if fresh or not (up.reused and e.closed):
                    raise
                up = await hc.Upstream.connect(host, port, cfg.connect_timeout)
            except BaseException:
                up.close()
                raise

    async def _relay_whole(self, conn, ex, choice, up, status, headers, renaming=None):
        """A response with Content-Length: read it whole, so a cut-off body is a clean
        502 and a node's 5xx (but Ollama's 'busy', for the client to retry) is retried.
        `renaming`: the model's name in it is said as the client asked."""
        body = await up.read_body(self.cfg.chunk_timeout)
        if renaming is not None:
            body = renaming.rename(body)
        if status >= 500 and not is_busy(status, body) and not ex.chosen:
            raise node_failure(ex, status, body)
        ex.ttft = time.monotonic() - ex.t0
        if ex.before_end and status < 400:
            await ex.before_end()
        await ex.reply(status, body, None, response_headers(headers, ex, choice))
        ex.started = True
        if status < 400:
            ex.read_usage(body)

    async def _answer_here(self, ex, choice, answer):
        """Answer for the node, with nothing asked of it (Translation.local_answer)."""
        ex.ttft = time.monotonic() - ex.t0
        await ex.reply(200, hc.dump_json(answer), hc.JSON_TYPE,
                       response_headers([], ex, choice))
        ex.started = True

    async def _relay_translated(self, conn, ex, choice, up, status, headers, tr):
        """A server of OpenAI's API answering an Ollama request: its SSE stream as
        NDJSON, or its whole answer (or error) as Ollama's; a 5xx is retried."""
        if status < 400 and b"text/event-stream" in (content_type(headers) or b""):
            relay = TranslatedRelay(up, conn, self.cfg.chunk_timeout, tr)
            return await self._relay_stream(conn, ex, choice, up, status, headers, relay,
                                            NDJSON_TYPE)
        body = await up.read_body(self.cfg.chunk_timeout, NON_STREAM_BUFFER)
        if status >= 500 and not is_busy(status, body) and not ex.chosen:
            raise node_failure(ex, status, body)
        status, out = tr.whole(status, body)
        ex.ttft = time.monotonic() - ex.t0
        await ex.reply(status, out, hc.JSON_TYPE, response_headers([], ex, choice))
        ex.started = True
        if status < 400:
            ex.read_usage(out)

    async def _relay_stream(self, conn, ex, choice, up, status, headers, relay=None,
                            ctype=None):
        """Chunk by chunk; the head goes out with the first chunk, so a node that fails
        before it can still be replaced by another. `relay`: one that says the answer
        otherwise (TranslatedRelay), in `ctype` when that is another type."""
        relay = ex.relay = relay or hc.Relay(up, conn, self.cfg.chunk_timeout)
        first = await relay.first(headers)
        ex.touch()
        ex.ttft = time.monotonic() - ex.t0
        ex.read_stream_head(first)
        if ctype is not None:
            headers = [(k, v) for k, v in headers if k != b"content-type"]
            headers.append((b"content-type", ctype))
        await conn.start_response(status, None, response_headers(headers, ex, choice),
                                  first_chunks=first)
        ex.started = True
        try:
            await relay.rest()
        except hc.UpstreamError as e:
            ex.error = str(e)
            return await end_with_error(conn, ex,
                                        f"node {choice.node.node_id} failed mid-stream: {e}")
        except (asyncio.CancelledError, ConnectionError):
            # A client may close as soon as it has the last event (the openai client
            # does, straight after [DONE]), before the node's end of body is relayed:
            # its answer reached it whole all the same.
            ex.answered = conn.client_gone and ex.read_stream_end(relay)
            raise
        await self._end_stream(conn, ex, relay, status)

    async def _end_stream(self, conn, ex, relay, status):
        """The node's answer is all relayed: read its end, let a good one's before_end
        run (a failed pull has no new model to list), and end the client's body."""
        ended = ex.read_stream_end(relay)
        try:
            if ex.before_end and status < 400 and not ex.answer_failed:
                await ex.before_end()
            await conn.end_response()
        except (asyncio.CancelledError, ConnectionError):
            ex.answered = conn.client_gone and ended  # as in _relay_stream
            raise
        ex.answered = True


MEDIA_GRACE_S = 30.0  # past the agent's own time-out, for its answer to say so
MAX_MEDIA_ANSWER = 64 << 20  # a picture or a transcript, read whole to translate it
FORM_HEAD_MAX = 1 << 20  # of a speech upload, the fields before its file
FORM_FIELD_MAX = 4096  # one such field (model, language, response_format, prompt)
FORM_FIELDS_MAX = 64  # the plain fields read before the file, or before the model
SPOOL_READ = 1 << 20  # a spooled upload goes on to the node in pieces this large
# Spooled uploads (a file before its model) may wait on disk, in FLEET_MAX_UPLOAD_MB:
SPOOLS_PER_CLIENT = 2  # from one client address at once
SPOOLS_IN_ALL = 8  # from every client together
IMAGE_SIZE_MAX, IMAGE_STEPS_MAX = 4096, 200


class MediaRoute:
    """How an image or speech request goes to a node and comes back: to the node's
    agent for a model it serves itself, else to its Ollama; a speech upload streamed on
    as it arrives; the product's own routes answered in the product's shape."""

    def __init__(self, cfg):
        self.cfg = cfg

    def target(self, ex, choice):
        """(host, port, path, body, headers) of one attempt: the node's agent for an
        image or speech model it serves itself (signed with the fleet token, so that
        only the router can use it), else the node's Ollama; the product's own image
        route is translated for either (Ollama's /api/generate, OpenAI's images API)."""
        node, headers = choice.node, forward_headers(ex.request)
        if node.serves_itself(choice.model, ex.kind):
            path = AGENT_PATHS.get(ex.endpoint, ex.request.target)
            body = openai_image_body(ex.fields) if ex.endpoint == "/api/generate-image" \
                else ex.body
            if self.cfg.token:  # a streamed upload is signed without its body
                headers += hc.sign_request(self.cfg.token, "POST", path,
                                           b"" if ex.upload is not None else body)
            return node.media_host, node.media_port, path, body, headers
        if ex.endpoint == "/api/generate-image":
            return node.host, node.port, "/api/generate", ollama_image_body(ex.fields), \
                headers
        return node.host, node.port, ex.request.target, ex.body, headers

    def tool_wait(self, ex, choice):
        """For a tool the agent runs, how long it may take to start answering (None
        for anything else): the agent's own time-out for it (its answer comes only when
        the picture or transcript is done) and a little more, so that the agent, which
        kills the tool, is the one to say it took too long; FLEET_FIRST_BYTE_TIMEOUT at
        least."""
        media = choice.node.hb.media
        if media is None or not choice.node.serves_itself(choice.model, ex.kind):
            return None
        return max(self.cfg.first_byte_timeout, media["timeout"] + MEDIA_GRACE_S)

    async def send_upload(self, ex, host, port, path, headers, first_byte_timeout):
        """Stream a speech upload to the node as it arrives, then wait for its answer."""
        cfg = self.cfg
        up = await hc.Upstream.connect(host, port, cfg.connect_timeout)
        try:
            up.send_head(b"POST", path.encode(), headers, ex.upload.length)
            await ex.upload.send_to(up, cfg.chunk_timeout, ex)
            status, headers_in = await up.receive_head(first_byte_timeout)
            return up, status, headers_in
        except BaseException:
            up.close()
            raise

    async def relay_translated(self, conn, ex, choice, up, status):
        """The product's own image and speech routes: the node's whole answer, said in
        the product's shape (a node's 5xx is retried, as for any route)."""
        body = await up.read_body(self.cfg.chunk_timeout, MAX_MEDIA_ANSWER)
        if status >= 500 and not ex.chosen:
            raise node_failure(ex, status, body)
        if status < 400:
            try:
                out, ctype = translate_answer(ex, choice.model, body)
            except ValueError as e:
                raise hc.UpstreamError("body", f"answered without {e}") from None
        else:
            out, ctype = hc.ollama_error_body(error_text(body)), hc.JSON_TYPE
        ex.ttft = time.monotonic() - ex.t0
        await ex.reply(status, out, ctype, response_headers([], ex, choice))
        ex.started = True


def read_image_settings(body):
    """The product's image request (model, prompt, width, height, steps, seed,
    negative_prompt, response_format png or b64_json), checked; ValueError if not."""
    f = hc.Fields(body)
    out = {"prompt": f.text("prompt", 1 << 16)}
    if not out["prompt"].strip():
        raise ValueError("prompt is required")
    for key, high in (("width", IMAGE_SIZE_MAX), ("height", IMAGE_SIZE_MAX),
                      ("steps", IMAGE_STEPS_MAX), ("seed", (1 << 32) - 1)):
        if body.get(key) is not None:
            out[key] = f.integer(key, high)
    if body.get("negative_prompt") is not None:
        out["negative_prompt"] = f.text("negative_prompt", 1 << 16)
    f.choice("response_format", ("png", "b64_json"), "png")
    return out


def ollama_image_body(fields):
    """/api/generate-image as Ollama's /api/generate asks it of an image model."""
    return hc.dump_json({"model": fields["model"], "stream": False,
                         **read_image_settings(fields)})


def openai_image_body(fields):
    """/api/generate-image as OpenAI's images API asks it of an agent (steps and seed
    ride along: the agent's tools take them)."""
    settings = read_image_settings(fields)
    out = {"model": fields["model"], "prompt": settings.pop("prompt"), "n": 1,
           "response_format": "b64_json"}
    width, height = settings.pop("width", None), settings.pop("height", None)
    if width or height:
        out["size"] = f"{width or height}x{height or width}"
    return hc.dump_json({**out, **settings})


def translate_answer(ex, model, body):
    """(body, content type) of the product's answer from a node's: a picture as PNG
    bytes or base64 JSON; a transcript as {"model", "text", ...}. ValueError when the
    node's answer lacks what is needed."""
    if ex.endpoint == "/api/transcribe":
        try:
            got = json.loads(body)
        except ValueError:
            got = {"text": body.decode("utf-8", "replace").strip()}
        if not isinstance(got, dict) or not isinstance(got.get("text"), str):
            raise ValueError("a transcript")
        keep = {k: got[k] for k in ("language", "duration", "segments") if k in got}
        return hc.dump_json({"model": ex.fields.get("model"), "text": got["text"],
                             **keep}), hc.JSON_TYPE
    try:
        got = json.loads(body)
        image = got.get("image") or got["data"][0]["b64_json"]
        png = base64.b64decode(image, validate=True)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise ValueError("an image") from None
    if ex.fields.get("response_format") == "b64_json":
        return hc.dump_json({"model": ex.fields.get("model"), "created_at": hc.now_rfc3339(),
                             "image": image, "done": True}), hc.JSON_TYPE
    return png, b"image/png"


def error_text(body):
    """A node's error answer as one line (Ollama's, OpenAI's or plain text)."""
    try:
        got = json.loads(body)
        error = got.get("error", got.get("detail", got))
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = body.decode("utf-8", "replace")
    return hc.printable(str(message))[:500]


class SpoolFull(Exception):
    """A spooled upload would pass what its client, or all clients, may have waiting."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class SpoolBudget:
    """Bytes of spooled uploads on disk, per client address and in all, each bounded:
    without a bound, a client that sends files before their model (64 connections of
    FLEET_MAX_UPLOAD_MB) could fill the temporary folder."""

    def __init__(self, max_upload):
        self.per_client, self.in_all = SPOOLS_PER_CLIENT * max_upload, \
            SPOOLS_IN_ALL * max_upload
        self.held = collections.Counter()  # client address -> bytes spooled
        self.total = 0

    def take(self, client, size):
        """Count `size` more bytes of `client`'s; SpoolFull when past a bound."""
        advice = "send the model field before the file: then nothing waits on disk"
        if self.held[client] + size > self.per_client:
            raise SpoolFull(413, f"{client} already has uploads waiting on disk for their "
                                 f"model field, {self.per_client >> 20} MB at most "
                                 f"({SPOOLS_PER_CLIENT} x the upload limit); {advice}")
        if self.total + size > self.in_all:
            raise SpoolFull(503, f"the router has {self.in_all >> 20} MB of uploads "
                                 f"waiting on disk for their model field ({SPOOLS_IN_ALL} x "
                                 f"the upload limit), its most; try again shortly, or "
                                 f"{advice}")
        self.held[client] += size
        self.total += size

    def give_back(self, client, size):
        self.total -= size
        self.held[client] -= size
        if self.held[client] <= 0:
            del self.held[client]


class Upload:
    """A speech file in a multipart form, streamed from the client to a node. The form
    is read until the fields that name the model have arrived: fields before the file
    are held in memory (FORM_HEAD_MAX at most); a file that comes before the model is
    spooled to a temporary file until the model has come: herd-upload-* in the
    temporary folder (TMPDIR), deleted when the request ends, within `budget` (a
    SpoolBudget). Then the rest passes on as it arrives. What has passed is kept, the
    spool and up to FLEET_MEDIA_REPLAY_MB more in memory, so that a node that fails
    before answering can be replaced by another; past that it is let go. Leaving the
    `with` block closes the spool and gives its bytes back to the budget."""

    def __init__(self, request, conn, replay_limit, budget):
        self.stream, self.conn, self.replay_limit = request.stream, conn, replay_limit
        self.length = hc.forwarded_length(request)
        self.pieces, self.held, self.replayable = [], 0, True  # held: bytes in pieces
        self.spool = None  # the form up to its model, when its file came first
        self.budget, self.spooled = budget, 0  # bytes in the spool, counted in budget

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.spool is not None:
            self.spool.close()
        self.budget.give_back(self.conn.client_ip, self.spooled)

    async def read_fields(self, content_type):
        """The form's plain fields up to its file, or up to its model when the file
        comes first (model, language, ...); ValueError for a form that is not one, or
        whose fields are more than FORM_FIELDS_MAX or run past FORM_HEAD_MAX."""
        reader, fields, current = hc.FormReader(hc.form_boundary(content_type)), {}, None
        while data := await self._receive():
            for event, value in reader.feed(data):
                if event == "part" and value.filename is not None:
                    if "model" in fields:
                        return fields
                    current = None
                    await self._start_spool()
                elif event == "part":
                    current = value.name
                    fields[current] = b""
                    if len(fields) > FORM_FIELDS_MAX:
                        raise ValueError(f"the form has more than {FORM_FIELDS_MAX} fields")
                elif event == "data" and current is not None:
                    fields[current] = (fields[current] + value)[:FORM_FIELD_MAX]
                elif event == "end" and current == "model" and self.spool is not None:
                    return fields  # the file came first: the model was what was missing
                elif event == "done":
                    return fields
            if self.held > FORM_HEAD_MAX:
                raise ValueError(f"the form's fields before its file are larger than "
                                 f"{FORM_HEAD_MAX} bytes")
        return fields

    async def _receive(self):
        data = await self.stream.receive(self.conn.read_timeout)
        if self.spool is not None:
            await self._write_spool([data])
        else:
            self.pieces.append(data)  # the form's head always goes on to the node
            self.held += len(data)
        return data

    async def _start_spool(self):
        """A file before the model: what has come, and what comes until the model
        does, goes to a temporary file rather than memory."""
        if self.spool is None:
            try:
                self.spool = tempfile.NamedTemporaryFile(prefix="herd-upload-")
            except OSError as e:
                raise self._no_room(e) from None
            await self._write_spool(self.pieces)
            self.pieces, self.held = [], 0

    async def _write_spool(self, pieces):
        size = sum(map(len, pieces))
        self.budget.take(self.conn.client_ip, size)
        self.spooled += size
        try:
            await asyncio.to_thread(self.spool.writelines, pieces)
        except OSError as e:  # a full or read-only temporary folder
            raise self._no_room(e) from None

    def _no_room(self, error):
        return SpoolFull(503, f"the router cannot keep the upload in "
                              f"{tempfile.gettempdir()} until its model field comes "
                              f"({error.strerror or error}); send the model field first")

    def too_large(self):
        return f"upload larger than the router's limit ({self.stream.limit} bytes)"

    def check_replayable(self, node_id, error):
        """RouteError when a node failed after more than FLEET_MEDIA_REPLAY_MB had
        passed: nothing is left to send another node."""
        if not self.replayable:
            raise RouteError(504 if error.phase == "timeout" else 502,
                             f"node {node_id}: {error} (the upload went past what the "
                             f"router keeps of it, so it cannot be sent to another node)")

    async def send_to(self, up, timeout, ex):
        """Send the whole upload to `up`: what was kept, then the rest as it arrives."""
        await self._replay(up, timeout)
        try:
            while data := await self.stream.receive(self.conn.read_timeout):
                self._keep(data)
                await up.send_body(data, timeout)
                ex.touch()
        except hc.BodyTooLarge:
            raise RouteError(413, self.too_large()) from None
        except TimeoutError:
            raise RouteError(408, f"the client sent nothing for {self.conn.read_timeout:g}s "
                                  f"of its upload") from None
        except ConnectionError as e:
            if self.conn.client_gone:
                raise
            raise RouteError(400, str(e)) from None
        up.end_body()

    async def _replay(self, up, timeout):
        """What was kept: the spool from its start, then the pieces held in memory."""
        if self.spool is not None:
            await asyncio.to_thread(self.spool.seek, 0)
            while data := await asyncio.to_thread(self.spool.read, SPOOL_READ):
                await up.send_body(data, timeout)
        for data in self.pieces:
            await up.send_body(data, timeout)
        if self.held > self.replay_limit:
            self.replayable, self.pieces = False, []

    def _keep(self, data):
        """Hold a piece for a retry while what is held stays within the replay limit."""
        if self.replayable:
            self.held += len(data)
            if self.held > self.replay_limit:
                self.replayable, self.pieces = False, []
            else:
                self.pieces.append(data)


def strip_routing_fields(request, body):
    """The body to forward: the client's own bytes unless routing fields must go
    (fallback_models, and the tags in metadata)."""
    metadata = body.get("metadata")
    has_tags = isinstance(metadata, dict) and "tags" in metadata
    if not has_tags and not any(k in body for k in ROUTING_FIELDS):
        return request.body
    out = {k: v for k, v in body.items() if k not in ROUTING_FIELDS}
    if has_tags:
        rest = {k: v for k, v in metadata.items() if k != "tags"}
        if rest:
            out["metadata"] = rest  # OpenAI's own metadata stays
        else:
            del out["metadata"]
    return hc.dump_json(out)


MAX_TAGS, MAX_TAG_LEN = 16, 64


def request_tags(request, body):
    """An app's tags, from X-Herd-Tags: a,b or "metadata": {"tags": [...]}: at most 16
    of at most 64 printable characters each (more are left out), as trace rows keep them."""
    tags = []
    header = request.header("x-herd-tags")
    if header:
        tags += header.split(",")
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("tags"), list):
        tags += [t for t in metadata["tags"] if isinstance(t, str)]
    kept = {t.strip() for t in tags[:4 * MAX_TAGS] if len(t.strip()) <= MAX_TAG_LEN
            and not hc.CONTROL_CHARS.search(t) and "," not in t and encodable(t)}
    kept.discard("")
    return ",".join(sorted(kept)[:MAX_TAGS]) or None


CLIENT_ONLY_HEADERS = (b"x-herd-tags", b"x-herd-session", b"x-herd-node", b"authorization",
                       b"x-api-key", b"cookie", b"origin")


def encodable(text):
    """False for text with lone surrogates (JSON's "\\ud800"), which UTF-8 cannot hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def forward_headers(request):
    """The client's headers minus hop-by-hop ones (and Host, which a loopback-bound
    Ollama checks against its own names), minus X-Herd-Tags, which is ours, minus the
    client's credentials, which are for the router and no node should see, and minus
    Origin: the router has judged it (Cors), and a node's own OLLAMA_ORIGINS must not
    refuse what the router's FLEET_ORIGINS allows."""
    return hc.end_to_end_headers(request.headers, CLIENT_ONLY_HEADERS)


def node_name(node, model, name_sent):
    """What the body must call `model` for `node`'s server when the name it gives it
    (`name_sent`) will not do, else None: an alias (FLEET_MODEL_ALIASES) the node knows
    by another name; for a server of OpenAI's API, which matches ids exactly, any
    other spelling of its id."""
    own = node.own_name(model)
    if not isinstance(name_sent, str) or name_sent == own:
        return None
    if node.speaks_ollama and hc.canonical_model(name_sent) == hc.canonical_model(own):
        return None  # Ollama looks a name up as canonical_model does
    return own


def response_headers(upstream_headers, ex, choice):
    headers = hc.end_to_end_headers(upstream_headers, (b"server", b"date"))
    headers += [
        (b"x-fleet-node", choice.node.node_id.encode()),
        (b"x-fleet-served-model", ex.served_model.encode()),
        (b"x-fleet-requested-model", ex.asked.encode()),
        (b"x-fleet-retries", b"%d" % ex.retries),
        (b"x-fleet-score", f"{choice.score:.1f}".encode()),
    ]
    if ex.served_model != ex.model:
        headers.append((b"x-fleet-fallback", ex.served_model.encode()))
    return headers


def content_type(headers):
    """A node's Content-Type, or None when it sent none."""
    return next((v for k, v in headers if k == b"content-type"), None)


def content_length(headers):
    for k, v in headers:
        if k == b"content-length":
            return int(v)
    return None


def is_busy(status, body):
    """Ollama's own 503 when its queue is full (OLLAMA_MAX_QUEUE): the client retries."""
    return status == 503 and b"server busy" in body


def node_failure(ex, status, body):
    """The UpstreamError for a node's 5xx. On an image or speech route a 504 is the
    agent saying that its tool or server took longer than FLEET_NODE_MEDIA_TIMEOUT:
    a time-out ("timed out" is what the traces' time-out counts look for)."""
    if status == 504 and ex.kind in hc.MEDIA_KINDS:
        return hc.UpstreamError("timeout", f"timed out (504): {error_text(body)}")
    return hc.UpstreamError("status", f"answered {status}: "
                                      f"{body[:300].decode('utf-8', 'replace')}")


# How a stream's last event says that the answer is whole, by API: Ollama's final chunk
# (done: true; a pull's, push's or create's last line is {"status": "success"}),
# OpenAI's [DONE], Anthropic's message_stop, the Responses API's response.completed. And
# that it broke off: Ollama's error line, an OpenAI object with an "error" (Ollama stops
# the stream after it), an `error` event (Anthropic, Responses), response.failed. A
# Responses stream's objects carry "error": null all along: the key alone says nothing.
FINAL_TYPES = ("message_stop", "response.completed")
FAILED_TYPES = ("error", "response.failed")


def stream_events(api, data):
    """The events of a stream's (unframed) body, last first: Ollama's NDJSON lines, or
    the `data:` of the other APIs' Server-Sent Events. Only the last lines are split
    off: `data` may be a few hundred KB, and only the last few events matter."""
    lines = data.rsplit(b"\n", 4 * USAGE_EVENTS)
    if len(lines) > 4 * USAGE_EVENTS:
        del lines[0]  # all that came before, perhaps many lines: not looked at
    for line in reversed(lines):
        line = line.strip()
        if api != "ollama":
            if not line.startswith(b"data:"):
                continue  # an SSE event's name, a comment, the blank line between
            line = line[5:].strip()
        if line:
            yield line


def event_object(payload):
    """An event (or a whole answer) as a JSON object; None for [DONE], a line cut off,
    anything not an object."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: a node's absurdly deep JSON
        return None
    return obj if isinstance(obj, dict) else None


def last_members(body):
    """The members of a large answer object after its last list (a batch of embeddings:
    Ollama's counts and timings, OpenAI's usage, come after the vectors) as an object
    of their own, so that only they are parsed on the loop."""
    after = body[body.rfind(b"]") + 1:].lstrip()
    return b"{" + after[1:] if after.startswith(b",") else b""


def counts_in(obj):
    """The counts and timings an answer object carries: at its top (Ollama), in its
    "usage" (OpenAI, Anthropic), or in its message's (Anthropic's message_start) or its
    response's (the Responses API's response.completed)."""
    holders = [obj, obj.get("usage")]
    holders += [inner.get("usage") for inner in (obj.get("message"), obj.get("response"))
                if isinstance(inner, dict)]
    found = {}
    for holder in holders:
        if isinstance(holder, dict):
            found.update(_counts(holder))
    timings = obj.get("timings")
    if isinstance(timings, dict):  # llama-server's, beside its usage: the same counts
        for field, (name, factor) in TIMINGS_KEYS.items():
            value = timings.get(name)
            if type(value) in (int, float) and 0 <= value * factor <= USAGE_MAX:
                found[field] = int(value * factor)
    return found


def _counts(holder):
    found = {}
    for field, names in USAGE_KEYS.items():
        for name in names:
            value = holder.get(name)
            if type(value) is int and 0 <= value <= USAGE_MAX:  # not a bool, a float
                found[field] = value
    return found


def last_events(api, data, end=True):
    """The last USAGE_EVENTS events of a stream's head or tail (unframed), last first,
    as (payload, object): only those naming a count are parsed, and the answer's last
    one if `end`."""
    events = []
    for payload in itertools.islice(stream_events(api, data), USAGE_EVENTS):
        wanted = (end and not events) or any(mark in payload for mark in USAGE_MARKS)
        events.append((payload, event_object(payload) if wanted else None))
    return events


def stream_counts(events):
    """The counts in `events` (last_events'), each from the last event that has it."""
    found = {}
    for _, obj in events:
        for field, value in (counts_in(obj) if obj is not None else {}).items():
            found.setdefault(field, value)
    return found


def final_event(api, events):
    """(whether the last of `events` (last_events') ends an answer, the error it says
    the answer broke off with, or None)."""
    if not events:
        return False, None
    payload, obj = events[0]
    if payload == b"[DONE]" and api != "ollama":
        return True, None
    if obj is None:
        return False, None
    failure = failure_in(obj)
    if failure is not None:
        return True, failure
    if api == "ollama":
        return obj.get("done") is True or obj.get("status") == "success", None
    return obj.get("type") in FINAL_TYPES, None


def failure_in(obj):
    """The message of an event that ends a stream with an error, else None."""
    if obj.get("type") not in FAILED_TYPES and not obj.get("error"):
        return None
    error = obj.get("error")
    if not error and isinstance(obj.get("response"), dict):
        error = obj["response"].get("error")  # response.failed
    error = error or obj
    message = error.get("message") if isinstance(error, dict) else error
    return hc.printable(str(message or "the stream ended with an error"))[:500]


def stream_error(ex, message):
    """The event that tells a streaming client, in its API's framing, that the answer
    broke off: Ollama's error line; an OpenAI chunk with an "error" object (the openai
    client raises on it); Anthropic's `error` event (its client raises on it); a Responses
    `error` event, numbered after the last event relayed, with the "error" object too so
    that the openai client raises rather than yielding it as one more event."""
    if ex.api == "anthropic":
        return b"event: error\ndata: " + hc.anthropic_error_body(502, message) + b"\n\n"
    if ex.api == "responses":
        error = json.loads(hc.openai_error_body(502, message))["error"]
        event = {"type": "error", "code": error["type"], "message": message, "param": None,
                 "sequence_number": next_sequence_number(ex.relay), "error": error}
        return b"event: error\ndata: " + hc.dump_json(event) + b"\n\n"
    if ex.api == "openai":
        return b"data: " + hc.openai_error_body(502, message) + b"\n\n"
    return hc.ollama_error_body(message) + b"\n"


def next_sequence_number(relay):
    """The number after the last event a Responses stream relayed (0 if none did)."""
    tail = hc.unframe_last_chunks(relay.tail, USAGE_CHUNKS) if relay is not None else b""
    for payload in itertools.islice(stream_events("responses", tail), USAGE_EVENTS):
        seen = (event_object(payload) or {}).get("sequence_number")
        if type(seen) is int and 0 <= seen < USAGE_MAX:
            return seen + 1
    return 0


async def end_with_error(conn, ex, message):
    """Tell a streaming client the answer broke off, in its own framing, and end."""
    line = stream_error(ex, message)
    with contextlib.suppress(ConnectionError):
        await conn.send_data(line)
        await conn.end_response()


def with_field(body, name, value):
    """`body`, the bytes of a JSON object without `name`, with `name: value` added as
    its first member (no parse: a large prompt is not read again)."""
    head, brace, rest = body.partition(b"{")
    member = hc.dump_json({name: value})[1:-1]
    return head + brace + member + (b"" if EMPTY_REST.match(rest) else b",") + rest


EMPTY_REST = re.compile(rb"\s*}")


def pin_keep_alive(node):
    """The keep_alive that pins a planned model on `node`: PIN_KEEP_ALIVE_S, or longer
    than the node's own default (OLLAMA_KEEP_ALIVE as its agent read it: a bare number
    is seconds), or -1 (forever) where that default is already forever."""
    default = str(node.hb.settings.get("OLLAMA_KEEP_ALIVE") or "").strip()
    ns = keep_alive_ns(int(default) if re.fullmatch(r"-?[0-9]{1,18}", default) else default)
    if ns == GO_MAX_DURATION:
        return -1
    return max(PIN_KEEP_ALIVE_S, (ns or 0) // 10 ** 9 + 60)


def is_unload(path, body):
    """No prompt (no messages) and a keep_alive that ends the model's stay at once.
    Ollama's own unload is a keep_alive of exactly 0 (routes.go: KeepAlive.Duration ==
    0). One under a second does the same: the request only loads the model, and the
    runner expires as soon as it goes idle (sched.go arms time.AfterFunc(keep_alive)
    then); and Ollama before 0.11.8 dropped a number's fraction (0.5 was 0)."""
    if path not in ("/api/generate", "/api/chat"):
        return False
    empty = not body.get("prompt") if path == "/api/generate" else not body.get("messages")
    ns = keep_alive_ns(body.get("keep_alive"))
    return empty and ns is not None and ns < UNLOAD_BELOW_NS


# keep_alive as Ollama reads it (api/types.go, Duration.UnmarshalJSON): a JSON number is
# seconds, a string Go's time.ParseDuration, and any negative value means "forever".
UNLOAD_BELOW_NS = 1_000_000_000  # see is_unload
GO_MAX_DURATION = (1 << 63) - 1  # nanoseconds: Go's time.Duration is an int64
GO_DURATION_UNITS = {"ns": 1, "us": 1_000, "\u00b5s": 1_000, "\u03bcs": 1_000,
                     "ms": 1_000_000, "s": 10 ** 9, "m": 60 * 10 ** 9, "h": 3600 * 10 ** 9}
GO_DURATION_PART = re.compile(r"([0-9]*)(\.[0-9]*)?([^0-9.]*)")


def keep_alive_ns(value):
    """A keep_alive in nanoseconds as Ollama takes it (GO_MAX_DURATION: forever), or
    None when absent or one Ollama refuses with a 400 of its own."""
    if isinstance(value, str):
        try:
            ns = parse_go_duration(value)
        except ValueError:
            return None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            return GO_MAX_DURATION
        try:
            ns = float(value) * 1e9  # time.Duration(t * float64(time.Second))
        except OverflowError:
            return None  # past float64: Go's JSON decoder refuses it
        # Past int64, Go's conversion is the CPU's: on amd64, MinInt64, which sched.go
        # takes as "expire once idle" (sessionDuration <= 0). Counted as 0.
        ns = 0 if ns >= 2 ** 63 else int(ns)
    else:
        return None
    return GO_MAX_DURATION if ns < 0 else ns


def parse_go_duration(text):
    """Nanoseconds in a Go duration ("1h30m", "-0s", "1.5\u00b5s", "0"), computed as
    time.ParseDuration computes them (a fraction is scaled in float64, then truncated:
    "-0.5ns" is 0); ValueError where Go refuses the text."""
    neg = text[:1] == "-"
    rest = text[1:] if text[:1] in ("-", "+") else text
    if rest == "0":
        return 0
    if not rest:
        raise ValueError(f"invalid duration {text!r}")
    total, pos = 0, 0
    while pos < len(rest):
        whole, frac, unit = GO_DURATION_PART.match(rest, pos).groups()
        if not whole and len(frac or "") < 2 or unit not in GO_DURATION_UNITS:
            raise ValueError(f"invalid duration {text!r}")
        scale = GO_DURATION_UNITS[unit]
        if int(whole or "0") > (1 << 63) // scale:
            raise ValueError(f"duration {text!r} out of range")
        total += int(whole or "0") * scale + go_fraction_ns(frac[1:] if frac else "", scale)
        if total > 1 << 63:
            raise ValueError(f"duration {text!r} out of range")
        pos += len(whole) + len(frac or "") + len(unit)
    if not neg and total > GO_MAX_DURATION:
        raise ValueError(f"duration {text!r} out of range")
    return -total if neg else total


def go_fraction_ns(digits, unit):
    """The nanoseconds a fraction's digits add to `unit`, as Go's leadingFraction and
    ParseDuration compute them: digits past int64's range are read and dropped."""
    value, scale = 0, 1.0
    for d in digits:
        if value > ((1 << 63) - 1) // 10 or value * 10 + int(d) > 1 << 63:
            break
        value, scale = value * 10 + int(d), scale * 10
    return int(float(value) * (float(unit) / scale)) if value else 0


####################################################################################
# Ollama's routes on a server of OpenAI's API (llama-server, LM Studio, vLLM, mlx-lm,
# llama-cpp-python): the request said in OpenAI's terms, the answer said back in
# Ollama's, whole or streamed (SSE events in, NDJSON lines out). What a server cannot
# do is said, never dropped in silence; what it does not report (llama-cpp-python
# streams no counts) is measured by the router or left out, never made up.
####################################################################################

OLLAMA_OVER_OPENAI = {"/api/chat": "/v1/chat/completions",
                      "/api/generate": "/v1/chat/completions",
                      "/api/embed": "/v1/embeddings", "/api/embeddings": "/v1/embeddings"}
NDJSON_TYPE = b"application/x-ndjson"
# Ollama's options that OpenAI's servers take by the same name (top_k and min_p are
# extensions every one of the five accepts).
SAME_OPTIONS = {"temperature": (int, float), "top_p": (int, float), "top_k": (int,),
                "min_p": (int, float), "seed": (int,), "presence_penalty": (int, float),
                "frequency_penalty": (int, float)}
# Ollama's repeat_penalty is repetition_penalty to these; repeat_penalty to the others.
REPETITION_PENALTY = ("vllm", "mlx-lm")
MAX_SSE_EVENT = 16 << 20  # one event of a server's stream (a whole answer at most)
IMAGE_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
               (b"GIF8", "image/gif"), (b"RIFF", "image/webp"))


class Untranslatable(Exception):
    """An Ollama request that this node's server cannot be asked: another node may."""


class Translation:
    """One Ollama request (/api/chat, /api/generate, /api/embed, /api/embeddings) to a
    server of OpenAI's API: request() says it in OpenAI's terms; whole() or feed() and
    finish() say the answer back as Ollama would have. The answer names the model as
    the request did; its counts are the server's own (usage, or llama-server's
    timings), else the router's measure (a streamed token a chunk, its times), else
    left out."""

    def __init__(self, endpoint, fields, node_name, server_kind, stream):
        self.endpoint, self.fields, self.kind = endpoint, fields, server_kind
        self.node_name = node_name  # what the server calls the model
        self.shown = fields.get("model")  # what the answer calls it: as asked
        self.stream = stream and endpoint in ("/api/chat", "/api/generate")
        self.chat = endpoint == "/api/chat"
        self.completions = False  # /api/generate as /v1/completions (raw, suffix)
        self.t_sent = self.t_first = self.t_last = None
        self.tokens = 0  # content chunks streamed: a token each
        self.usage, self.timings = {}, {}
        self.finish_reason = None
        self.done = self.failed = False  # [DONE] seen / an error line went out
        self.error = ""  # what that line said
        self.calls = {}  # index -> a tool call streamed in pieces
        self._buffer = b""
        self.local = None  # local_answer(), once asked
        self.path = self.body = None  # request(), once asked
        # A text line's parts: {"model":...,"created_at":"<now>",<key>:"<text>"...}
        self._head = b'{"model":' + hc.dump_json(self.shown) + b',"created_at":"'
        self._open = b'","message":{"role":"assistant","content":' if self.chat else \
            b'","response":'
        self._close = b'},"done":false}\n' if self.chat else b',"done":false}\n'
        self._lead = None  # _head, the read's time as created_at says it, and _open
        self._joint = None  # _close and _lead
        self._read_at = None  # the read's time by the monotonic clock
        self._shape = None  # the server's token event, once learnt (TokenShape)
        self._misfits = 0  # shapes learnt that no later event had

    # -- the request ----------------------------------------------------------------

    def request(self):
        """(path, body) to send; RouteError for a request no server could take,
        Untranslatable for one this server cannot."""
        self.t_sent = time.monotonic()
        if self.endpoint in ("/api/embed", "/api/embeddings"):
            return "/v1/embeddings", strict_json(self._embed_body())
        body = self._chat_body() if self.chat else self._generate_body()
        path = "/v1/completions" if self.completions else "/v1/chat/completions"
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        return path, strict_json(body)

    def local_answer(self):
        """Ollama's answer to a request that asks the server for nothing (no prompt or
        messages: Ollama only loads the model, or unloads it; no input to embed), or
        None. A server of OpenAI's API loads what it lists on its own."""
        f = self.fields
        if self.endpoint == "/api/embed" and f.get("input") in ([], ""):
            return {"model": self.shown, "embeddings": []}
        if self.endpoint == "/api/embeddings" and not f.get("prompt"):
            return {"embedding": []}
        empty = not f.get("messages") if self.chat else \
            self.endpoint == "/api/generate" and not f.get("prompt") and not f.get("images")
        if not empty:
            return None
        ns = keep_alive_ns(f.get("keep_alive"))
        reason = "unload" if ns is not None and ns < UNLOAD_BELOW_NS else "load"
        return {**self._line(""), "done": True, "done_reason": reason}

    def _chat_body(self):
        f = self.fields
        messages = f.get("messages")
        if not isinstance(messages, list):
            raise RouteError(400, "messages must be a list")
        body = {"model": self.node_name, "messages": openai_messages(messages),
                "stream": self.stream}
        tools = f.get("tools")
        if tools:
            if not isinstance(tools, list):
                raise RouteError(400, "tools must be a list")
            body["tools"] = tools  # Ollama's tools are OpenAI's function tools
        return self._common(body)

    def _generate_body(self):
        f = self.fields
        for name in ("template", "context"):
            if f.get(name):
                raise Untranslatable(f"'{name}' works on Ollama only: a server of "
                                     f"OpenAI's API ({self.kind}) has no equivalent")
        prompt, system = text_field(f, "prompt"), text_field(f, "system")
        self.completions = bool(f.get("raw") or f.get("suffix"))
        if self.completions:  # the prompt as it is, with no chat template around it
            if f.get("images"):
                raise RouteError(400, "images need a chat prompt, not raw or suffix")
            body = {"model": self.node_name, "prompt": prompt, "stream": self.stream}
            if f.get("suffix"):
                body["suffix"] = text_field(f, "suffix")
            return self._common(body)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt, "images": f.get("images")})
        return self._common({"model": self.node_name, "messages": openai_messages(messages),
                             "stream": self.stream})

    def _common(self, body):
        """The options, format and keep_alive every text request takes."""
        body.update(openai_options(self.fields.get("options"), self.kind))
        fmt = response_format(self.kind, self.fields.get("format"))
        if fmt is not None:
            body["response_format"] = fmt
        ttl = self._ttl()
        if ttl is not None:
            body["ttl"] = ttl
        return body

    def _ttl(self):
        """keep_alive as LM Studio's ttl (seconds idle before it unloads a model it
        loaded on demand); the other servers keep what they load."""
        ns = keep_alive_ns(self.fields.get("keep_alive"))
        if self.kind != "lmstudio" or ns is None or ns >= GO_MAX_DURATION:
            return None
        return max(1, ns // 10 ** 9)

    def _embed_body(self):
        f = self.fields
        if self.endpoint == "/api/embeddings":
            value = text_field(f, "prompt")
        else:
            value = f.get("input")
            if not (isinstance(value, str) or isinstance(value, list) and
                    all(isinstance(v, str) for v in value)):
                raise RouteError(400, "invalid input type")  # Ollama's words
        body = {"model": self.node_name, "input": value}
        dimensions = f.get("dimensions")
        if dimensions is not None:
            if type(dimensions) is not int or dimensions <= 0:
                raise RouteError(400, "dimensions must be a positive integer")
            body["dimensions"] = dimensions
        return body

    # -- a whole answer -------------------------------------------------------------

    def whole(self, status, body):
        """(status, body) of Ollama's answer from the server's whole one."""
        if status >= 400:
            return status, hc.ollama_error_body(error_text(body))
        obj = event_object(body)
        if obj is None:
            raise hc.UpstreamError("body", "answered with no JSON object")
        if "error" in obj and "choices" not in obj and "data" not in obj:
            # LM Studio says some errors with a 200
            raise hc.UpstreamError("status", f"answered with an error: {error_text(body)}")
        self._read_counts(obj)
        if self.endpoint in ("/api/embed", "/api/embeddings"):
            return 200, hc.dump_json(self._embeddings(obj))
        choice = first_choice(obj)
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        text = choice.get("text") if self.completions else message.get("content")
        self.finish_reason = choice.get("finish_reason")
        out = self._line(text if isinstance(text, str) else "")
        thinking = reasoning_of(message)
        if thinking:
            self._put(out, "thinking", thinking)
        listed = message.get("tool_calls")
        calls = [ollama_tool_call(c) for c in (listed if isinstance(listed, list) else ())
                 [:MAX_TOOL_CALLS] if isinstance(c, dict)]
        if calls:
            self._put(out, "tool_calls", calls)
        self.t_last = time.monotonic()
        return 200, hc.dump_json({**out, **self._final()})

    def _embeddings(self, obj):
        data = obj.get("data")
        if not isinstance(data, list) or not data:
            raise hc.UpstreamError("body", "answered with no embeddings")
        vectors = [d.get("embedding") for d in sorted(
            (d for d in data if isinstance(d, dict)), key=lambda d: d.get("index", 0)
            if type(d.get("index")) is int else 0)]
        if not all(isinstance(v, list) and all(type(x) in (int, float) for x in v)
                   for v in vectors):
            raise hc.UpstreamError("body", "answered with an embedding that is not numbers")
        if self.endpoint == "/api/embeddings":
            return {"embedding": vectors[0]}  # Ollama's legacy route: not normalised
        out = {"model": self.shown, "embeddings": [normalised(v) for v in vectors],
               "total_duration": self._ns(self.t_sent, time.monotonic())}
        if self.usage.get("prompt_tokens"):
            out["prompt_eval_count"] = self.usage["prompt_tokens"]
        return out  # Ollama's /api/embed answers L2-normalised vectors

    # -- a streamed answer ------------------------------------------------------------

    def feed(self, data):
        """NDJSON lines for the complete events in `data` (and what came before). The
        lines of one read share its time (created_at): one clock read a read. A read
        of nothing but tokens in the shape learnt (TokenShape) is said in one go."""
        data = self._buffer + data
        if b"\r" in data:  # CR LF as LF; a CR at the end waits for its LF in the buffer
            data = data.replace(b"\r\n", b"\n")
        shape = None if self.failed else self._shape
        end = data.rfind(b"\n\n") + 2 if shape is not None else 0  # after the last event
        texts = shape.texts(data[:end]) if end >= 2 else None
        if texts is None:
            *events, self._buffer = data.split(b"\n\n")
        else:
            events, self._buffer = (), data[end:]
        if len(self._buffer) > MAX_SSE_EVENT:
            raise hc.UpstreamError("body", f"sent an event over {MAX_SSE_EVENT} bytes")
        self._lead, self._read_at = None, time.monotonic()
        if texts is not None:
            return self._text_lines(texts)
        out = []
        for event in events:
            if self.failed:
                break
            text = shape.text(event) if shape is not None else None
            if text is None:
                out.append(self._event(event))
                shape = self._shape  # it may have learnt one
            else:
                out.append(self._text_lines((text,)))
        return b"".join(out)

    def finish(self):
        """The last lines, once the server's body ended: the tool calls, then the
        final line with the counts; an error line if the answer never finished (a
        llama-cpp-python stream that fails ends with nothing; a waiting request cuts
        its stream with a bare [DONE])."""
        if self.failed:
            return b""
        if self._buffer.strip():
            self._event(self._buffer)
        if self.finish_reason is None:
            what = "ended its stream" if self.done else "closed its stream"
            return self._failure(f"the {self.kind} server {what} before the answer "
                                 f"finished")
        out = b""
        calls = [ollama_tool_call(c) for _, c in sorted(self.calls.items())]
        if calls:
            line = self._line("")
            self._put(line, "tool_calls", calls)
            out = hc.dump_json({**line, "done": False}) + b"\n"
        return out + hc.dump_json({**self._line(""), **self._final()}) + b"\n"

    def _event(self, event):
        """One SSE event's lines for the client (b'' for none)."""
        one_line = event.startswith(b"data: ") and b"\n" not in event
        if one_line:
            payload = event[6:]  # the usual event: one data line
        else:
            data = [line[5:].removeprefix(b" ") for line in event.split(b"\n")
                    if line.startswith(b"data:")]  # ':' lines are pings; no named events
            if not data:
                return b""
            payload = b"\n".join(data)
        if payload.strip() == b"[DONE]":
            self.done = True
            return b""
        try:
            text = payload.decode().strip()
            obj, end = read_json(text)
            if end != len(text):
                obj = None  # something after the object
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            obj = None
        if type(obj) is not dict:
            raise hc.UpstreamError("body", "sent an event that is not a JSON object")
        if obj.get("error"):
            return self._failure(error_text(hc.dump_json(obj)))
        if "usage" in obj or "timings" in obj:
            self._read_counts(obj)
        choice = first_choice(obj)
        if not choice:
            return b""
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        if type(delta) is not dict:
            delta = {}
        if "tool_calls" in delta:
            self._take_calls(delta["tool_calls"])
        text = choice.get("text") if self.completions else delta.get("content")
        thinking = reasoning_of(delta) if "reasoning_content" in delta or \
            "reasoning" in delta else None
        if not (type(text) is str and text) and not thinking:
            return b""
        self.t_first = self.t_first or self._read_at
        self.t_last = self._read_at
        if thinking:
            self.tokens += 1
            line = self._line(text if isinstance(text, str) else "")
            self._put(line, "thinking", thinking)
            return hc.dump_json({**line, "done": False}) + b"\n"
        text = json_text(text).encode()
        if one_line and not (isinstance(obj.get("usage"), dict) or isinstance(
                obj.get("timings"), dict) or choice.get("finish_reason") or
                "tool_calls" in delta):  # its text is all this event did
            self._learn(event, text)
        return self._text_lines((text,))

    def _learn(self, event, text):
        """Take `event` (one data line with nothing but `text` to say) as the shape of
        the server's next ones. One whose text is written otherwise than json_text
        writes it (raw UTF-8) teaches nothing; a server that changes more than the
        text every time stops the learning after a few shapes no later event had."""
        if self._misfits >= MAX_MISFITS or self._shape is not None and \
                self._shape.fits(event):  # the shape known, with a text not plain
            return
        shape = TokenShape.learn(event, b'"text":' if self.completions else b'"content":',
                                 text)
        if shape is None:
            return
        if self._shape is not None and not self._shape.hits:
            self._misfits += 1
        self._shape = shape if self._misfits < MAX_MISFITS else None

    def _text_lines(self, texts):
        """Tokens' lines, their texts given as JSON, written from parts (the stream's
        one hot path: a dict dumped for every token would cost twice as much)."""
        self.t_first = self.t_first or self._read_at
        self.t_last = self._read_at
        self.tokens += len(texts)
        if self._lead is None:
            self._lead = self._head + created_at() + self._open
            self._joint = self._close + self._lead  # from one line's text to the next's
        return self._lead + self._joint.join(texts) + self._close

    @staticmethod
    def count(out):
        """Events in `out`: a line each."""
        return out.count(b"\n")

    def _failure(self, message):
        """Ollama's error line, which ends a stream that has begun (no done line
        follows it)."""
        self.failed, self.error = True, message
        return hc.ollama_error_body(message) + b"\n"

    def _take_calls(self, deltas):
        """Tool calls come in pieces (the name, then the arguments' text bit by bit),
        each under its index; Ollama sends each call whole."""
        for d in deltas if isinstance(deltas, list) else ():
            if not isinstance(d, dict):
                continue
            index = d.get("index") if type(d.get("index")) is int else len(self.calls)
            if index not in self.calls and len(self.calls) >= MAX_TOOL_CALLS:
                continue
            call = self.calls.setdefault(index, {"function": {"name": "", "arguments": ""}})
            fn = d.get("function") if isinstance(d.get("function"), dict) else {}
            if isinstance(d.get("id"), str):
                call["id"] = d["id"]
            for key in ("name", "arguments"):
                value, have = fn.get(key), call["function"][key]
                if isinstance(value, str) and isinstance(have, str):
                    if len(have) + len(value) > MAX_CALL_TEXT:
                        raise hc.UpstreamError("body", f"sent a tool call over "
                                                       f"{MAX_CALL_TEXT} characters")
                    call["function"][key] = have + value
                elif isinstance(value, dict):
                    call["function"][key] = value  # whole, as some servers send it

    # -- Ollama's shapes ------------------------------------------------------------

    def _line(self, text):
        out = {"model": self.shown, "created_at": created_at().decode()}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        return out

    def _put(self, line, key, value):
        (line["message"] if self.chat else line)[key] = value

    def _read_counts(self, obj):
        if isinstance(obj.get("usage"), dict):
            self.usage.update(_counts(obj["usage"]))
        if isinstance(obj.get("timings"), dict):  # llama-server's
            self.timings = obj["timings"]

    def _final(self):
        """The final line's fields: done, done_reason and the counts and times, those
        the server gave (llama-server's timings, else usage) before the router's own
        measure; a count or time unknown is left out (Ollama leaves out zeros too)."""
        out = {"done": True, "done_reason": "length" if self.finish_reason == "length"
               else "stop",
               "total_duration": self._ns(self.t_sent, self.t_last or time.monotonic())}
        t, u = self.timings, self.usage
        if number(t.get("predicted_ms")) and type(t.get("predicted_n")) is int:
            out.update(prompt_eval_count=t.get("prompt_n"),
                       prompt_eval_duration=int(number(t.get("prompt_ms")) * 1e6),
                       eval_count=t["predicted_n"],
                       eval_duration=int(t["predicted_ms"] * 1e6))
        else:
            out["prompt_eval_count"] = u.get("prompt_tokens")
            out["eval_count"] = u.get("completion_tokens", self.tokens if self.stream else None)
            if self.t_first is not None:
                out["prompt_eval_duration"] = self._ns(self.t_sent, self.t_first)
                out["eval_duration"] = self._ns(self.t_first, self.t_last)
        return {k: v for k, v in out.items() if v not in (None, 0)}

    @staticmethod
    def _ns(start, end):
        return int((end - start) * 1e9) if start is not None and end is not None else None


class TokenShape:
    """The event a server streams for every token, learnt from one it sent: its bytes
    before and after the text. Servers repeat it with only the text changed (the same
    id, model and created), so a later event with those bytes around a plain JSON
    string is that object with another text, and its line is written without decoding
    it: decoding each event's JSON was most of the cost of a translated token."""

    def __init__(self, before, after):
        self.before, self.after = before, after
        self.end = after + b"\n\n"  # an event's end, blank line included
        self.between = self.end + before  # from one event's text to the next one's
        self.hits = 0  # later events that had this shape

    @classmethod
    def learn(cls, event, key, text):
        """The shape of `event`, whose one string under `key` is `text` (as JSON),
        or None where that string is not found written so there."""
        if event.count(key) != 1:  # the key once: nothing else to be taken for it
            return None
        found = JSON_STRING.match(event, event.index(key) + len(key))
        if found is None or found.group(1) != text:
            return None
        return cls(event[:found.start(1)], event[found.end(1):])

    def fits(self, event):
        """Has `event` this shape's bytes around its text?"""
        return event.startswith(self.before) and event.endswith(self.after)

    def text(self, event):
        """The text of `event` as JSON, if the event has this shape and its text is
        written as json_text would write it (printable ASCII and the short escapes),
        else None: then the same line as decoding the event would give."""
        if not self.fits(event):
            return None
        text = event[len(self.before):len(event) - len(self.after)]
        if PLAIN_STRING.fullmatch(text) is None:
            return None
        self.hits += 1
        return text

    def texts(self, events):
        """The texts (as JSON) of complete events, each ended by its blank line, if
        every one has this shape and a text as text() takes it, else None. No text
        holds a line break, so `between` is found only from one event to the next."""
        if not (events.startswith(self.before) and events.endswith(self.end)):
            return None
        texts = events[len(self.before):len(events) - len(self.end)].split(self.between)
        if PLAIN_STRINGS.fullmatch(b"\0".join(texts)) is None:
            return None  # an event of another kind among them, or a text otherwise
        self.hits += len(texts)
        return texts


JSON_STRING = re.compile(rb'[ \t\r\n]*("(?:[^"\\]|\\.)*")', re.S)  # after a key's colon
# A JSON string as json_text writes it, not empty (an empty text writes no line):
# printable ASCII, and \" \\ \b \f \n \r \t for the characters it escapes so.
PLAIN = rb'"(?:[ !#-\[\]-~]|\\["\\bfnrt])+"'
PLAIN_STRING = re.compile(PLAIN)
PLAIN_STRINGS = re.compile(PLAIN + rb"(?:\0" + PLAIN + rb")*")  # NUL between: no text has one
MAX_MISFITS = 4  # shapes learnt that no event had, before a stream stops learning
MAX_TOOL_CALLS = 64  # in one answer
MAX_CALL_TEXT = 1 << 20  # characters of one streamed tool call's name or arguments
_SECOND = [None, b""]  # the last whole second created_at() wrote, and its text


def created_at():
    """Now, as Ollama writes created_at (RFC 3339, UTC, microseconds here): the
    date and time of day are formatted once a second, not once a token."""
    now = time.time()
    second = int(now)
    if _SECOND[0] != second:
        _SECOND[:] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
    return b"%s.%06dZ" % (_SECOND[1], int((now - second) * 1e6))
json_text = json.encoder.encode_basestring_ascii  # a str as JSON text, as dump_json writes it
read_json = json.JSONDecoder().raw_decode  # (value, end): json.loads' work, less its own


def strict_json(obj):
    """`obj` as JSON a server will parse: Python's reader takes NaN, Infinity and 1e999
    from a client, which no JSON writer should pass on (RouteError: the client's 400)."""
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        raise RouteError(400, "the request holds a number JSON cannot carry (NaN, "
                              "Infinity, or one past a double's range)") from None


def text_field(fields, name):
    value = fields.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RouteError(400, f"{name} must be a string")
    return value


def number(value):
    """`value` if it is a JSON number (not a bool), else 0."""
    return value if type(value) in (int, float) and math.isfinite(value) else 0


def first_choice(obj):
    choices = obj.get("choices")
    return choices[0] if isinstance(choices, list) and choices and \
        isinstance(choices[0], dict) else {}


def reasoning_of(message):
    """A model's thinking, as llama-server and vLLM name it (Ollama's "thinking")."""
    for key in ("reasoning_content", "reasoning"):
        if isinstance(message.get(key), str) and message[key]:
            return message[key]
    return None


def openai_messages(messages):
    """Ollama's messages in OpenAI's shape: images as image_url parts, a tool call's
    arguments as JSON text, a tool's answer tied to its call by id (Ollama names the
    tool; OpenAI's servers need the call's id)."""
    out, open_calls = [], []  # open_calls: (id, name) of calls not yet answered
    for i, m in enumerate(messages[:MAX_MESSAGES]):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RouteError(400, f"messages[{i}] must be an object with a role")
        role, content = m["role"], m.get("content") or ""
        if not isinstance(content, str):
            raise RouteError(400, f"messages[{i}].content must be a string")
        msg = {"role": role}
        images = m.get("images") or []
        if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
            raise RouteError(400, f"messages[{i}].images must be a list of base64 strings")
        if images:
            msg["content"] = [{"type": "text", "text": content}] + [
                {"type": "image_url", "image_url": {"url": image_url(x)}} for x in images]
        else:  # text, even empty: llama-cpp-python refuses null, and its templates
            msg["content"] = content  # read the content of every message
        calls = m.get("tool_calls") or []
        if role == "assistant" and isinstance(calls, list) and calls:
            msg["tool_calls"] = []
            for call in calls[:MAX_TOOL_CALLS]:
                call_id = call.get("id") if isinstance(call, dict) and \
                    isinstance(call.get("id"), str) else f"call_{i}_{len(msg['tool_calls'])}"
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise RouteError(400, f"messages[{i}].tool_calls: each needs a "
                                          f"function with a name")
                args = fn.get("arguments", {})
                msg["tool_calls"].append({"id": call_id, "type": "function", "function": {
                    "name": fn["name"],
                    "arguments": args if isinstance(args, str) else json.dumps(args)}})
                open_calls.append((call_id, fn["name"]))
        if role == "tool":
            msg["tool_call_id"] = answered_call(m, open_calls, i)
        out.append(msg)
    return out


MAX_MESSAGES = 10_000  # in one conversation


def answered_call(message, open_calls, index):
    """The id of the call a tool message answers: its own tool_call_id, else the first
    open call of its tool_name, else the first open call."""
    if isinstance(message.get("tool_call_id"), str):
        wanted = message["tool_call_id"]
        open_calls[:] = [c for c in open_calls if c[0] != wanted]
        return wanted
    name = message.get("tool_name")
    for n, (call_id, call_name) in enumerate(open_calls):
        if name is None or call_name == name:
            del open_calls[n]
            return call_id
    return f"call_{index}"


def image_url(data):
    """An Ollama image (base64) as a data URL, its type read from its first bytes."""
    try:
        head = base64.b64decode(data[:24] + "=" * (-len(data[:24]) % 4))
    except ValueError:
        raise RouteError(400, "an image is not base64") from None
    mime = next((t for magic, t in IMAGE_MAGIC if head.startswith(magic)), "image/jpeg")
    return f"data:{mime};base64,{data}"


def ollama_tool_call(call):
    """An OpenAI tool call in Ollama's shape: arguments as an object."""
    fn = call.get("function") if isinstance(call.get("function"), dict) else {}
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise hc.UpstreamError("body", "sent a tool call whose arguments are not "
                                           "JSON") from None
    out = {"function": {"name": fn.get("name") if isinstance(fn.get("name"), str) else "",
                        "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def openai_options(options, kind):
    """Ollama's options as request fields of a server of OpenAI's API. num_predict is
    max_tokens (-1 and -2, Ollama's "no limit" and "fill the context", leave it out);
    num_ctx has no per-request equivalent: the server's own context holds."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise RouteError(400, "options must be an object")
    out = {}
    for name, types in SAME_OPTIONS.items():
        value = options.get(name)
        if value is not None:
            out[name] = option_number(name, value, types)
    stop = options.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise RouteError(400, "options.stop must be a list of strings")
        out["stop"] = stop
    predict = options.get("num_predict")
    if predict is not None and option_number("num_predict", predict, (int,)) >= 0:
        out["max_tokens"] = predict
    penalty = options.get("repeat_penalty")
    if penalty is not None:
        out["repetition_penalty" if kind in REPETITION_PENALTY else "repeat_penalty"] = \
            option_number("repeat_penalty", penalty, (int, float))
    return out


def option_number(name, value, types):
    """An option's number, checked: of `types` (never a bool), finite, and within a
    64-bit integer's range (what the servers parse a number into)."""
    if type(value) not in types:
        raise RouteError(400, f"options.{name} must be "
                              f"{'an integer' if types == (int,) else 'a number'}")
    if not (math.isfinite(value) and abs(value) < 2 ** 63):
        raise RouteError(400, f"options.{name} is out of range")
    return value


def response_format(kind, fmt):
    """Ollama's format ("json" or a JSON schema) as the server takes it, or None."""
    if fmt is None or fmt == "":
        return None
    if fmt != "json" and not isinstance(fmt, dict):
        raise RouteError(400, 'format must be "json" or a JSON schema object')
    if kind == "mlx-lm":
        raise Untranslatable("mlx_lm.server cannot hold an answer to a format")
    schema = {"type": "object"} if fmt == "json" else fmt
    if kind == "llama-cpp-python":  # its own: json_object with an optional schema
        return {"type": "json_object", **({} if fmt == "json" else {"schema": schema})}
    if fmt == "json" and kind != "lmstudio":  # LM Studio takes json_schema only
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def normalised(vector):
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector


class Renaming:
    """A node's answer with the model named as the client named it, where the node was
    sent its own name (an alias, FLEET_MODEL_ALIASES; an OpenAI server's exact id):
    the "model" member of each complete line (NDJSON, or SSE's data lines), whatever the
    API. Used in a TranslatedRelay as a Translation is."""

    failed, error = False, ""

    def __init__(self, own, asked):
        self._own = re.compile(rb'("model"\s*:\s*)' + re.escape(json.dumps(own).encode()))
        self._asked = json.dumps(asked).encode()
        self.sep = b"\n"  # what ends one event: a line (NDJSON), a blank line (SSE)
        self.tokens = 0
        self._buffer = b""

    def rename(self, data):
        return self._own.sub(lambda m: m.group(1) + self._asked, data)

    def feed(self, data):
        done, nl, self._buffer = (self._buffer + data).rpartition(b"\n")
        if not nl:
            return b""  # no line ends here yet: all of it waits in _buffer
        out = self.rename(done + nl)
        self.tokens += 1
        return out

    def finish(self):
        out, self._buffer = self.rename(self._buffer), b""
        return out

    def count(self, out):
        return out.count(self.sep)


class TranslatedRelay(hc.Relay):
    """A node's answer said otherwise on its way to the client (a Translation: SSE in,
    Ollama's NDJSON out; or a Renaming), read by read, in the relay's fast path as in
    its slow one. chunks_seen counts the client's events (a line a token)."""

    says_otherwise = True

    def __init__(self, up, client, timeout, translation):
        super().__init__(up, client, timeout)
        self.tr = translation
        self.ended = False
        self.events = 0

    @property
    def chunks_seen(self):
        return self.events

    async def first(self, headers):
        """The first lines, read before the client hears anything: a server whose
        stream fails before its first token (llama-cpp-python's ends with nothing)
        fails the attempt, and another node may answer."""
        self.chunked = self.up.is_chunked(headers)
        while True:
            data = await self._receive()
            out = self._pass(data) if data else self._end()
            if self.tr.failed and not self.tr.tokens:
                raise hc.UpstreamError("body", self.tr.error)
            if out or not data:
                self.ended = not data
                if out:
                    self._note(out)
                return out

    async def rest(self):
        if not self.ended:
            await super().rest()

    def _pass(self, framed):
        return self._framed(self.tr.feed(self._unframed(framed)))

    def _unframed(self, framed):
        """The data of the node's complete chunks `framed`: as its ChunkedBody gathered
        it while scanning them, else unframed here (a body not chunked; the first
        chunks, scanned before this relay could ask for the gathering)."""
        body = self.up.chunked_body if self.chunked else None
        if body is None:
            return hc.unframe_chunks(framed)
        if body.payloads is None:
            body.payloads = []
            return hc.unframe_chunks(framed)
        data = b"".join(body.payloads)
        body.payloads.clear()
        return data

    def _end(self):
        return self._framed(self.tr.finish())

    def _framed(self, out):
        if not out:
            return b""
        self.events += self.tr.count(out)
        return hc.frame_chunk(out)


####################################################################################
# Routing: elimination, the seven signals, the holding queue, context protection
####################################################################################


class RouteError(Exception):
    """The request cannot be routed: status, message, and extra headers."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status, self.headers = status, list(headers)


class Choice:
    """The node chosen for a request and why."""

    __slots__ = ("node", "model", "score", "breakdown", "hot", "runner_up", "candidate")

    def __init__(self, node, model, score=0.0, breakdown=None, hot=False, runner_up=None,
                 candidate=None):
        self.node, self.model = node, model
        self.score, self.breakdown, self.hot = score, breakdown or {}, hot
        self.runner_up = runner_up  # the next best node's Candidate, if any
        self.candidate = candidate  # the chosen node's Candidate (None: not scored)


class Ask:
    """What the scheduler reads from a request: the context it needs, the client's
    answer-length limit, the node that answered its conversation's last turn, and the
    route (a newer one needs an Ollama that serves it) and the kind of request (an image
    or speech request needs a node that serves that kind)."""

    __slots__ = ("requested_ctx", "max_tokens", "session_node", "endpoint", "kind")

    def __init__(self, requested_ctx=0, max_tokens=0, session_node=None, endpoint="",
                 kind=hc.CHAT):
        self.requested_ctx, self.max_tokens = requested_ctx, max_tokens
        self.session_node, self.endpoint, self.kind = session_node, endpoint, kind


# A limit the client sets is taken up to this many tokens: beyond it, no model's answer
# or context differs, and a number past a float's range (10**400 is valid JSON) would
# break the arithmetic the forecasts do with it.
MAX_TOKENS_TAKEN = 1 << 30


def requested_tokens(body):
    """The answer-length limit the client set (num_predict, max_tokens), else 0."""
    options = body.get("options")
    values = [options.get("num_predict") if isinstance(options, dict) else None,
              body.get("max_tokens"), body.get("max_completion_tokens"),
              body.get("max_output_tokens")]
    limits = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(min(limits), MAX_TOKENS_TAKEN) if limits else 0


def requested_context(body):
    options = body.get("options")
    if isinstance(options, dict) and isinstance(options.get("num_ctx"), int) \
            and not isinstance(options["num_ctx"], bool):
        return min(max(0, options["num_ctx"]), MAX_TOKENS_TAKEN)
    return 0


# What a server of OpenAI's API serves as it is (Ollama's inference routes go to it
# translated, OLLAMA_OVER_OPENAI; Anthropic's and the Responses API wait for theirs).
OPENAI_SERVED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def cannot_serve(node, endpoint):
    """Why the node's server cannot serve `endpoint`, or None: a server of OpenAI's API
    OpenAI's routes and Ollama's inference routes; an Ollama none that came after its
    release (too_old)."""
    if not node.speaks_ollama:
        return None if endpoint in OPENAI_SERVED or endpoint in OLLAMA_OVER_OPENAI else \
            f"its server is {node.hb.server_kind}, which the router reaches only by " \
            f"OpenAI's routes and Ollama's inference routes"
    return too_old(node, endpoint)


def too_old(node, endpoint):
    """Why the node's Ollama cannot serve `endpoint` (it predates the route), or None. An
    unknown version, or a build from source (which reports 0.0.0), is let through: if it
    is too old, its own 404 reaches the client."""
    first = NEWER_INFERENCE.get(endpoint)
    have = node.hb.ollama_version
    if first is None or not any(version_key(have)) or version_key(have) >= version_key(first):
        return None
    return f"Ollama {have} is older than {first}, which added {endpoint}"


def request_kind(path):
    """The kind of a request, by its route (hc.REQUEST_KINDS)."""
    if path in IMAGE_ROUTES:
        return hc.IMAGE
    if path in TRANSCRIBE_ROUTES:
        return hc.TRANSCRIPTION
    if path in EMBED_ENDPOINTS:
        return hc.EMBEDDING
    if path in NATIVE_INFERENCE + OPENAI_INFERENCE or path in NEWER_INFERENCE:
        return hc.CHAT
    return hc.ADMIN_KIND


def not_served(kind, shown_name, fleet):
    """The 404 for an image or speech model no node serves: what there is, and what to
    install or set on a node to have it."""
    what = "image" if kind == hc.IMAGE else "speech-to-text"
    have = sorted({name for n in fleet.nodes.values()
                   for name in n.media_models.get(kind, {}).values()} |
                  {name for n in fleet.nodes.values() for name in n.models
                   if kind == hc.IMAGE and "image" in (n.models[name].capabilities or ())})
    listed = f"the fleet's {what} models: {', '.join(have)}" if have else \
        f"no node serves {what} models"
    return RouteError(404, f"model '{shown_name}' not found: no node serves it for "
                           f"{what} ({listed}). To add one, {MEDIA_HINTS[kind]}")


def pick_route(models, ranked):
    """(model, best entry) among the primary and its fallbacks, or None.

    The primary wins when it is loaded somewhere; a loaded fallback beats it only when
    the primary would need a cold load; otherwise the first model, in the client's
    order, that some node can serve.
    """
    best = {m: ranked[m][0] for m in models if ranked[m]}
    hot = [m for m in models if m in best and best[m][2].hot]
    if hot:
        return hot[0], best[hot[0]]
    for model in models:
        if model in best:
            return model, best[model]
    return None


def same_model_other_tag(a, b):
    """'llama3.2:1b' and 'llama3.2:3b' are variants of one model; 'llama3.2' and
    'smollm2' are not, whatever GGUF architecture they share."""
    return a != b and a.rpartition(":")[0] == b.rpartition(":")[0]


class LastNode:
    """The node each key last went to, for `ttl_s` at most, the `max_items` newest kept
    (conversations for session affinity, client addresses for blobs and their create)."""

    def __init__(self, max_items, ttl_s):
        self.max_items, self.ttl_s = max_items, ttl_s
        self.last = {}  # key -> (node_id, monotonic time), the newest last

    def node_for(self, key):
        node_id, at = self.last.get(key, (None, 0.0)) if key else (None, 0.0)
        return node_id if time.monotonic() - at < self.ttl_s else None

    def remember(self, key, node_id):
        if not key:
            return
        now = time.monotonic()
        self.last.pop(key, None)
        self.last[key] = (node_id, now)
        while len(self.last) > self.max_items or \
                now - next(iter(self.last.values()))[1] >= self.ttl_s:
            self.last.pop(next(iter(self.last)))


# Session affinity: the next turn of a conversation goes back to the node that answered
# the last one, since Ollama keeps the prompt it last evaluated in the slot and a
# follow-up that starts with the same messages skips evaluating them again. A
# conversation is named by X-Herd-Session (or a `session:<id>` tag), else by its
# messages: turn n+1 sends turn n's messages, the answer and a new question, so turn
# n's messages are its prefix.
MAX_SESSIONS = 10000
SESSION_TTL_S = 1800.0
MAX_SESSION_NAME = 128


def conversation_keys(request, body, tags):
    """(the key this turn looks up, the key the next turn will look up)."""
    named = request.header("x-herd-session") or next(
        (t[8:] for t in (tags or "").split(",") if t.startswith("session:")), "")
    if named and len(named) <= MAX_SESSION_NAME and not hc.CONTROL_CHARS.search(named):
        return "s:" + named, "s:" + named
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, None
    return conversation_digests(str(body.get("model")), messages)


def conversation_digests(model, messages):
    """(digest of the messages before the last answer and question, or None; digest of
    them all), in one pass: each message is hashed once, and the first digest is the
    running hash taken part-way. A turn's full digest is the next turn's prefix one."""
    running = hashlib.blake2b(model.encode("utf-8", "replace"), digest_size=16)
    before = None
    for n, message in enumerate(messages):
        if n == len(messages) - 2 and n:
            before = "m:" + running.copy().hexdigest()
        # Compact JSON has no raw newline, so one ends each message unambiguously.
        running.update(json.dumps(message, sort_keys=True, ensure_ascii=False,
                                  separators=(",", ":"), default=str)
                       .encode("utf-8", "replace") + b"\n")
    return before, "m:" + running.hexdigest()


class Scheduler:
    """Picks the node for each request, holding it while no node can take it."""

    def __init__(self, cfg, fleet, learner, stats):
        self.cfg, self.fleet, self.learner, self.stats = cfg, fleet, learner, stats
        self.placement = Placement(fleet, learner)
        self.sessions = LastNode(MAX_SESSIONS, SESSION_TTL_S)  # conversation -> node
        self.holding = 0  # requests waiting for any node that can serve them

    def candidate(self, node, model, ask):
        """The scoring view of one node for one model."""
        entry = node.models.get(model, NO_ENTRY)
        loaded = node.loaded.get(model)
        q = self.fleet.queues.get((node.node_id, model))
        unloaded = node.unloaded_at.get(model)
        c = hc.Candidate(
            node_id=node.node_id, hot=loaded is not None,
            loading_s=node.loading_left(model, time.monotonic()),
            recently_unloaded=unloaded is not None
            and time.monotonic() - unloaded < hc.RECENT_UNLOAD_S,
            model_size=entry.size,
            mem_total=node.hb.mem_total, mem_available=node.hb.mem_available,
            mem_reclaimable=sum(m.size for name, m in node.loaded.items() if name != model),
            pressure=node.hb.pressure,
            active=q.active if q else 0, waiting=q.waiting if q else 0,
            slots=self.fleet.slots_for(node), limit=self.fleet.limit_for(node, model),
            cpu_percent=node.hb.cpu_percent,
            cpu_trend=node.cpu_trend(), degraded=node.status == DEGRADED,
            **node.capacity_inputs(),
            requested_ctx=ask.requested_ctx,
            loaded_ctx=(loaded or NO_ENTRY).context_length or 0,
            model_max_ctx=entry.max_context,
            session=ask.session_node == node.node_id,
        )
        if node.serves_itself(model, ask.kind):
            c.hot = True  # the agent's own tool or server: nothing of Ollama's to load
        if not c.hot:
            c.evicts = self.fleet.residency.victims(node, model, entry.size,
                                                    self.placement.kept_on(node.node_id))
            c.evicts_busy = next((m for m in c.evicts if self.fleet.busy(node, m)), "")
        if self.cfg.learning:
            self._forecast(c, q, model, ask, sized(entry))
        return c

    def _forecast(self, c, q, model, ask, size):
        """Fill in what learning says: the answer's expected length, its run time here
        and the queued work ahead of it (`size`: the model's, for estimates by size)."""
        f = self.learner.forecast(c.node_id, model, size)
        if f is None:
            return
        c.tokens = self.learner.answer_tokens(model, ask.max_tokens)
        # Its speed once it runs: with what else runs on the node then (its models
        # share the machine), at most this model's limit of its own.
        others = self.fleet.node_active(c.node_id) - c.active
        f = self._as_streaming_now(f, q, others + c.active)
        c.service_s = f.service_s(c.tokens, others + min(c.active + 1, c.limit))
        c.work_ahead_s = f.work_ahead_s(q, c.limit, others + c.limit)
        c.load_estimate_s = f.load_s
        c.first_s = f.ttft_s + c.loading_s + (0.0 if c.hot else f.load_s)

    @staticmethod
    def _as_streaming_now(f, q, level):
        """`f`, slowed to the pace of the answers running on the node+model now, when
        that is well below what was learned: a node that slows down shows it in the
        first chunks of its answers (or in a first chunk that is long late), long before
        the first answer ends."""
        if q is None or not q.running:
            return f
        pace = q.live_pace(time.monotonic(), f.level_tps(level))
        return f.slowed(pace) if pace is not None and pace < LIVE_SLOW else f

    def rank(self, model, ask, exclude=(), held_back=None):
        """Survivors of elimination, best first, and why the others were dropped. A
        cold load that would evict a model with requests running or queued is dropped
        too, when another node can serve without that, and one the placement plan
        does not want (Placement.steer; those go to `held_back`, a list, if given)."""
        candidates, reasons = [], []
        for node in self.fleet.nodes.values():
            if not node.serves(model, ask.kind):
                continue  # not a candidate at all; not worth naming
            why = "failed this request already" if node.node_id in exclude \
                else cannot_serve(node, ask.endpoint) or node.accepts_work()
            if why is None:
                c = self.candidate(node, model, ask)
                why = hc.eliminate(c)
                if why is None:
                    candidates.append(c)
                    continue
            reasons.append(f"{node.node_id}: {why}")
        # The plan first: where it places the model, a load that waits for a busy
        # model to go idle there beats one that pushes out another node's model.
        candidates, held = self.placement.steer(model, candidates, reasons)
        if held_back is not None:
            held_back += held
        harmless = [c for c in candidates if not c.evicts_busy]
        if harmless and len(harmless) < len(candidates):
            reasons += [f"{c.node_id}: loading {model} would evict {c.evicts_busy}, which "
                        f"has requests running" for c in candidates if c.evicts_busy]
            candidates = harmless
        return hc.rank_candidates(candidates), reasons

    async def choose(self, models, ask, exclude=(), shown_name=None, hold=True, prefer=None):
        """The best node for the first of `models` that can be served (the rest are
        fallbacks), waiting in the holding queue while none can be."""
        deadline = time.monotonic() + (self.cfg.hold_timeout if hold else 0.0)
        waking = 0.0  # when the wake this request waits for was sent
        shown_name = shown_name or models[0]
        self.holding += 1
        try:
            while True:
                known = any(self.fleet.holders(m, ask.kind) for m in models)
                if not known and not self.fleet.warming_up():
                    self._refuse_kind(models, ask.kind, shown_name)
                    raise RouteError(404, f"model '{shown_name}' not found on any node of "
                                          f"the fleet" + (" (nor its fallbacks)"
                                                          if len(models) > 1 else ""))
                choice, reasons, awake = self._pick(models, ask, exclude, prefer)
                if choice:
                    self.wake_for_backlog(choice.model, awake, ask)
                    return choice
                holders = [n for m in models for n in self.fleet.holders(m, ask.kind)]
                if holders and all(cannot_serve(n, ask.endpoint) for n in holders):
                    # Waiting cannot help, and an old Ollama itself would say 404.
                    raise RouteError(404, f"no node with '{shown_name}' runs a server that "
                                          f"serves {ask.endpoint} ({'; '.join(reasons)})")
                woken = self.fleet.waker.wake_for(holders)
                if woken and not waking:  # asleep, not gone: its first heartbeat will
                    waking = woken        # bring it back; waited for once, from then
                    deadline = max(deadline, woken + WAKE_WAIT_S)
                until = deadline if known else min(deadline, self.fleet.warm_until())
                remaining = until - time.monotonic()
                if remaining <= 0:
                    if not known:
                        continue  # the start-up window is over: answer 404 above
                    asleep = self.fleet.waker.woken_names(holders)
                    raise RouteError(503, f"no node can serve '{shown_name}' right now "
                                          f"({'; '.join(reasons) or 'no node online'}); "
                                          + (f"woke {asleep} (Wake-on-LAN) and waited "
                                             f"{WAKE_WAIT_S:g}s for a heartbeat" if asleep
                                             else f"waited {self.cfg.hold_timeout:g}s"),
                                     [(b"retry-after", b"%d" % max(
                                         1, int(self.cfg.heartbeat_timeout)))])
                await self.fleet.wait_change(remaining)
        finally:
            self.holding -= 1

    def _refuse_kind(self, models, kind, shown_name):
        """An image or speech request for a model no node serves that way: a text
        model asked for a picture is Ollama's own 400; anything else the 404 that says
        what to install."""
        if kind not in hc.MEDIA_KINDS:
            return
        if kind == hc.IMAGE and any(self.fleet.holders(m) for m in models):
            raise RouteError(400, f"model '{shown_name}' does not support image generation "
                                  f"(not an image model on any node)")
        raise not_served(kind, shown_name, self.fleet)

    def _pick(self, models, ask, exclude, prefer):
        ranked, reasons, held = {}, [], collections.defaultdict(list)
        for model in models:
            ranked[model], why = self.rank(model, ask, exclude, held[model])
            reasons += why
        picked = pick_route(models, ranked)
        if picked and prefer:  # the rebalancer's pick, if it can still take it
            model = picked[0]
            picked = next(((model, e) for e in ranked[model] if e[2].node_id == prefer),
                          picked)
        if not picked:
            return None, reasons, []
        model, (score, breakdown, c) = picked
        others = [e[2] for e in ranked[model] if e[2].node_id != c.node_id] or \
            [e[2] for e in hc.rank_candidates(held[model])]  # a runner-up to pre-warm
        awake = [e[2] for e in ranked[model]] + held[model]  # every node that could take it
        return Choice(self.fleet.nodes[c.node_id], model, score, breakdown, c.hot,
                      others[0] if others else None, c), reasons, awake

    # -- waking a node for a backlog ------------------------------------------------
    #
    # Theory: when every awake node that can take a model is saturated (all the slots it
    # may use are taken) and a sleeping node has the model on disk, waking it pays
    # once the soonest answer an awake node promises comes later than the sleeper's
    # would: its wake (as long as its last one took, else WAKE_WAIT_S), its cold load
    # and the answer itself. So a burst that the awake nodes clear sooner than a machine
    # boots wakes nothing. The packet goes once (the Waker repeats it only every
    # WAKE_EVERY_S, while the backlog lasts). The request that found the backlog is not
    # held for the sleeper: it keeps its place in the awake node's queue, and the woken
    # node takes the requests that arrive once it has joined. Holding it would stake a
    # wait the queue already promises on a guess (a wake time seen once, or a laptop its
    # owner carried out of the house, which answers no packet), to win at best the
    # difference of two estimates. With nothing learned about a node's speed its wait
    # is unknown, and no machine is woken for it.

    def wake_for_backlog(self, model, awake, ask):
        """Wake the sleeping node that has `model` and would answer soonest, when every
        awake candidate (`awake`) is saturated and it would answer sooner than them."""
        waker = self.fleet.waker
        sleepers = [n for n in self.fleet.holders(model, ask.kind) if waker.asleep(n)
                    and not n.hb.paused and cannot_serve(n, ask.endpoint) is None]
        if not sleepers or not awake or not all(hc.saturated(c) for c in awake):
            return
        promised = [hc.expected_s(c) for c in awake]
        if not all(promised):
            return  # a node whose speed is unknown may answer soon
        service_s = min(c.service_s for c in awake)
        woken_s, node_id = min((self._answer_after_wake(n, model, ask, service_s),
                                n.node_id) for n in sleepers)
        if woken_s >= min(promised):
            return
        node = self.fleet.nodes[node_id]
        if node.node_id not in waker.sent:
            self.stats.count_event("woken_for_backlog", f"every awake node with {model} "
                                   f"is saturated (the soonest answers in "
                                   f"{min(promised):.0f} s); woke {node.node_id}, expected "
                                   f"to answer in {woken_s:.0f} s")
        waker.wake_for([node])

    def _answer_after_wake(self, node, model, ask, service_s):
        """Seconds until a sleeping node would answer if woken now: its wake, its cold
        load (or none, if its model stayed in memory), the answer (as long as
        `service_s` when its speed is unknown); infinite if it cannot take the model."""
        c = self.candidate(node, model, ask)
        if hc.eliminate(c):
            return math.inf
        return self.fleet.waker.wake_left_s(node) + hc.estimate_wait_s(c) + \
            (c.service_s or service_s)

    # -- context protection ---------------------------------------------------------

    def models_to_try(self, model, fallback_names, requested_ctx, embedding):
        """[primary, fallbacks...] and {model: the name the client used for it}."""
        names = {self.fleet.model_key(hc.canonical_model(m)): m for m in fallback_names or ()}
        models = [model] + [m for m in names if m != model]
        bigger = self.larger_variant(model, requested_ctx, embedding)
        if bigger:
            models = [bigger] + models  # loaded with room for the context: no reload
            names[bigger] = bigger
        return models, names

    def larger_variant(self, model, requested_ctx, embedding):
        """Another tag of the same model, loaded with room for `requested_ctx` and at
        least as large, when `model` is loaded only with less (strip mode); else None.

        Never for an embedding model: another model's vectors (other dimensions, another
        space) would silently corrupt the client's vector store."""
        if self.cfg.context_protection != "strip" or not requested_ctx or embedding:
            return None
        fleet = self.fleet
        if any(n.models[model].is_embedding for n in fleet.holders(model)):
            return None
        loaded = [n.loaded[model] for n in fleet.nodes.values() if model in n.loaded]
        if not loaded or any((e.context_length or 0) >= requested_ctx for e in loaded):
            return None
        size = max((n.models[model].size for n in fleet.holders(model)), default=0)
        for node in fleet.working_nodes():
            for name, entry in node.loaded.items():
                if same_model_other_tag(model, name) and \
                        (entry.context_length or 0) >= requested_ctx and \
                        node.models.get(name, NO_ENTRY).size >= size:
                    self.stats.count_event("context_upgraded",
                                           f"num_ctx {requested_ctx} is more than {model} "
                                           f"has loaded; {name} on {node.node_id} has it")
                    return name
        return None

    def protect_context(self, ex, choice, requested_ctx):
        """A num_ctx that would make Ollama reload a loaded model is set to the loaded
        context (FLEET_CONTEXT_PROTECTION=strip), or only logged (warn)."""
        mode = self.cfg.context_protection
        loaded_ctx = choice.node.loaded.get(choice.model, NO_ENTRY).context_length or 0
        if mode == "passthrough" or not requested_ctx or not loaded_ctx or \
                requested_ctx >= loaded_ctx:
            return  # nothing to save, or the client needs more than is loaded
        self.stats.count_event(f"context_{'stripped' if mode == 'strip' else 'warned'}",
                               f"num_ctx {requested_ctx} would reload {choice.model} "
                               f"(loaded with {loaded_ctx}) on {choice.node.node_id}", ex)
        if mode == "strip":
            ex.rewrite(num_ctx=loaded_ctx)

    # -- the rebalancer -----------------------------------------------------------------

    def rebalance(self):
        """Fleet.rebalance, moving a queued request only where learning expects it to
        be answered sooner than where it waits (a slow node's free slot may be worse);
        then, with a placement plan, the spill of queues grown past a load or a shorter
        queue elsewhere."""
        moved = self.fleet.rebalance(self.worth_moving if self.cfg.learning else None)
        if self.cfg.learning and self.placement.plan is not None:
            moved += self._spill()
        return moved

    def _spill(self):
        """Hand requests waiting in a queue back for routing when a request that arrived
        now would be sent to another node: to a cold load there (Placement.steer: where
        the plan places the model and its answer comes sooner than the wait here, or far
        sooner anywhere), the newest; to a node where the model is hot, as many of the
        newest as would be answered sooner there, each behind the ones moved before it
        (_sooner_there). A queue's wait grows after its requests were placed in it: the
        node slowed, or the plan moved the model. (Moved only to a node where the model
        was hot, requests waited up to a minute behind the slowed laptop's one slot
        while a load on the studio took three seconds. Moved only into free slots, the
        warm-up plan's queue of a dozen on the laptop waited half a minute while the
        studio, where the next plan had loaded the model, served the newer requests
        as they came.)"""
        moved = 0
        for (node_id, model), q in list(self.fleet.queues.items()):
            node = self.fleet.nodes.get(node_id)
            if not q.waiters or node is None:
                continue
            ranked, _ = self.rank(model, Ask())
            best = ranked[0][2] if ranked else None
            if best is None or best.node_id == node_id:
                continue
            if best.hot or best.loading_s:
                count = self._sooner_there(self.candidate(node, model, Ask()), best,
                                           q.waiting)
            else:
                count = 1
            moved += q.evict(count, best.node_id, newest=True)
        return moved

    @staticmethod
    def _sooner_there(here, there, waiting):
        """How many of the `waiting` requests of a queue (`here`, a Candidate for one more)
        would be answered sooner on `there`, newest first: the i-th newest waits its share
        of the queue's work here; the j-th moved waits for those moved before it there,
        each a run over its slots. A move must save a fifth (MOVE_GAIN), so that two
        queues near even do not trade requests."""
        if not (here.service_s and there.service_s) or waiting <= 0:
            return 0
        there_wait = hc.estimate_wait_s(there)
        step = there.service_s / max(1, there.limit or there.slots)
        count = 0
        for i in range(waiting):
            stay = here.work_ahead_s * (waiting - i) / waiting + here.service_s
            move = there_wait + count * step + there.service_s
            if move > MOVE_GAIN * stay:
                break
            count += 1
        return count

    def worth_moving(self, node_id, target, model):
        here = self.fleet.nodes.get(node_id)
        if here is None:
            return True
        stay = hc.expected_s(self.candidate(here, model, Ask()))
        move = hc.expected_s(self.candidate(target, model, Ask()))
        return not stay or not move or move < stay

    # -- the queue view ---------------------------------------------------------------

    def queue_report(self):
        """/fleet/queue: every node+model queue with its estimated wait."""
        rows = []
        for (node_id, model), q in sorted(self.fleet.queues.items()):
            node = self.fleet.nodes.get(node_id)
            if node is None:
                continue
            c = self.candidate(node, model, Ask())
            rows.append({"node_id": node_id, "model": model, "active": q.active,
                         "waiting": q.waiting, "limit": q.limit,
                         "estimated_wait_s": round(c.work_ahead_s if q.waiting else 0.0, 2)})
        return {"queues": rows, "total_active": sum(r["active"] for r in rows),
                "total_waiting": sum(r["waiting"] for r in rows), "holding": self.holding}


####################################################################################
# Placement: which models should be hot where (issue 20). The plan is herd_common's
# plan_placement, a pure function; here are its inputs, read from live state, the plan's
# versions, and how routing follows it.
#
# Theory: each request counts towards its model's demand (a request rate that rises
# within seconds and fades over a minute, times the seconds one answer takes on the
# fastest node). Every PLAN_EVERY_S, and before a request for a model the plan places
# nowhere is routed, the plan is rebuilt starting from the last one, not what is loaded:
# a cold load the plan did not want (a model placed nowhere must be loaded somewhere:
# the answer always comes from the model asked for) does not become the plan. A new
# plan replaces the last only when it costs PLAN_MARGIN less, and the version changes
# only when what it places where changes; a load of a model that left that node's
# memory under the same version is a thrash.
# Routing follows the plan (Placement.steer): a cold load goes where the plan places
# the model, and not at all while a node where it is hot answers sooner than the load
# (plus reloading what the load would push out); only an answer LOAD_ANYWAY times later
# than after a load elsewhere has that load made (the plan lags a node that slowed),
# and a queue that grew so after its requests joined it hands them back one by one (the
# rebalancer's spill). The Warmer loads what the plan places at a quiet moment, first
# unloading (keep_alive 0) what the plan dropped there.
####################################################################################

PLAN_EVERY_S = 5.0  # the plan is rebuilt this often: a few heartbeats
PLAN_SOON_S = 1.0  # or within this when a model it places nowhere is asked for
DEMAND_TAU_S = 60.0  # a model's request rate forgets its past over about a minute
DEMAND_RISE_TAU_S = 10.0  # and a rise in it is seen over about ten seconds
RISE_ABOVE, FADE_BELOW = 2.0, 0.5  # a shift: the short count this far from the long one,
SHIFT_EVIDENCE = 3.0  # with this many requests in its window (expected, for a fall)
FADE_GAP = 4.0  # a model has stopped when its quiet would have held this many requests
DEMAND_MIN_S = 3.0  # a count is taken as a rate over at least this long
PLAN_ASKED_S = 30.0  # the plan loads ahead of requests only a model asked for this lately
MAX_DEMAND_MODELS = 256  # models whose demand is kept (the quietest is forgotten first)
MAX_PLANNED_MODELS = 32  # the busiest models the planner weighs (its search grows with them)
GUESS_TPS_GB = 100.0  # tokens/s of a 1 GB model when nothing is learned (falls with size)
GUESS_LOAD_S, GUESS_LOAD_S_GB = 1.0, 0.5  # a load's guess: base + per GB of weights
SERVICE_PRIOR_ANSWERS = 5.0  # a model's own timings outweigh the fleet's after this many
LIKE_SIZE_SCALE = 2.0  # models this far apart in size say something of each other's time
PLAN_MARGIN = 0.35  # a new plan must cost a third less than the last to replace it
PLAN_SETTLE_S = 10.0  # a plan holds this long before a model is unloaded for it
MOVE_WINDOW_S = 120.0  # the Warmer never undoes its own move this soon, plan unchanged
LOAD_ANYWAY = 3.0  # a load the plan did not choose, when the wait is this many times longer


class Demand:
    """Each model's recent request rate (requests a second): two exponentially weighted
    counts, one that forgets over DEMAND_TAU_S (the rate, steady enough that a plan
    built on it does not churn) and one over DEMAND_RISE_TAU_S (a shift, seen within
    seconds). Each is read as a rate over the time since the model was first asked
    for, once it holds SHIFT_EVIDENCE requests (_since_first): the long count of a
    model that rose a minute ago is its rate, not half of it.
    - Rising: the short count is taken when it is at least RISE_ABOVE the long one and
      holds SHIFT_EVIDENCE requests.
    - Stopped: the short count fell below FADE_BELOW of the long one, or no new
      conversation has come for as long as FADE_GAP of them would take at their
      rate (Poisson gives such a gap by chance once in e**FADE_GAP). From then until
      a new conversation asks for it its rate is at most the short count and one
      request over its quiet: a busy model that stopped gives up its place within
      seconds, a quiet one's lull moves nothing, and a rate that fades never climbs
      back to the stale long count. The next turns of conversations under way are
      counted (they are work) but are no sign that the model is still wanted: after a
      shift, a fader's follow-ups held its rate up for ten seconds, and the plans of
      those seconds had no room for the risers but by moving every other model.
    (Before SHIFT_EVIDENCE requests the long count is taken at its word, a minute's
    worth: read as a rate over its first seconds, the plan made moves that the fleet
    where every model fits paid for in cold loads.)"""

    def __init__(self):
        # model -> (slow count, fast count, monotonic time of its last request, of its
        # first), and (slow count of new conversations, time of the last one)
        self.rates, self.fresh = {}, {}
        self.stopped = set()  # models seen to stop, until a new conversation asks

    def count(self, model, now, fresh=True):
        """A request for `model` at `now`; `fresh`: it begins a conversation (else it
        is the next turn of one under way)."""
        slow, fast = self._decayed(model, now)
        if model not in self.rates and len(self.rates) >= MAX_DEMAND_MODELS:
            quietest = min(self.rates, key=lambda m: self.rate(m, now))
            del self.rates[quietest]
            self.fresh.pop(quietest, None)
            self.stopped.discard(quietest)
        first = self.rates[model][3] if model in self.rates else now
        self.rates[model] = (slow + 1.0 / DEMAND_TAU_S, fast + 1.0 / DEMAND_RISE_TAU_S,
                             now, first)
        if fresh or model not in self.fresh:
            self.stopped.discard(model)
            self.fresh[model] = (self._fresh_count(model, now) + 1.0 / DEMAND_TAU_S, now)

    def _fresh_count(self, model, now):
        count, then = self.fresh.get(model, (0.0, now))
        return count * math.exp(-(now - then) / DEMAND_TAU_S)

    def last_asked(self, model):
        """When `model` was last asked for (monotonic; -inf: not lately)."""
        return self.rates[model][2] if model in self.rates else -math.inf

    def _decayed(self, model, now):
        slow, fast, then, _ = self.rates.get(model, (0.0, 0.0, now, now))
        return (slow * math.exp(-(now - then) / DEMAND_TAU_S),
                fast * math.exp(-(now - then) / DEMAND_RISE_TAU_S))

    def rate(self, model, now):
        if model not in self.rates:
            return 0.0
        slow, fast = self._decayed(model, now)
        _, _, then, first = self.rates[model]
        age, quiet = now - first, now - then
        steady = self._since_first(slow, age, DEMAND_TAU_S)
        short = self._since_first(fast, age, DEMAND_RISE_TAU_S)
        if short > RISE_ABOVE * steady and fast * DEMAND_RISE_TAU_S >= SHIFT_EVIDENCE:
            return short  # rising: enough requests to tell
        new = self._since_first(self._fresh_count(model, now), age, DEMAND_TAU_S)
        unasked = now - self.fresh[model][1]  # since its last new conversation
        if model not in self.stopped and (
                quiet * steady >= FADE_GAP or unasked * new >= FADE_GAP or
                short < FADE_BELOW * steady and steady * DEMAND_RISE_TAU_S >= SHIFT_EVIDENCE):
            self.stopped.add(model)  # a busy model gone quiet: it would have had enough
        if model in self.stopped:
            return short if unasked < DEMAND_MIN_S else min(short, 1.0 / unasked)
        return steady

    @staticmethod
    def _since_first(count, age, window):
        """The rate a decayed count says for a model first asked for `age` seconds ago.
        A young model's window has held requests only that long, and its first request
        says only when it began (four in one second are 1.0 a second, not 1.5). Read as
        it stood, the long count of a model asked for 1.5 times a second said 0.7 at
        40 s and 0.9 at 60 s, once the short count no longer stood out as a rise: every
        model at warm-up and each riser after a shift moved the plan once more. Never
        below the plain count; the same as it once `age` is well past the window."""
        if count * window < SHIFT_EVIDENCE:
            return count
        span = max(DEMAND_MIN_S, age)
        opening = math.exp(-age / window) / window  # what the first request adds to it
        return max(count, (count - opening) / -math.expm1(-span / window))

    def fading(self, now):
        """The models that stopped and have had no new conversation for DEMAND_MIN_S
        (one just asked for afresh is wanted, however its counts read)."""
        return {m for m in self.stopped
                if m in self.fresh and now - self.fresh[m][1] >= DEMAND_MIN_S}

    def busiest(self, now, count):
        """The `count` models with the highest rate now, with it."""
        rates = sorted(((self.rate(m, now), m) for m in self.rates), reverse=True)
        return {m: r for r, m in rates[:count] if r > 1e-6}


def weighted_median(pairs):
    """The median of [(value, weight)]: the value at which half the weight is reached
    (half-way to the next, when it is reached exactly); statistics.median, weighed."""
    pairs = sorted(pairs)
    half, total = sum(w for _, w in pairs) / 2, 0.0
    for i, (value, weight) in enumerate(pairs):
        total += weight
        if total > half:
            return value
        if total == half:
            return (value + pairs[i + 1][0]) / 2
    return pairs[-1][0]


class PlanInputs:
    """What the placement plan is weighed from, read off the fleet and what was learned:
    each working node's room, slots and speed; each model's size, demand and load time."""

    def __init__(self, fleet, learner):
        self.fleet, self.learner = fleet, learner

    def nodes(self):
        """The nodes that take work, as the planner sees them: room (memory and
        OLLAMA_MAX_LOADED_MODELS), slots, and speed relative to the fastest."""
        working = sorted(self.fleet.working_loaders(), key=lambda n: n.node_id)
        fitted = self.learner.plan_speeds()
        mean = statistics.geometric_mean(fitted.values()) if fitted else 1.0
        speeds = {n.node_id: fitted.get(n.node_id, mean) * self._live_pace(n.node_id)
                  for n in working}
        fastest = max(speeds.values(), default=1.0)
        return [hc.PlanNode(n.node_id, memory=self._room(n), max_loaded=n.hb.max_loaded_models,
                            speed=max(0.01, speeds[n.node_id] / fastest),
                            slots=self.fleet.slots_for(n)) for n in working]

    def _live_pace(self, node_id):
        """How fast the answers streaming on a node go now against what was learned
        (Exchange.pace, from their chunks), when well below it; else 1. A node that
        slows down shows it in the first chunks of its answers, and the plan must not
        place a busy model on it until the first slow answer ends. (A late first token
        tells routing as much, but here it is mostly a load taking its time.) What was
        learned is the least a request gets with this many in flight (Speed.floor_tps,
        the test a finished answer's sharp drop meets): against the speed of a quieter
        moment, a crowded studio read as slowed by half, and the plan moved models off
        it and back."""
        now, level = time.monotonic(), self.fleet.node_active(node_id)
        paces = []
        for (nid, model), q in list(self.fleet.queues.items()):
            usual = self._usual_tps(nid, model, level) \
                if nid == node_id and q.running else None
            for t in q.running if usual else ():
                ex = t.exchange
                pace = ex.pace(now, usual, t.start) \
                    if ex is not None and ex.ttft is not None else None
                if pace is not None:
                    paces.append(pace)
        pace = statistics.median(paces) if paces else 1.0
        return pace if pace < LIVE_SLOW else 1.0

    def _usual_tps(self, node_id, model, level):
        """The decode speed a request of `model` on `node_id` is learned to get at
        least, with `level` in flight (None: nothing learned)."""
        speed = self.learner.get(node_id, model)
        floor = speed.floor_tps(level) if speed is not None and level else None
        if floor:
            return floor
        f = self.learner.forecast(node_id, model)
        return f.level_tps(level) if f is not None else None

    @staticmethod
    def _room(node):
        """Bytes the node can give models: what is free plus what its models hold,
        within its owner's ceiling (0: not known)."""
        hb = node.hb
        if not hb.mem_total:
            return 0
        room = hb.mem_available + sum(e.size for e in node.loaded.values())
        ceiling = (hb.capacity or {}).get("memory_ceiling") or 0
        return min(room, ceiling) if ceiling else room

    def models(self, nodes, rates, plan, fading=frozenset()):
        """The models worth planning: those in demand (`rates`: requests/s), loaded now
        or in the last `plan` (`fading`: those whose demand stopped, given no new
        place)."""
        names = set(rates)
        for node in nodes:
            names.update(self.fleet.nodes[node.node_id].loaded)
        if plan is not None:
            names.update(m for placed in plan.hot.values() for m in placed)
        models = (self._model(name, nodes, rates, name in fading) for name in sorted(names))
        return [m for m in models if m is not None]

    def _model(self, name, nodes, rates, fading=False):
        """The PlanModel of `name` (None: no working node has it). Where it is in
        memory (or on its way there) it loads for nothing."""
        holders = [self.fleet.nodes[n.node_id] for n in nodes
                   if name in self.fleet.nodes[n.node_id].models]
        if not holders:
            return None
        entry = holders[0].models[name]
        size = sized(entry)
        speeds = {n.node_id: n.speed for n in nodes}
        demand = rates.get(name, 0.0) * self.service_s(name, size, speeds)
        return hc.PlanModel(name, int(size * hc.LOAD_OVERHEAD), demand,
                            {n.node_id: 0.0 if name in n.loaded else self.load_s(n, name)
                             for n in holders},
                            "embedding" if entry.is_embedding else "chat", fading)

    def service_s(self, model, size, speeds):
        """Seconds one answer of `model` takes on a node of speed 1: as learned on the
        nodes that timed it (scaled by their speed), weighed against what the fleet's
        other models say of one its size as if that were SERVICE_PRIOR_ANSWERS answers;
        else a guess from its size alone. A riser's first answers are few and timed in
        the crush of its rise: taken alone, its demand read 3.8, 1.2 and 2.0 s/s in
        three plan versions, each moving models."""
        learned, answers = self._timed_s(model, speeds), self._answers(model)
        like = self._like_sized_s(model, size, speeds)
        if not (learned and like):
            return learned or like or self._guess_s(model, size)
        return (learned * answers + like * SERVICE_PRIOR_ANSWERS) / (
            answers + SERVICE_PRIOR_ANSWERS)

    def _like_sized_s(self, model, size, speeds):
        """An answer's seconds at speed 1 as the other models timed say, scaled by size
        (decoding reads all the weights for every token): those within LIKE_SIZE_SCALE
        of its size when there are any, else all; 0 if none was timed. Scaled from
        models a seventh its size, a 14B coder's answers read as 4-5 times too long
        (its demand as 9.9 s/s, and a plan put a 7B model on the slowed laptop); with
        nothing near its size, the fleet's far models still beat a guess."""
        timed = [(other, run_s) for name, other, run_s in self._timed_models(speeds)
                 if other and name != model]
        near = [(other, run_s) for other, run_s in timed
                if max(other, size) / min(other, size) <= LIKE_SIZE_SCALE]
        scaled = [run_s * size / other for other, run_s in near or timed]
        return statistics.median(scaled) if scaled and size else 0.0

    def _guess_s(self, model, size):
        """An answer's seconds at speed 1 when the fleet has timed nothing like it."""
        tps = GUESS_TPS_GB / max(0.5, size / 1e9)
        return self.learner.answer_tokens(model) / tps

    def _answers(self, model):
        """How many answers of `model` the fleet has timed."""
        return sum(s.samples for s in self.learner.by_model.get(model, {}).values())

    def _timed_s(self, model, speeds):
        """The learned run of one answer of `model`, at speed 1 (0: untimed): its
        prompt evaluation and its tokens at the steady decode speed, as Ollama timed
        them (a wait for a slot or for room inside Ollama is not work); else the
        router's own measure of its time on the node. The median over the nodes that
        timed it, each weighing as many answers as it timed: a node that timed two,
        one of them marked slow by a late first token (Learner.slowed), made a model of
        4 % of the requests read as 6 s/s of demand beside one that timed a dozen."""
        seen = []
        for node_id, s in list(self.learner.by_model.get(model, {}).items()):
            tps = self.learner.alone_tps(node_id, s)
            run_s = ((s.prompt_eval_ms or 0.0) / 1000 + s.tokens / tps
                     if s.tokens and tps else (s.service_ms or 0.0) / 1000)
            if run_s and node_id in speeds:
                seen.append((run_s * speeds[node_id], max(1, s.samples)))
        return weighted_median(seen) if seen else 0.0

    def _timed_models(self, speeds):
        """(model, size, seconds an answer takes at speed 1) for each model timed."""
        for model, by_node in list(self.learner.by_model.items())[:MAX_PLANNED_MODELS]:
            size = max((s.size for s in by_node.values()), default=0)
            run_s = self._timed_s(model, speeds)
            if run_s:
                yield model, size, run_s

    def load_s(self, node, model):
        """Seconds to load `model` on `node`: as learned, else guessed from its size."""
        size = sized(node.models.get(model))
        learned = self.learner.load_s(node.node_id, model, size)
        return learned or GUESS_LOAD_S + GUESS_LOAD_S_GB * size / 1e9


class Placement:
    """The placement plan: its inputs from the fleet and what was learned, its
    versions, and the view of it that routing, the Warmer and /fleet/status read."""

    def __init__(self, fleet, learner):
        self.fleet, self.learner = fleet, learner
        self.gauge = PlanInputs(fleet, learner)
        self.demand = Demand()
        self.asked = False  # a model the plan places nowhere was asked for
        self.plan = None  # hc.Plan
        self.inputs = {}, {}  # the last plan's {node_id: hc.PlanNode}, {name: hc.PlanModel}
        self.rates = {}  # model -> requests/s when the plan was built
        self.version = 0
        self.built_at = self.changed_at = 0.0  # monotonic
        self.done = collections.Counter()  # planned loads and unloads carried out
        self.replanning = None  # the replan under way (a task), shared by all who wait
        self.let_go = {}  # model -> monotonic time a client last unloaded it
        self.proposed = None  # a placement the last replan found better, to be confirmed

    def unloaded(self, model):
        """A client unloaded `model` through the router: no load ahead of requests
        brings it back until one asks for it."""
        if model in self.demand.rates:  # bounded as the demand is
            self.let_go[model] = time.monotonic()
        self.let_go = {m: t for m, t in self.let_go.items() if m in self.demand.rates}

    def count(self, model, fresh=True):
        """A request for `model` arrived (`fresh`: not the next turn of a conversation
        under way): its demand grows; a model the plan places nowhere makes the next
        plan due at once."""
        if not any(model in n.models for n in self.fleet.nodes.values() if n.loads_models):
            return  # a name no loading server has is not the plan's (or a client's free text)
        self.demand.count(model, time.monotonic(), fresh)
        if not self.places(model):
            self.asked = True

    def settled(self):
        """Has this version of the plan held PLAN_SETTLE_S?"""
        return time.monotonic() - self.changed_at >= PLAN_SETTLE_S

    def due(self):
        """Is it time to weigh the plan again?"""
        return self.asked or time.monotonic() - self.built_at >= PLAN_EVERY_S

    def kept_on(self, node_id):
        """The models the plan places on `node_id`."""
        return set(self.plan.hot.get(node_id, ())) if self.plan is not None else set()

    def places(self, model):
        """The node ids the plan places `model` on."""
        if self.plan is None:
            return set()
        return {n for n, names in self.plan.hot.items() if model in names}

    def has_room(self, model, node_id):
        """May `model` be loaded on `node_id` beside what the plan places there? (Yes
        where the plan places it, or in room the plan leaves free; yes before any plan.)"""
        if self.plan is None or node_id in self.places(model):
            return True
        nodes, models = self.inputs
        node, m = nodes.get(node_id), models.get(model)
        if node is None or m is None:
            return True  # a node or model the plan has not weighed yet
        return hc.fits_on(m, node, set(self.plan.hot.get(node_id, ())), models)

    async def ready_for(self, model):
        """Before a request for `model` is routed: when the plan places it nowhere and
        was not weighed since it was asked for, weigh it now (PLAN_SOON_S is too late:
        the request's cold load would go wherever a slot is free, and the next plan
        would move the model again). One replan at a time, shared by all who wait."""
        if self.plan is None or not self.asked or self.places(model) or \
                time.monotonic() - self.built_at < PLAN_SOON_S:
            return  # placed, or weighed a moment ago (and left out: no room for it)
        try:
            await self.replan_shared()
        except Exception:  # the request goes on without it; the duty will say why
            fleet_log.exception("weighing the placement plan for a request failed")

    def replan_shared(self):
        """The replan under way, or a new one; a waiter that is cancelled (its client
        left) does not cancel it."""
        if self.replanning is None or self.replanning.done():
            self.replanning = asyncio.ensure_future(self.replan())
        return asyncio.shield(self.replanning)

    async def replan(self):
        """Rebuild the plan from the last one; a new version if it places otherwise.
        The search runs in a thread: its time grows with nodes times models."""
        self.asked = False
        nodes = self.gauge.nodes()
        self.rates = self.demand.busiest(time.monotonic(), MAX_PLANNED_MODELS)
        models = self.gauge.models(nodes, self.rates, self.plan,
                                   self.demand.fading(time.monotonic()))
        plan = await asyncio.to_thread(hc.plan_placement, nodes, models, self._start(nodes))
        return self._adopt(plan, nodes, models)

    def _adopt(self, plan, nodes, models):
        """Take `plan` (or keep the last, if it is hardly better); count a new version."""
        now = time.monotonic()
        self.inputs = {n.node_id: n for n in nodes}, {m.name: m for m in models}
        if self._hardly_better(plan, nodes, models) or self._unconfirmed(plan):
            plan = hc.describe_plan({n: set(v) for n, v in self.plan.hot.items()},
                                    self.plan.reasons, nodes, self.inputs[1], {})
        placed = {n: names for n, names in plan.hot.items() if names}
        if placed != {n: v for n, v in (self.plan.hot if self.plan else {}).items() if v}:
            self.version += 1
            self.changed_at = now
            self.fleet.residency.plan_version = self.version
            if placed:
                fleet_log.info(f"placement plan {self.version}: " + "; ".join(
                    f"{n}: {', '.join(v)}" for n, v in sorted(placed.items())),
                    extra={"event": "placement_plan"})
                fleet_log.debug(f"placement plan {self.version} weighed",
                                extra={"event": "placement_inputs",
                                       "inputs": self._weighed(nodes, models)})
        self.plan, self.built_at = plan, now
        return plan

    def _unconfirmed(self, plan):
        """Is `plan` a change the replan before did not want? A change waits for a
        second replan in a row to want one too (the same change, or another: both found
        the plan in force worse by PLAN_MARGIN), unless it places a model in demand
        that the plan in force places nowhere, or loads nothing and leaves no model in
        demand placed nowhere (it keeps what is loaded, or drops only models no longer
        asked for or whose demand stopped): what the inputs of one moment say (a rate
        read between two bursts, a riser's first timings) made plans trade two models'
        places and trade them back a version later. (Waiting for two replans to find
        the same change held a riser on the mini, too slow for its demand, for half a
        minute: each replan found a better plan, but two near-equal ones in turn.
        Taken at once because it loaded nothing, a plan dropped a riser whose load was
        under way, to place the two models it was pushing out; the next plan placed the
        riser again at once, and so on each second.)"""
        placed = {n: v for n, v in plan.hot.items() if v}
        last = self.plan
        if last is None or placed == {n: v for n, v in last.hot.items() if v}:
            self.proposed = None
            return False
        before = {m for names in last.hot.values() for m in names}
        after = {m for names in placed.values() for m in names}
        new = [(n, m) for n, names in placed.items() for m in names
               if m not in last.hot.get(n, ())]
        loads_nothing = all(m in self.fleet.nodes[n].loaded for n, m in new
                            if n in self.fleet.nodes)
        wanted = {m for m, rate in self.rates.items() if rate > 0} - \
            self.demand.fading(time.monotonic())
        if any(m not in before and m in wanted for _, m in new) or \
                loads_nothing and not wanted & (before - after):
            self.proposed = None  # a model in demand placed at last, or nothing to load
            return False
        agreed, self.proposed = self.proposed is not None, placed
        if agreed:
            self.proposed = None
        return not agreed

    def _weighed(self, nodes, models):
        """What a plan version was built from, for the log: why the plan is what it is
        (node speeds and room, each model's rate and demand) can then be read back."""
        return {
            "nodes": {n.node_id: {"speed": round(n.speed, 3), "slots": n.slots,
                                  "memory_gb": round(n.memory / 1e9, 1),
                                  "max_loaded": n.max_loaded} for n in nodes},
            "models": {m.name: {"requests_per_s": round(self.rates.get(m.name, 0.0), 3),
                                "demand": round(m.demand, 3),
                                "size_gb": round(m.size / 1e9, 2)} for m in models},
            "loaded": {n.node_id: sorted(self.fleet.nodes[n.node_id].loaded)
                       for n in nodes if n.node_id in self.fleet.nodes}}

    def _hardly_better(self, plan, nodes, models):
        """Is `plan` within PLAN_MARGIN of the last one, which still fits the same
        nodes? Two models of about the same demand for one place would otherwise trade
        it back and forth as their rates drift, each trade a load and a new version."""
        last = self.plan
        if last is None or set(last.hot) != {n.node_id for n in nodes}:
            return False
        by_name = {m.name: m for m in models}
        if not all(self._fits(names, node, by_name) for node in nodes
                   for names in [last.hot[node.node_id]]):
            return False
        before = hc.placement_cost({n: set(v) for n, v in last.hot.items()}, nodes, by_name)
        after = hc.placement_cost({n: set(v) for n, v in plan.hot.items()}, nodes, by_name)
        return before - after <= PLAN_MARGIN * before

    @staticmethod
    def _fits(names, node, models):
        """Do these models, all of them weighed now, fit on `node` together?"""
        placed = set()
        for name in names:
            if name not in models or not hc.fits_on(models[name], node, placed, models):
                return False
            placed.add(name)
        return True

    def _start(self, nodes):
        """Where the search starts: the last plan, for the nodes it knew; what is
        loaded now, for the others. (A model its requests loaded where the plan does
        not place it is not a start: the plan weighs its load there as free,
        PlanInputs._model. Started from, the strays of a riser's first requests had
        the search move three other models out of their way.)"""
        last = self.plan.hot if self.plan is not None else {}
        return {n.node_id: list(last[n.node_id]) if n.node_id in last
                else list(self.fleet.nodes[n.node_id].loaded) for n in nodes}

    # -- routing follows the plan -----------------------------------------------------

    def steer(self, model, candidates, reasons):
        """(The candidates routing may use, those it holds back), the plan given: a
        node where `model` is hot (or loading) is always fine; while it is hot
        somewhere, a cold load only where the plan places it and its answer is expected
        sooner than there, counting the reloads of the planned models it would push
        out; while it is hot nowhere, where the plan places it; a model placed nowhere
        (or whose places cannot take it) loads where its answer is expected soonest,
        counting the reloads it causes (_cost_elsewhere), and no model with requests
        running (or on its way in) where another node can."""
        if self.plan is None or len(candidates) < 2:
            return candidates, []
        warm = [c for c in candidates if c.hot or c.loading_s]
        cold = [c for c in candidates if not (c.hot or c.loading_s)]
        # A node that joined since the plan was weighed is one it has no word on yet.
        places = self.places(model) | {c.node_id for c in candidates
                                       if c.node_id not in self.plan.hot}
        drained = self._drained(model, warm, places)
        if drained:
            warm = [c for c in warm if c not in drained]
            reasons += [f"{c.node_id}: the placement plan moved {model} to "
                        f"{', '.join(sorted(places & {w.node_id for w in warm}))}; "
                        f"its requests here finish, no new ones come" for c in drained]
        pool = cold  # the candidates weighed by the demand they push out
        if warm:
            keep = self._worth_loading(warm, cold, places)
            why = (f"{model} is hot elsewhere; a load here is not in the placement plan "
                   f"or no sooner than the wait there")
        elif any(c.node_id in places for c in cold):
            keep = [c for c in cold if c.node_id in places]
            why = f"the placement plan loads {model} elsewhere"
        else:
            # Two models placed nowhere would otherwise take turns pushing each other
            # out of the node with the least demand, each load thrown out half-way.
            pool = [c for c in cold if not c.evicts_busy] or \
                [c for c in cold if not self._throws_out_a_load(c)] or cold
            # Least demand pushed out alone sent a faded model's follow-up turns to the
            # slowed laptop, to answers sixteen times slower than on the studio.
            cost = self._cost_elsewhere if all(c.service_s for c in pool) \
                else self._demand_out  # nothing timed (learning off): demand alone
            costs = [(cost(c), c) for c in pool]
            least = min(x for x, _ in costs)
            keep = [c for x, c in costs if x <= least]
            why = f"loading {model} here would push out a busier model"
        held = [c for c in cold if c not in keep] + drained
        reasons += [f"{c.node_id}: " + (f"loading {model} here would push out "
                                        f"{c.evicts_busy}, which has requests running"
                                        if c.evicts_busy and c not in pool else why)
                    for c in held if c not in drained]
        return warm + keep, held

    def _drained(self, model, warm, places):
        """The warm candidates the plan moved `model` away from, while it is hot where
        the plan places it: sent nothing new, they go idle, and the Warmer can unload
        the model there for the one the plan put in its place. (Left to take requests,
        a busy model never went quiet, and the plan's moves waited behind it for
        forty seconds while strays were loaded around them.)"""
        if not any(c.hot and c.node_id in places for c in warm):
            return []
        return [c for c in warm if c.node_id not in places]

    def _throws_out_a_load(self, c):
        """Would a cold load here push out a model whose own load is still under way?"""
        node, now = self.fleet.nodes[c.node_id], time.monotonic()
        return any(node.loading_left(m, now) for m in c.evicts)

    def _worth_loading(self, warm, cold, places):
        """The cold candidates worth a load while the model is hot elsewhere: where the
        plan places it, and expected to answer sooner than where it is hot (its load,
        its answer's time there, and the reloads of the planned models it pushes out,
        against the wait and the answer's time on the soonest warm node: the wait
        alone kept a queue on the slowest machine, whose answers take four times
        longer, against a load on the fastest); while nothing is timed, where the plan
        places it (the scoring decides). A load that would answer sooner but where the
        plan does not place the model is not made: the plan is weighed again soon
        instead (its demand may need another place), so that every load is one the plan
        chose, unless the answer where the model is hot comes LOAD_ANYWAY times later:
        the plan lags a node that slowed."""
        planned = [c for c in cold if c.node_id in places]
        if not all(c.service_s for c in warm + cold):
            return planned
        wait = min(hc.expected_s(c) for c in warm)
        if any(self._load_cost(c) < wait for c in cold if c not in planned):
            self.asked = True
        # The plan is advice, not a prison: when it lags (a node slowed down and the
        # queue there grew), a load far sooner than that wait is made anyway; in the
        # place of a model the plan keeps there for its demand, only when the wait is
        # longer again (a queue of seconds on the laptop's small model had it load on
        # the desktop over the desktop's busy one, whose next request loaded it back,
        # a thrash a minute; a queue the client would give up on must move).
        return [c for c in cold if self._load_cost(c) * (
            1.0 if c in planned else LOAD_ANYWAY ** (1 + self._pushes_out_kept(c))) < wait]

    def _pushes_out_kept(self, c):
        """Would a cold load here push out a model the plan keeps here for its demand?"""
        return any(self._kept(m, c.node_id) for m in c.evicts)

    def _load_cost(self, c):
        """A cold load's seconds until its request is answered, and the reloads of the
        planned models it pushes out."""
        return self._answer_and_reloads(c, lambda m, kept: 1.0 if kept else 0.0)

    def _cost_elsewhere(self, c):
        """A cold load's seconds until its request is answered, and the reloads it is
        expected to cause: each model it pushes out costs its load times the chance
        that it is asked for within DEMAND_TAU_S, at its rate now; twice for one the
        plan keeps here (it is reloaded, or the plan moves)."""
        now = time.monotonic()
        return self._answer_and_reloads(c, lambda m, kept: (2 if kept else 1) * (
            1 - math.exp(-self.demand.rate(m, now) * DEMAND_TAU_S)))

    def _answer_and_reloads(self, c, weight):
        """hc.expected_s(c), and the loads of the models the load pushes out, each
        times weight(model, whether the plan keeps it here)."""
        node = self.fleet.nodes[c.node_id]
        return hc.expected_s(c) + sum(
            self.gauge.load_s(node, m) * w for m in c.evicts
            if (w := weight(m, self._kept(m, c.node_id))))

    def _kept(self, model, node_id):
        """Does the plan keep `model` on `node_id` for its demand?"""
        return node_id in self.places(model) and self.rates.get(model, 0.0) > 0

    def _demand_out(self, c):
        """The request rate of the models a cold load here pushes out, as it is now
        (a model the plan has not placed yet may be rising), those the plan keeps here
        counted twice (each is reloaded, or the plan moves)."""
        now = time.monotonic()
        return sum(self.demand.rate(m, now) * (2 if self._kept(m, c.node_id) else 1)
                   for m in c.evicts)

    # -- what the Warmer carries out ---------------------------------------------------

    def pending_loads(self):
        """(node, model) the plan places, asked for within PLAN_ASKED_S and since a
        client last unloaded it, not in memory nor on the way. A model nobody asked for
        lately is loaded by its next request, if it comes: when traffic stops, the
        demand that lingers in the counts moves nothing; and a model its user just
        unloaded (keep_alive 0, to free the memory) stays out until it is asked for."""
        if self.plan is None:
            return []
        now, out = time.monotonic(), []
        for node_id, names in sorted(self.plan.hot.items()):
            node = self.fleet.nodes.get(node_id)
            if node is None or node.accepts_work():
                continue
            out += [(node, m) for m in names if m not in node.loaded and
                    self.rates.get(m, 0.0) > 0 and m in node.models and
                    now - self.demand.last_asked(m) <= PLAN_ASKED_S and
                    self.demand.last_asked(m) > self.let_go.get(m, -math.inf)]
        return out

    def dropped(self, node):
        """Models in `node`'s memory that the plan does not place there, quietest first."""
        placed = set(self.plan.hot.get(node.node_id, ())) if self.plan else set()
        return sorted((m for m in node.loaded if m not in placed),
                      key=lambda m: self.rates.get(m, 0.0))

    # -- the view ---------------------------------------------------------------------

    def view(self):
        """/fleet/status's `placement`."""
        plan, now = self.plan, time.monotonic()
        since = time.time() - HEALTH_WINDOW_S
        return {
            "version": self.version,
            "age_s": round(now - self.changed_at, 1) if plan else None,
            "built_s_ago": round(now - self.built_at, 1) if plan else None,
            "nodes": {n: [{"model": m, "reason": plan.reasons.get((m, n), "")}
                          for m in names] for n, names in sorted(plan.hot.items())}
            if plan else {},
            "unplaced": dict(plan.unplaced) if plan else {},
            "node_speeds": {n: round(node.speed, 3)
                            for n, node in sorted(self.inputs[0].items())},
            "requests_per_min": {m: round(r * 60, 2) for m, r in sorted(
                self.demand.busiest(now, MAX_PLANNED_MODELS).items())},
            "planned_loads": self.done["load"], "planned_unloads": self.done["unload"],
            "thrashes": sum(self.fleet.residency.thrashes_since(since).values()),
        }


####################################################################################
# Fleet: the nodes, their queues and what they hold. Only Fleet changes a node's state,
# and every model load and unload goes through it and is recorded, whoever caused it.
####################################################################################


class NodeRefused(Exception):
    """A heartbeat the fleet will not take: the HTTP status and why."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Moved(Exception):
    """A waiting request is handed back for routing again (to `target` if given)."""

    def __init__(self, target=None):
        super().__init__(target)
        self.target = target


class Ticket:
    """One request's place in a SlotQueue: the work it brings (expected completion
    tokens), once it has a slot when it started, and what it is doing (its Exchange,
    whose answer shows how fast the node decodes right now)."""

    __slots__ = ("work", "start", "area", "fut", "exchange")

    def __init__(self, work):
        self.work, self.start, self.area, self.fut = work, 0.0, 0.0, None
        self.exchange = None


class InFlight:
    """Requests in flight on one node, across all its models (they share the machine's
    compute), and that count's integral over time: a request's mean concurrency is the
    integral over its run divided by the run's length. The same of the requests past
    their first token (decoding): the crowd an answer's tokens came out in, where the
    count in flight also holds requests waiting inside the server for a slot or a load."""

    __slots__ = ("active", "area", "decoding", "decode_area", "_t")

    def __init__(self):
        self.active, self.area, self._t = 0, 0.0, time.monotonic()
        self.decoding, self.decode_area = 0, 0.0

    def _advance(self):
        now = time.monotonic()
        self.area += self.active * (now - self._t)
        self.decode_area += self.decoding * (now - self._t)
        self._t = now
        return now

    def add(self, delta):
        now = self._advance()
        self.active += delta
        return now

    def decode(self, delta):
        now = self._advance()
        self.decoding += delta
        return now


class SlotQueue:
    """One node+model: `limit` requests in flight, the rest wait in arrival order. It
    keeps the work (expected tokens) running and waiting, for wait estimates, and, with
    the node's InFlight (shared by its queues), the time-weighted count in flight on the
    node, so each request knows the concurrency it ran at."""

    def __init__(self, limit, node_flight=None):
        self.limit = limit
        self.active = 0
        self.waiters = collections.deque()  # Tickets, oldest first
        self.work_active = self.work_waiting = 0.0
        self.started_sum = 0.0  # sum of the running requests' start times (monotonic)
        self.running = set()  # Tickets with a slot
        self.flight = node_flight or InFlight()
        self.last_done = 0.0  # monotonic time a request here last gave its slot back

    @property
    def waiting(self):
        return len(self.waiters)

    def _count(self, delta):
        self.active += delta
        return self.flight.add(delta)

    def _grant(self, ticket, now):
        ticket.start, ticket.area = now, self.flight.area
        self.work_active += ticket.work
        self.started_sum += now
        self.running.add(ticket)

    async def acquire(self, work=0.0):
        """Wait for a slot; returns the Ticket to release it with."""
        ticket = Ticket(work)
        if self.active < self.limit and not self.waiters:
            self._grant(ticket, self._count(1))
            return ticket
        fut = ticket.fut = asyncio.get_running_loop().create_future()
        self.waiters.append(ticket)
        self.work_waiting += work
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(ticket)  # the slot was handed to us as we were cancelled
            elif ticket in self.waiters:
                self.waiters.remove(ticket)
                self.work_waiting -= work
            raise
        return ticket

    def release(self, ticket):
        """Free a slot; returns the mean number in flight on the node while the ticket
        held it."""
        now = self.last_done = self._count(0)
        level = (self.flight.area - ticket.area) / (now - ticket.start) \
            if now > ticket.start else float(self.flight.active)
        self.work_active -= ticket.work
        self.started_sum -= ticket.start
        self.running.discard(ticket)
        if self.active > self.limit:  # the limit was lowered: shrink first
            self._count(-1)
            return level
        while self.waiters:
            waiter = self.waiters.popleft()
            self.work_waiting -= waiter.work
            if not waiter.fut.done():
                self._grant(waiter, now)
                waiter.fut.set_result(None)  # the slot passes on; active stays the same
                return level
        self._count(-1)
        return level

    def live_pace(self, now, usual_tps):
        """How fast the answers running here go now against `usual_tps` (1.0: as
        usual), the median of those that tell (Exchange.pace); None if none does."""
        seen = [t.exchange.pace(now, usual_tps, t.start) for t in self.running
                if t.exchange is not None]
        seen = [pace for pace in seen if pace is not None]
        return statistics.median(seen) if seen else None

    def remaining_tokens(self, tps):
        """Tokens the running requests still have to produce, each at `tps`."""
        elapsed = self.active * time.monotonic() - self.started_sum
        return max(0.0, self.work_active - tps * elapsed)

    def evict(self, count=None, target=None, newest=False):
        """Hand the `count` oldest waiting requests (all by default; the newest, those
        with the longest waits ahead of them, if `newest`) back for routing, `target`
        preferred; returns how many."""
        moved = 0
        while self.waiters and (count is None or moved < count):
            waiter = self.waiters.pop() if newest else self.waiters.popleft()
            self.work_waiting -= waiter.work
            if not waiter.fut.done():
                waiter.fut.set_exception(Moved(target))
                moved += 1
        return moved

    def set_limit(self, limit):
        self.limit = limit
        while self.active < self.limit and self.waiters:
            waiter = self.waiters.popleft()
            self.work_waiting -= waiter.work
            if not waiter.fut.done():
                self._grant(waiter, self._count(1))
                waiter.fut.set_result(None)


class Node:
    """A machine running Ollama, as its last heartbeat (an hc.Heartbeat) describes it."""

    def __init__(self, hb, local, source):
        self.node_id, self.local = hb.node_id, local
        self.source = source  # the address its heartbeats come from (None: our own poll)
        self.hb = hb
        self.ollama_url, self.host, self.port = "", "", 0
        self.status = ONLINE
        self.last_seen = 0.0  # monotonic
        self.offline_since = None  # monotonic, while gone (offline or left)
        self.models = {}  # canonical name -> hc.ModelEntry, as /api/tags lists it
        self.loaded = {}  # canonical name -> hc.ModelEntry, as /api/ps lists it
        self.unloaded_at = {}  # canonical name -> monotonic time it left memory
        self.router_saw = {}  # canonical name -> (monotonic time, loaded?) we caused
        self.loading = {}  # canonical name -> monotonic time a load we sent should be done
        self.cpu_history = collections.deque(maxlen=6)
        self.media_host, self.media_port = "", 0  # its agent's media server, if any
        self.media_models = {}  # kind -> {canonical name: name as the agent lists it}
        self.signs = False  # its agent signs heartbeats (unchecked by a router with no token)

    def take_media(self, media):
        """What the agent serves itself (hc.Heartbeat's media section), for routing."""
        self.media_models = {}
        if media is None:
            self.media_host, self.media_port = "", 0
            return
        self.media_host, self.media_port, _ = hc.split_url(media["url"])
        for kind, key in ((hc.IMAGE, "image_models"), (hc.TRANSCRIPTION, "transcribe_models")):
            self.media_models[kind] = {hc.canonical_model(m): m for m in media[key]}

    def loading_left(self, model, now):
        """Seconds until a load the router sent here should be done (0: none under way)."""
        ready = self.loading.get(model)
        return max(0.0, ready - now) if ready else 0.0

    def serves_itself(self, model, kind):
        """Does this node's agent serve `model` of `kind` (an image or speech model)?"""
        return model in self.media_models.get(kind, ())

    @property
    def speaks_ollama(self):
        """Is its server an Ollama? (Else one of OpenAI's API: sent OPENAI_SERVED as
        they are and Ollama's inference routes translated, never Ollama's pulls, loads,
        unloads or model management.)"""
        return self.hb.server_kind == hc.OLLAMA_KIND

    @property
    def loads_models(self):
        """Can the router load and unload models on its server (Ollama's, LM Studio's,
        llama-server's router mode)? A server that cannot holds what it lists."""
        return self.hb.server_loads

    def own_name(self, model):
        """What the node's server calls `model` (the router knows it by Ollama's
        lookup form: lower case, with a tag)."""
        return self.models.get(model, NO_ENTRY).name or model

    def serves(self, model, kind=None):
        """Can this node answer `model` for a request of `kind`? Text and embeddings:
        its Ollama has the model. Images: its agent serves it, or its Ollama has it
        as an image model (one that lists no capabilities, an older Ollama, is let
        through: its own answer then says). Speech: only its agent."""
        if kind not in hc.MEDIA_KINDS:
            return model in self.models
        if self.serves_itself(model, kind):
            return True
        entry = self.models.get(model)
        if kind != hc.IMAGE or entry is None:
            return False
        return not entry.capabilities or "image" in entry.capabilities

    def capabilities(self):
        """What the node can do, for /fleet/status and the dashboard."""
        found = set()
        for entry in self.models.values():
            found.update({"completion": hc.CHAT, "embedding": hc.EMBEDDING,
                          "image": hc.IMAGE}.get(c, "")
                         for c in entry.capabilities or ("completion",))
        found.update(kind for kind, models in self.media_models.items() if models)
        return [k for k in (hc.CHAT, hc.EMBEDDING, hc.IMAGE, hc.TRANSCRIPTION) if k in found]

    def accepts_work(self):
        """Why this node takes no new request now, or None if it does."""
        if self.status == OFFLINE:
            return "offline"
        if self.status == LEFT:
            return "left the fleet"
        if self.status == DRAINING:
            return "draining"
        if self.hb.paused:
            return self.paused_why()
        if not self.hb.reachable:
            return "its Ollama is unreachable"
        return None

    def paused_why(self):
        """'paused: camera in use', as the node's capacity learner said; else 'paused'."""
        return f"paused: {self.hb.paused_reason}" if self.hb.paused_reason else "paused"

    def capacity_inputs(self):
        """What the scoring takes from the node's capacity section (none: its CPU)."""
        cap, power = self.hb.capacity, self.hb.power
        avoided = {"on_battery": True} if power and power["on_battery"] and \
            power["policy"] == "avoid" else {}
        if cap is None:
            return avoided
        return {"availability": cap["availability"], "availability_trend": cap["trend"],
                "memory_ceiling": cap["memory_ceiling"], **avoided}

    def cpu_trend(self):
        h = list(self.cpu_history)
        if len(h) < 2:
            return 0.0
        half = len(h) // 2
        return sum(h[half:]) / (len(h) - half) - sum(h[:half]) / half


class Residency:
    """Which models are in which node's memory: what its heartbeats say, overruled for
    a while by the loads and unloads the router itself causes (it knows of them first),
    and every move, for the health checks; `busy(node, model)` tells which models have
    requests here, for what a cold load would evict."""

    def __init__(self, notify, busy, last_done):
        self.notify, self.busy, self.last_done = notify, busy, last_done
        self.model_moves = collections.deque(maxlen=10000)  # (time, load|unload, node, model)
        self.plan_version = 0  # the placement plan's (Placement sets it)
        self.left = {}  # (node_id, model) -> (monotonic, plan version) it last left memory
        self.thrashes = collections.deque(maxlen=10000)  # (time, node_id, model)

    def take(self, node, hb, record):
        """The node's models as it reports them; `record` the moves (not on the first
        heartbeat: what a node holds when it joins was loaded before we knew it)."""
        node.models = hb.models
        now = time.monotonic()
        # A heartbeat read just before a load or unload we caused can arrive just after
        # it: for a few heartbeats our own word wins, so no move is recorded that never was.
        node.router_saw = {m: seen for m, seen in node.router_saw.items()
                           if now - seen[0] <= ROUTER_WORD_S}
        loaded = dict(hb.loaded)
        for name, (_, is_loaded) in node.router_saw.items():
            if not is_loaded:
                loaded.pop(name, None)
            elif name not in loaded:
                loaded[name] = node.loaded.get(name) or seen_loaded(node, name)
        for name in node.loaded.keys() - loaded.keys():
            self._record(node, name, "unload")
        if record:
            for name in loaded.keys() - node.loaded.keys():
                self._record(node, name, "load")
        node.loaded = loaded

    # -- moves the router causes ------------------------------------------------------

    def _record(self, node, model, kind):
        now, key = time.monotonic(), (node.node_id, model)
        if kind == "unload":
            node.unloaded_at[model] = now
            self.left.pop(key, None)
            if len(self.left) >= hc.LEARNED_MAX_ROWS:
                self.left.pop(next(iter(self.left)))
            self.left[key] = (now, self.plan_version)
        else:
            self._note_thrash(key, now)
        self.model_moves.append((time.time(), kind, node.node_id, model))

    def _note_thrash(self, key, now):
        """A load of a model that left this node's memory a moment ago, with the plan
        unchanged since, is a thrash: one of the two moves undid the other for nothing
        (a move the plan made on purpose comes with a new plan version)."""
        left = self.left.pop(key, None)
        if left and now - left[0] <= THRASH_WINDOW_S and left[1] == self.plan_version:
            self.thrashes.append((time.time(), *key))

    def thrashes_since(self, since):
        """Counter of (node_id, model) thrashes since `since` (wall time)."""
        return collections.Counter((node, model) for t, node, model in self.thrashes
                                   if t > since)

    def mark_loaded(self, node, model):
        """The router saw `model` load on `node` (a cold request, a pre-warm)."""
        node.router_saw[model] = (time.monotonic(), True)
        if model not in node.loaded:
            node.loaded[model] = seen_loaded(node, model)
            self._record(node, model, "load")
            self.notify()

    def start_load(self, node, model, victims, load_s):
        """A cold load the router is sending: from now on the model counts as on its way
        in (done in about `load_s`) and what it pushes out as gone, busy or not (Ollama
        evicts a busy runner once it is idle), so that the requests that follow wait for
        the load rather than send a victim back there to be loaded again after it."""
        now = time.monotonic()
        node.loading = {m: t for m, t in node.loading.items() if t > now}
        node.loading[model] = now + load_s
        self.mark_loaded(node, model)
        for victim in victims:
            self.mark_unloaded(node, victim)

    def finish_load(self, node, model, loaded):
        """The request that loaded `model` ended: it is in (or, if `loaded` is false,
        the load failed and the next heartbeat says what is there), unless a load the
        router sent since has pushed it out: Ollama evicts a busy runner once its last
        request ends, which is now."""
        node.loading.pop(model, None)
        pushed_out = node.router_saw.get(model, (0.0, True))[1] is False
        if loaded and not pushed_out:
            self.mark_loaded(node, model)
        elif not loaded and node.router_saw.pop(model, None) is not None:
            node.loaded.pop(model, None)

    def mark_unloaded(self, node, model):
        """`model` left `node`'s memory because the router asked (keep_alive 0), or a
        load the router sent there pushed it out."""
        node.router_saw[model] = (time.monotonic(), False)
        if node.loaded.pop(model, None) is not None:
            self._record(node, model, "unload")
            self.notify()

    def moves_since(self, since, kind):
        """Counter of (node_id, model) moves of `kind` since `since` (wall time)."""
        return collections.Counter((node, model) for t, k, node, model in self.model_moves
                                   if t > since and k == kind)

    def victims(self, node, model, size, keep=()):
        """The loaded models a cold load of `model` (`size` bytes) would push out of
        `node`'s memory: past OLLAMA_MAX_LOADED_MODELS, or to make room. The router
        names them itself and unloads them before the load (Proxy._make_room), so that
        Ollama's own choice never decides: idle ones first (a busy one goes once it is
        idle, the load waiting for it), then those the placement plan does not `keep`
        here, then the one whose last request here ended first (one the router never
        sent a request counts as oldest), then by expires_at."""
        others = sorted((m for m in node.loaded if m != model), key=lambda m: (
            self.busy(node, m), m in keep, self.last_done(node, m),
            node.loaded[m].expires_at or ""))
        count = 0
        limit = node.hb.max_loaded_models
        if limit and len(others) >= limit:
            count = len(others) - limit + 1
        short = size * hc.LOAD_OVERHEAD - node.hb.mem_available if node.hb.mem_total else 0
        short -= sum(node.loaded[m].size for m in others[:count])
        while count < len(others) and short > 0:
            short -= node.loaded[others[count]].size
            count += 1
        return tuple(others[:count])


class Fleet:
    """Every node and queue, a record of model moves, and a signal for those waiting
    on a change (the holding queue)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.nodes = {}
        self.queues = {}  # (node_id, model) -> SlotQueue
        self.flights = {}  # node_id -> InFlight, shared by its queues
        self.concurrency = {}  # (node_id, model) -> requests in flight worth having, learned
        self.started = time.monotonic()
        self._changed = asyncio.get_running_loop().create_future()
        self.residency = Residency(self.notify_change, self.busy, self.last_done)
        self.alerts = Alerts(cfg)  # what happens to the fleet, said to its owner
        self.waker = Waker(cfg.wake_target)

    # -- change notification ------------------------------------------------------

    def notify_change(self):
        if not self._changed.done():
            self._changed.set_result(None)
        self._changed = asyncio.get_running_loop().create_future()

    async def wait_change(self, timeout):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._changed)

    # -- heartbeats ---------------------------------------------------------------

    def model_key(self, name):
        """The name the router knows a model by (`name` in Ollama's lookup form): an
        alias's first name (FLEET_MODEL_ALIASES), else `name` itself."""
        return self.cfg.model_aliases.get(name, name)

    def named(self, entries):
        """A node's model list keyed by model_key (each entry keeps the node's own
        name); of two names of one model on one node, the first listed."""
        out = {}
        for name, entry in entries.items():
            out.setdefault(self.model_key(name), entry)
        return out

    def apply_heartbeat(self, hb, source=None, local=False):
        """Take a checked heartbeat (hc.Heartbeat) from `source` (an address; None for
        the router's own poll); returns the node, or raises NodeRefused."""
        node = known = self.nodes.get(hb.node_id)
        if node is None:
            self._make_room(source)
            node = self.nodes[hb.node_id] = Node(hb, local, source)
            fleet_log.info("node joined", extra={"node_id": node.node_id,
                                                 "url": hb.ollama_url, "client": source})
        elif node.source != source:
            self._rebind(node, source)
        elif node.ollama_url != hb.ollama_url and node.status not in GONE \
                and not local and not node.local:
            # Two machines with one name overwrite each other; say so once per change.
            fleet_log.warning(f"node id '{node.node_id}' now reports {hb.ollama_url} "
                              f"instead of {node.ollama_url}: two machines with one name? "
                              f"Give each its own FLEET_NODE_NODE_ID",
                              extra={"node_id": node.node_id, "event": "node_id_conflict"})
        was_paused = known is not None and node.hb.paused and node.paused_why()
        node.local, node.hb = local, hb
        node.ollama_url = hb.ollama_url
        node.host, node.port, _ = hc.split_url(hb.ollama_url)
        node.take_media(hb.media)
        node.last_seen = time.monotonic()
        if hb.reachable:
            hb.models, hb.loaded = self.named(hb.models), self.named(hb.loaded)
            self.residency.take(node, hb, record=known is not None)
        # else: keep what it had; an Ollama restart should read as "unreachable" (503,
        # held), not as "model gone" (404).
        node.cpu_history.append(hb.cpu_percent)
        self._set_status(node, LEFT if hb.leaving else DRAINING if hb.draining else ONLINE)
        for (nid, model), q in self.queues.items():
            if nid == node.node_id:
                q.set_limit(self.limit_for(node, model))
        self._note_pause(node, was_paused)
        self.notify_change()
        return node

    def _note_pause(self, node, was_paused):
        """A node that pauses itself (its owner needs the machine) gets no new work; the
        requests waiting for it move, those running finish. Logged once per change."""
        now_paused = node.hb.paused and node.paused_why()
        if now_paused != was_paused:
            fleet_log.info(f"node {now_paused or 'resumed'}", extra={
                "node_id": node.node_id, "event": "node_paused" if now_paused
                else "node_resumed"})
        if now_paused:
            self.evict_node(node, now_paused)

    def _make_room(self, source):
        """Refuse a new node past FLEET_MAX_NODES (the one gone longest is forgotten
        first) or past MAX_NODES_PER_ADDRESS ids from one address."""
        if source is not None and sum(n.source == source and n.status not in GONE
                                      for n in self.nodes.values()) >= MAX_NODES_PER_ADDRESS:
            raise NodeRefused(429, f"{source} already reports {MAX_NODES_PER_ADDRESS} nodes")
        if len(self.nodes) < self.cfg.max_nodes:
            return
        gone = [n for n in self.nodes.values() if n.status in GONE]
        if not gone:
            raise NodeRefused(503, f"the fleet has {self.cfg.max_nodes} nodes online, the "
                                   f"most it takes; a node joins once another goes offline")
        self.remove(min(gone, key=lambda n: n.offline_since or 0.0).node_id)

    def _rebind(self, node, source):
        """A node id heard from another address: taken over only once it is gone."""
        if node.status not in GONE:
            raise NodeRefused(409, f"node id '{node.node_id}' belongs to "
                                   f"{node.source or 'this router (its local Ollama)'} while "
                                   f"it is online; give this machine its own "
                                   f"FLEET_NODE_NODE_ID")
        fleet_log.warning(f"node id '{node.node_id}' moved from {node.source} to {source}",
                          extra={"node_id": node.node_id, "event": "node_moved"})
        node.source = source

    def mark_pulled(self, node, entries):
        """A pull, copy, create or delete finished on `node`: its models on disk, as it
        now lists them (a list of /api/tags entries). Each entry passes the heartbeat's
        checks or is left out, so what a node says here can no more break a listing,
        a route or the dashboard than what it says in a heartbeat."""
        models, (refused, why) = hc.read_model_list(entries)
        node.models = self.named(models)
        if refused:
            fleet_log.warning(f"left out {refused} entries of the node's model list: {why}",
                              extra={"node_id": node.node_id, "event": "models_refused"})
        self.notify_change()

    def mark_deleted(self, node, model):
        """A delete of `model` finished on `node`: routing stops sending it there."""
        if node.models.pop(model, None) is not None:
            self.notify_change()

    # -- status -------------------------------------------------------------------

    def refresh_status(self):
        """Move nodes to degraded / offline as heartbeats go missing, and forget those
        offline for FLEET_FORGET_OFFLINE_AFTER; one that left sends none and is not
        missed: it is forgotten after LEFT_LISTED_S."""
        now = time.monotonic()
        for node in list(self.nodes.values()):
            silent = now - node.last_seen
            if silent >= self.cfg.heartbeat_offline and node.status != LEFT:
                self._set_status(node, OFFLINE)
            elif silent >= self.cfg.heartbeat_timeout and node.status == ONLINE:
                self._set_status(node, DEGRADED)
            listed = self.cfg.forget_offline_after
            if node.status == LEFT:
                listed = min(LEFT_LISTED_S, listed)
            if node.status in GONE and now - node.offline_since >= listed:
                self.remove(node.node_id)

    def _set_status(self, node, status):
        if node.status == status:
            return
        level = logging.INFO if status in (ONLINE, DRAINING, LEFT) else logging.WARNING
        said = "node left the fleet (its agent stopped)" if status == LEFT else f"node {status}"
        fleet_log.log(level, said, extra={"node_id": node.node_id, "event": f"node_{status}"})
        self.alerts.node_status(node, node.status, status,
                                bool(node.hb.wake) and self.waker.target != "off")
        if node.status == OFFLINE:
            self.waker.heard(node)  # back: if it was woken, how long that took
        node.status = status
        node.offline_since = time.monotonic() if status in GONE else None
        if status in (*GONE, DRAINING):
            self.evict_node(node, status)
        self.notify_change()

    def evict_node(self, node, why):
        """Send the requests waiting for `node` elsewhere; those running finish there."""
        moved = sum(q.evict() for (nid, _), q in self.queues.items() if nid == node.node_id)
        if moved:
            fleet_log.info(f"moved {moved} queued requests off a node that is {why}",
                           extra={"node_id": node.node_id, "event": "requeue"})

    def remove(self, node_id):
        """Forget a node, and its queues that hold no request."""
        if self.nodes.pop(node_id, None):
            fleet_log.info("node removed", extra={"node_id": node_id})
            for key in [k for k, q in self.queues.items()
                        if k[0] == node_id and not q.active and not q.waiters]:
                del self.queues[key]
            if not any(k[0] == node_id for k in self.queues):
                self.flights.pop(node_id, None)
            self.notify_change()

    # -- queues -------------------------------------------------------------------

    def slots_for(self, node):
        return node.hb.num_parallel or self.cfg.default_num_parallel

    def limit_for(self, node, model):
        """Requests the router lets run at once on this node+model: its Ollama's slots,
        or fewer where more in flight was learned not to add throughput (the rest wait
        here, where they can still go to another node)."""
        if any(model in served for served in node.media_models.values()):
            return node.hb.media["concurrency"]  # the agent's own tool runs at once
        slots = self.slots_for(node)
        return min(slots, self.concurrency.get((node.node_id, model)) or slots)

    def set_concurrency(self, node, model, limit):
        key = (node.node_id, model)
        if self.concurrency.get(key) == limit:
            return
        if len(self.concurrency) >= hc.LEARNED_MAX_ROWS and key not in self.concurrency:
            self.concurrency.pop(next(iter(self.concurrency)))
        self.concurrency[key] = limit
        q = self.queues.get(key)
        if q is not None:
            q.set_limit(self.limit_for(node, model))
        fleet_log.info(f"{model} on {node.node_id}: {limit} requests in flight at most",
                       extra={"node_id": node.node_id, "model": model,
                              "event": "concurrency_learned"})

    def queue(self, node, model):
        key = (node.node_id, model)
        q = self.queues.get(key)
        if q is None:
            flight = self.flights.setdefault(node.node_id, InFlight())
            q = self.queues[key] = SlotQueue(self.limit_for(node, model), flight)
        return q

    def node_active(self, node_id):
        """Requests running on a node now, whatever their model."""
        flight = self.flights.get(node_id)
        return flight.active if flight else 0

    def in_flight(self, node_id):
        """Requests running or queued on a node (a draining agent waits for 0)."""
        return sum(q.active + q.waiting for (nid, _), q in self.queues.items()
                   if nid == node_id)

    def busy(self, node, model):
        """Has this node+model requests running or queued here?"""
        q = self.queues.get((node.node_id, model))
        return bool(q and (q.active or q.waiters))

    def last_done(self, node, model):
        """When a request for `model` on `node` last ended (monotonic; 0: never)."""
        q = self.queues.get((node.node_id, model))
        return q.last_done if q else 0.0

    def free_hot_slots(self, node, model):
        """Free slots on a node where `model` is loaded (the only place to move work)."""
        if node.accepts_work() or model not in node.loaded:
            return 0
        q = self.queues.get((node.node_id, model))
        busy = (q.active + q.waiting) if q else 0
        return max(0, self.limit_for(node, model) - busy)

    def rebalance(self, worth_moving=None):
        """Move queued requests to nodes where their model is hot and slots are free (and,
        if `worth_moving(node_id, target, model)` says so, they would be answered sooner)."""
        moved, free = 0, {}
        for (node_id, model), q in list(self.queues.items()):
            for target in self.nodes.values():
                if not q.waiters:
                    break
                if target.node_id == node_id:
                    continue
                key = (target.node_id, model)
                if key not in free:
                    free[key] = self.free_hot_slots(target, model)
                    if free[key] and worth_moving and not worth_moving(node_id, target, model):
                        free[key] = 0
                count = q.evict(free[key], target.node_id) if free[key] else 0
                free[key] -= count  # moved requests arrive there a moment later
                moved += count
        if moved:
            fleet_log.info(f"rebalanced {moved} queued requests", extra={"event": "rebalance"})
        return moved

    # -- views --------------------------------------------------------------------

    def warm_until(self):
        return self.started + self.cfg.startup_window

    def warming_up(self):
        """Just started: nodes may not have reported yet, so 'unknown model' can wait."""
        return time.monotonic() < self.warm_until()

    def holders(self, model, kind=None):
        """Nodes that have `model` on disk (or, for an image or speech request, serve
        it; see Node.serves), whatever their state."""
        return [n for n in self.nodes.values() if n.serves(model, kind)]

    def knows_model(self, model):
        """Does any node list `model`? (Only those become metric labels.)"""
        return any(model in n.models or model in n.loaded for n in self.nodes.values())

    def online_nodes(self):
        return [n for n in self.nodes.values() if n.status not in GONE]

    def working_nodes(self):
        """Nodes that take new requests now."""
        return [n for n in self.nodes.values() if n.accepts_work() is None]

    def working_ollamas(self):
        """Working nodes whose server is an Ollama: the only ones the router pulls
        onto or manages models on."""
        return [n for n in self.working_nodes() if n.speaks_ollama]

    def working_loaders(self):
        """Working nodes whose server loads and unloads models when asked (Ollama, LM
        Studio, llama-server's router mode): the nodes the placement plan places
        models on. A server that cannot holds what it lists, outside the plan."""
        return [n for n in self.working_nodes() if n.loads_models]

    def best_holder(self, model):
        """A node that can answer about `model` now, hot ones first."""
        holders = [n for n in self.online_nodes() if model in n.models and n.hb.reachable
                   and n.speaks_ollama]
        holders.sort(key=lambda n: (n.status != ONLINE, model not in n.loaded))
        return holders[0] if holders else None

    def merged_models(self):
        """Every model on any online node, once: the newest copy's entry, named as the
        router knows it where that is an alias's name (else as its node lists it), with
        `nodes`: each node that has it, its kind of server and its name for it there."""
        merged, where = {}, collections.defaultdict(list)
        for node in self.online_nodes():
            for name, entry in node.models.items():
                known = merged.get(name)
                if known is None or entry.modified_at > known.modified_at:
                    merged[name] = entry
                where[name].append({"node_id": node.node_id, "server": node.hb.server_kind,
                                    "name": entry.name})
        listed = []
        for name in sorted(merged):
            out = merged[name].json()
            if hc.canonical_model(out["name"]) != name:  # known by an alias's name
                out["name"] = out["model"] = name
            listed.append({**out, "nodes": where[name]})
        return listed

    def agent_models(self):
        """The image and speech models online nodes' agents serve themselves, sorted."""
        return sorted({name for node in self.online_nodes()
                       for models in node.media_models.values() for name in models.values()})

    def running_models(self):
        """/api/ps across the fleet: each loaded model with the node that holds it."""
        models = [{**entry.json(), "node_id": node.node_id, "server": node.hb.server_kind}
                  for node in self.online_nodes() for entry in node.loaded.values()]
        models.sort(key=lambda m: m.get("expires_at") or "", reverse=True)
        return models


####################################################################################
# Learning: how fast each node+model answers, kept across restarts
####################################################################################


class Speed:
    """One node+model as observed: fast-reacting averages, a slow baseline, a window of
    recent requests for percentiles, and decode speed by the number of requests that
    were in flight, from which the concurrency worth having is learned."""

    ALPHA = 0.5  # weight of the newest request: a slowdown shows within two requests
    BASELINE_ALPHA = 0.05  # the long-run speed a sharp drop is measured against
    WINDOW = 20
    AVERAGED = ("ttft_ms", "cold_ms", "load_ms", "prompt_eval_ms", "queue_ms", "decode_tps",
                "prompt_tps", "latency_ms", "service_ms", "tokens")
    MAX_LEVEL = 32  # requests in flight tracked for the concurrency curve
    LEVEL_SAMPLES = 3  # a level counts once it has this many requests
    # One more request in flight must add at least half of what it would if throughput
    # grew in proportion (from 2 to 3: +25 %; from 10 to 11: +5 %), else it is not worth it.
    LEVEL_GAIN = 0.5
    # ... and each request must run at least this much slower than at the level below:
    # high up, one more request's share is a few per cent, as big as the noise.
    LEVEL_SLOWER = 0.1
    # Held at its learned concurrency, a node is never timed above it: after this long,
    # what was seen up there is forgotten, so one more in flight is tried again (the
    # owner's job may have ended). Costs a few requests at one level above, every while.
    LEVEL_STALE_S = 600.0
    STALE_S = 120.0  # unsampled this long, a slowed node is taken at its usual speed
    __slots__ = ("samples", *AVERAGED, "baseline_tps", "concurrency", "size", "levels",
                 "crowds", "updated_at", "recent")

    def __init__(self):
        self.samples = 0
        for field in self.AVERAGED:
            setattr(self, field, None)
        self.baseline_tps = self.concurrency = None
        self.size = 0
        self.levels = {}  # requests in flight -> [decode tokens/s each, samples, when]
        # Answers decoding on the node (Exchange.decode_crowd) -> the same: learned
        # afresh after a restart, in minutes (levels are kept).
        self.crowds = {}
        self.updated_at = 0.0
        self.recent = collections.deque(maxlen=self.WINDOW)  # (ttft_ms, decode_tps)

    def add(self, sample, level=None, crowd=None):
        """Fold in one completed request: a dict of AVERAGED fields, None where unknown;
        `level` is the mean number of requests in flight while it ran, `crowd` of
        answers decoding while its own did. Returns the factor of a sharp drop in its
        decode speed, if it showed one (else None)."""
        tps = sample.get("decode_tps")
        # Judged against the answers decoding beside it where that is known: a request
        # waiting inside the server for a slot or a load counts in flight but slows no
        # one, and against the speed of a level that held such waits, a studio's crowd
        # of answers of its two models read as the machine slowing to half.
        floor = None if tps is None else self.floor_tps(crowd, self.crowds) if crowd \
            else self.floor_tps(level) if level else None
        drop = tps / floor if floor and tps < LIVE_SLOW * floor else None
        if drop:
            self.slow_down(drop)  # a sharp drop: taken at once, not half-way
        self.samples += 1
        weight = max(self.ALPHA, 1.0 / self.samples)
        for field in self.AVERAGED:
            value = sample.get(field)
            if value is not None:
                old = getattr(self, field)
                setattr(self, field, value if old is None else old + weight * (value - old))
        if tps is not None:
            self.baseline_tps = tps if self.baseline_tps is None else \
                self.baseline_tps + max(self.BASELINE_ALPHA, 1.0 / self.samples) * (
                    tps - self.baseline_tps)
            if level:
                self._add_level(min(self.MAX_LEVEL, max(1, round(level))), tps)
            if crowd:
                self._add_level(min(self.MAX_LEVEL, max(1, round(crowd))), tps, self.crowds)
        self.recent.append((sample.get("ttft_ms"), tps))
        self.updated_at = time.time()
        return drop

    def floor_tps(self, level, curve=None):
        """The least per-request speed the curve (levels, or crowds) allows at `level`:
        the level's own, else the nearest timed level below it shared out (n requests on
        a machine that does not scale at all each get 1/n of it); None below every timed
        level."""
        curve = self.levels if curve is None else curve
        level = min(self.MAX_LEVEL, max(1, round(level)))
        timed = [k for k in self.timed(curve) if k <= level]
        if not timed:
            return None
        below = max(timed)
        return curve[below][0] * below / level

    def steady_tps(self):
        """The long-run decode speed, or the current one when it has dropped sharply
        below it (slow_down took it at once)."""
        if self.decode_tps and self.baseline_tps and \
                self.decode_tps < LIVE_SLOW * self.baseline_tps:
            return self.decode_tps
        return self.baseline_tps

    def alone_tps(self):
        """A request's decode speed with the fewest others beside it (the curve's
        lowest level timed LEVEL_SAMPLES times; a sharp drop lowers it at once), else
        steady_tps: the machine's own speed, which its crowds do not lower. What the
        placement plan weighs: the long-run figure, timed mostly in crowds, read a busy
        studio (four streams, three at full speed) as no faster than a desktop of nine
        tenths its speed, and its answers as a third longer than they are."""
        timed = self.timed(self.levels)
        return self.levels[min(timed)][0] if timed else self.steady_tps()

    def timed(self, curve):
        """The levels of `curve` (levels, or crowds) timed LEVEL_SAMPLES times."""
        return [k for k, v in curve.items() if v[1] >= self.LEVEL_SAMPLES]

    def fewest_decoding(self):
        """(The fewest answers decoding beside its own, itself counted, that it was
        timed at: LEVEL_SAMPLES times if any was, else once; its tokens/s there), or
        None before any."""
        low = min(self.timed(self.crowds) or self.crowds, default=None)
        return None if low is None else (low, self.crowds[low][0])

    def crowd_factor(self, crowd):
        """How many times faster its answers ran with fewer decoding beside them (the
        fewest timed LEVEL_SAMPLES times) than in `crowd` (timed as often), at most as
        many times as `crowd` is larger; None if not timed so."""
        timed = self.timed(self.crowds)
        if crowd not in timed or min(timed) >= crowd or not self.crowds[crowd][0]:
            return None
        low = min(timed)
        return min(max(self.crowds[low][0] / self.crowds[crowd][0], 1.0), crowd / low)

    def slow_down(self, factor):
        """The node decodes `factor` (< 1) times as fast as learned, at every level (its
        owner's job takes the machine, whatever runs on it): so the next forecast reads
        the new speed, not the half-way average of the old and the first slow answer.
        The curve keeps its shape, and so the concurrency learned from it."""
        if self.decode_tps:
            self.decode_tps *= factor
        for entry in (*self.levels.values(), *self.crowds.values()):
            entry[0] *= factor
        self.updated_at = time.time()

    def _add_level(self, level, tps, curve=None):
        entry = (self.levels if curve is None else curve).setdefault(level, [tps, 0, 0.0])
        entry[1] += 1
        entry[0] += max(self.ALPHA, 1.0 / entry[1]) * (tps - entry[0])
        entry[2] = time.time()

    def _forget_above(self, limit, now):
        """Forget the levels above `limit` that have gone untimed for LEVEL_STALE_S."""
        for level in [k for k, v in self.levels.items()
                      if k > limit and now - v[2] > self.LEVEL_STALE_S]:
            del self.levels[level]

    def best_concurrency(self, slots):
        """The requests in flight beyond which total tokens/s stops rising (slots when
        the curve has not shown it yet): the first level, among those timed, that adds
        less than LEVEL_GAIN of the proportional gain over the one below it, with each
        request LEVEL_SLOWER slower there."""
        below = None  # (level, total tokens/s)
        for level in sorted(self.timed(self.levels)):
            if level > slots:
                break
            total = level * self.levels[level][0]
            if below and total < below[1] * (
                    1 + self.LEVEL_GAIN * (level - below[0]) / below[0]) and \
                    total / level < below[1] / below[0] * (1 - self.LEVEL_SLOWER):
                return below[0]
            if below is None or total > below[1]:
                below = (level, total)
        return slots

    def settle_concurrency(self, slots):
        """Move the learned concurrency one step towards the curve's best; returns it."""
        now = self.concurrency or slots
        self._forget_above(now, time.time())
        target = self.best_concurrency(slots)
        self.concurrency = min(slots, now + (target > now) - (target < now))
        return self.concurrency

    def tokens_per_s(self, level=None):
        """Per-request decode speed with `level` requests in flight (None: unknown). Left
        unsampled for STALE_S, a node that slowed down (and so lost its traffic) is
        taken at its usual speed again, so it is tried again."""
        entry = self.levels.get(level) if level else None
        tps = entry[0] if entry and entry[1] >= self.LEVEL_SAMPLES else self.decode_tps
        if tps and self.baseline_tps and tps < self.baseline_tps and \
                time.time() - self.updated_at > self.STALE_S:
            return self.baseline_tps if entry is None else tps * self.baseline_tps / (
                self.decode_tps or self.baseline_tps)
        return tps

    def percentile(self, index, q):
        """The q-th percentile (0-100) of a recent field (0: ttft_ms, 1: decode_tps)."""
        values = sorted(r[index] for r in self.recent if r[index] is not None)
        if not values:
            return None
        return values[min(len(values) - 1, int(q / 100 * len(values)))]

    def row(self, node_id, model):
        levels = json.dumps({str(k): [round(v[0], 3), v[1], round(v[2], 1)]
                             for k, v in self.levels.items()})
        return {"node_id": node_id, "model": model, "samples": self.samples,
                **{f: getattr(self, f) for f in self.AVERAGED}, "concurrency": self.concurrency,
                "size": self.size, "levels": levels, "updated_at": self.updated_at}

    @classmethod
    def from_row(cls, row):
        """A saved row back (a row from an older router may lack the newer columns)."""
        speed = cls()
        speed.samples = int(row.get("samples") or 0)
        for field in cls.AVERAGED:
            if isinstance(row.get(field), (int, float)):
                setattr(speed, field, float(row[field]))
        speed.baseline_tps = speed.decode_tps
        if isinstance(row.get("concurrency"), int) and row["concurrency"] > 0:
            speed.concurrency = row["concurrency"]
        speed.size = row.get("size") if isinstance(row.get("size"), int) else 0
        speed.updated_at = float(row.get("updated_at") or 0.0)
        speed.levels = cls._read_levels(row.get("levels"), speed.updated_at)
        return speed

    @classmethod
    def _read_levels(cls, text, updated_at):
        """A saved curve; a level saved without its time (an older router's) is taken
        as timed when its row was."""
        try:
            levels = json.loads(text) if isinstance(text, str) else {}
            return {int(k): [float(v[0]), int(v[1]),
                             float(v[2]) if len(v) > 2 else updated_at]
                    for k, v in levels.items() if 1 <= int(k) <= cls.MAX_LEVEL and v[0] > 0}
        except (ValueError, TypeError, IndexError, AttributeError):
            return {}  # a damaged curve is relearned, not fatal


def sized(entry):
    """A model's size for estimates by size (`entry`: a ModelEntry, or None): an
    embedding model's speed says nothing about a chat model's, nor the reverse, so
    those are left out (0)."""
    return 0 if entry is None or entry.is_embedding else entry.size


NO_ENTRY = hc.ModelEntry("")  # a model a node does not list: nothing known of it


def seen_loaded(node, model):
    """The /api/ps entry of a model the router saw load on `node` before a heartbeat
    says so: what its disk entry says of it (its memory use and expiry not known yet)."""
    disk = node.models.get(model)
    if disk is None:
        return hc.ModelEntry(model, loaded=True)
    return hc.ModelEntry(model, size=disk.size, digest=disk.digest, details=disk.details,
                         loaded=True)


# Decode speed falls about as the weights grow (each token reads them all), but only
# between models alike: a model under ESTIMATE_MIN_BYTES is no language model to scale
# from (a test blob, a stub: scaled from a 2 GB model, a 4 KB one was shown at 23
# million tokens/s and 0.0 ms), and sizes more than ESTIMATE_MAX_SCALE apart differ in
# more than size (fixed per-token costs below, memory that spills over above). Such a
# model gets no estimate: it has no basis until it answers once.
ESTIMATE_MIN_BYTES = 50 * 10**6  # Ollama's smallest chat model, smollm:135m, is ~90 MB
ESTIMATE_MAX_SCALE = 8.0


def comparable_sizes(known, size):
    """May a model of `size` bytes be estimated from one of `known` bytes, by size?"""
    if min(known, size) < ESTIMATE_MIN_BYTES:
        return False
    return max(known, size) / min(known, size) <= ESTIMATE_MAX_SCALE


def _ratio(part, whole):
    return part / whole if part and whole else None


DEFAULT_ANSWER_TOKENS = 200  # a guess for a model no node has answered with yet
LIVE_MIN_CHUNKS = 5  # chunks an answer must have streamed before its speed is read
LIVE_SLOW = 0.6  # answers streaming under this share of the learned speed: a slowdown
LATE_FIRST, LATE_MIN_S = 3.0, 1.0  # a first token this many times late (and this long)
FIRST_FLOOR_S = 0.05  # the least wait for a first token taken as expected
# A streamed answer with no first token this long (and LATE_FIRST times its forecast)
# may be moved to another node: longer than a fresh long prompt takes on a usual node.
MOVE_LATE_MIN_S = 2.0
MOVE_GAIN = 0.8  # a queued request moves to another node's queue to be answered in 80 %
LATE_CUT_MIN = 0.25  # late first tokens cut the learned speed to this share, at most


class Forecast:
    """What one more request would cost on one node+model, from what was learned (or
    estimated from the fleet): read by the scheduler's wait and speed signals."""

    __slots__ = ("tps", "level_tps", "ttft_s", "service_only_s", "load_s", "basis")

    def __init__(self, tps, ttft_s, service_only_s, load_s, basis, level_tps=None):
        self.tps, self.ttft_s, self.load_s, self.basis = tps, ttft_s, load_s, basis
        self.service_only_s = service_only_s  # a request's run time when tokens/s is unknown
        self.level_tps = level_tps or (lambda level: tps)

    def slowed(self, factor):
        """This forecast with decoding `factor` (< 1) times as fast."""
        return Forecast(self.tps * factor if self.tps else self.tps, self.ttft_s,
                        self.service_only_s / factor, self.load_s, self.basis,
                        lambda level: (self.level_tps(level) or 0.0) * factor or None)

    def service_s(self, tokens, level):
        """Seconds a request of `tokens` runs once it has a slot, `level` in flight."""
        tps = self.level_tps(level)
        if tps and tokens:
            return self.ttft_s + tokens / tps
        return self.service_only_s or 0.0

    def work_ahead_s(self, q, limit, level=None):
        """Seconds before a new request gets a slot in `q`: the tokens still to come
        from those running (each assumed to progress at the learned rate with `level`
        in flight on the node, default `limit`) and those queued, over the queue's
        learned total rate. A fluid estimate, not a count."""
        if q is None or q.active + q.waiting < limit:
            return 0.0
        tps = self.level_tps(max(level or limit, limit))
        if not tps:
            return (q.active + q.waiting - limit + 1) * self.service_only_s / limit
        remaining = q.remaining_tokens(tps)
        ahead = q.work_waiting + remaining * min(1.0, (q.waiting + 1) / max(1, q.active))
        return ahead / (tps * limit) + q.waiting * self.ttft_s / limit


class Learner:
    """What the fleet has learned of each node+model's speed: fed by every completed
    request, read by routing and /fleet/status, saved in latency.db (learned_speed)."""

    MAX_PAIRS = hc.LEARNED_MAX_ROWS
    SAVE_EVERY_S = 30.0

    def __init__(self):
        self.speeds = {}  # (node_id, model) -> Speed
        self.by_model = collections.defaultdict(dict)  # model -> {node_id: Speed}
        self.by_node = collections.defaultdict(dict)  # node_id -> {model: Speed}
        self.dirty = False

    def _add(self, node_id, model, speed):
        if len(self.speeds) >= self.MAX_PAIRS:  # forget the stalest pair
            n, m = min(self.speeds, key=lambda k: self.speeds[k].updated_at)
            del self.speeds[(n, m)], self.by_model[m][n], self.by_node[n][m]
            for index, key in ((self.by_model, m), (self.by_node, n)):
                if not index[key]:
                    del index[key]
        self.speeds[(node_id, model)] = self.by_model[model][node_id] = \
            self.by_node[node_id][model] = speed
        return speed

    def observe(self, node_id, model, ex, hot, size=0, level=None, crowd=None):
        """Fold in one completed request (its Exchange); returns the node+model's Speed."""
        u = ex.usage
        eval_s, prompt_s = _ratio(u.get("eval_ns"), 1e9), _ratio(u.get("prompt_eval_ns"), 1e9)
        # A whole (non-streamed) answer's first byte is its last: no time to first token.
        ttft_ms = ex.ttft * 1000 if ex.ttft is not None and ex.stream else None
        load_ms = _ratio(u.get("load_ns"), 1e6)
        latency_ms = (time.monotonic() - ex.t0) * 1000
        queue_ms = ex.queue_wait * 1000 if ex.queue_wait is not None else None
        sample = {  # hot None: sent while a load was under way (neither hot nor cold)
            "ttft_ms": ttft_ms if hot else None,
            "cold_ms": (load_ms or ttft_ms) if hot is False else None,  # a cold load's cost
            "load_ms": load_ms,
            "prompt_eval_ms": _ratio(u.get("prompt_eval_ns"), 1e6),
            "queue_ms": queue_ms,
            "decode_tps": _ratio(u.get("completion_tokens"), eval_s),
            "prompt_tps": _ratio(u.get("prompt_tokens"), prompt_s),
            "latency_ms": latency_ms,
            "service_ms": latency_ms - (queue_ms or 0.0) if hot else None,
            "tokens": u.get("completion_tokens"),
        }
        speed = self.speeds.get((node_id, model)) or self._add(node_id, model, Speed())
        speed.size = size or speed.size
        drop = speed.add(sample, level, crowd)
        if drop:
            # The machine slowed (its owner's job), not the model: its other models
            # are as slow. Left at their old speeds, they held the plan's figure for
            # the node half-way, and as answers streamed there or not, the plan read
            # it at a quarter, then two thirds, and moved models each time.
            for other in self.by_node[node_id].values():
                if other is not speed:
                    other.slow_down(drop)
        self.dirty = True
        return speed

    def get(self, node_id, model):
        return self.speeds.get((node_id, model))

    def slowed(self, node_id, model, factor):
        """A request there was seen to go `factor` (< 1) times as fast as learned: cut
        to that, but never below LATE_CUT_MIN of the long-run speed its answers timed.
        (Cut again at each late first token of a queue behind the slowed laptop, its
        speed fell to a thirtieth of what its answers then timed, and the plan read the
        laptop as good for nothing.)"""
        speed = self.get(node_id, model)
        if speed is None:
            return
        if speed.decode_tps and speed.baseline_tps:
            factor = max(factor, LATE_CUT_MIN * speed.baseline_tps / speed.decode_tps)
        if factor < 1:
            speed.slow_down(factor)
            self.dirty = True

    def answer_tokens(self, model, limit=0):
        """Completion tokens a request is expected to produce: what this model's answers
        averaged across the fleet (the node does not change the answer), within the
        client's limit."""
        seen = [s.tokens for s in self.by_model.get(model, {}).values() if s.tokens]
        mean = statistics.median(seen) if seen else None
        if mean is None:
            return float(limit or DEFAULT_ANSWER_TOKENS)
        return min(mean, limit) if limit else mean

    def forecast(self, node_id, model, size=0):
        """A Forecast for one more request on this node+model, or None if the fleet
        knows nothing that bears on it."""
        speed = self.get(node_id, model)
        load_s = self.load_s(node_id, model, size)
        if speed is not None and (speed.decode_tps or speed.service_ms):
            # Before the first token: Ollama's own prompt evaluation (a router-timed first
            # byte would count the network, or a whole answer that was not streamed).
            prompt_s = (speed.prompt_eval_ms or 0.0) / 1000
            return Forecast(speed.tokens_per_s(), prompt_s, (speed.service_ms or 0.0) / 1000,
                            load_s, "learned", speed.tokens_per_s)
        guess = self.estimate(node_id, model, size)
        if guess is None:
            return None
        return Forecast(guess["decode_tps"], guess["prompt_eval_ms"] / 1000, 0.0, load_s,
                        guess["basis"])

    def load_s(self, node_id, model, size=0):
        """Expected seconds of a cold load before the first token: as timed here, else
        this node's (else the fleet's) load rate applied to the model's size, else 0."""
        speed = self.get(node_id, model)
        if speed is not None and speed.cold_ms:
            return speed.cold_ms / 1000
        if not size:
            return 0.0
        rates = [s.size / s.cold_ms for s in self.by_node.get(node_id, {}).values()
                 if s.cold_ms and s.size]
        rates = rates or [s.size / s.cold_ms for s in self.speeds.values()
                          if s.cold_ms and s.size]
        return size / statistics.median(rates) / 1000 if rates else 0.0

    # -- estimates for a node+model never timed -------------------------------------

    def node_factor(self, node_id):
        """How fast this node decodes against the rest of the fleet, on the models both
        have timed (geometric mean of the ratios). A node that has timed nothing the
        others have is taken as slow as the slowest that has (1.0 if none has): a
        guess, made prudent because an optimistic one sends it work it may take many
        seconds over (its first answers tell, within a few chunks)."""
        factor = self._shared_factor(node_id)
        if factor is not None:
            return factor
        known = [f for f in map(self._shared_factor, self.by_node) if f is not None]
        return min(known, default=1.0)

    def plan_speeds(self):
        """Each node's steady decode speed relative to the fastest, fitted over every
        model it and the others have timed (herd_common.fit_speeds); the placement
        plan's, where node_factor's prudence (an untimed node is the slowest) would
        make it move models off every machine it has not timed yet."""
        observations = [(n, m, self.alone_tps(n, s), s.samples) for (n, m), s in
                        list(self.speeds.items()) if s.alone_tps()]
        sizes = {m: s.size for (n, m), s in self.speeds.items()}
        return hc.fit_speeds(observations, sizes)

    def alone_tps(self, node_id, speed):
        """The speed of one answer of `speed`'s model with nothing else decoding on
        `node_id`, for the placement plan: as timed so, else as timed in the fewest
        others' company times as much as that company slowed another model of the
        node timed both in it and in less (a crowd slows every model of a machine
        alike: they share its processor and memory bandwidth), else the faster of that
        company's speed and speed.alone_tps(). (A model loaded on a busy node is timed
        only in company: the studio's new models read at half their speed beside its
        older one at full, and, linked by one of them to the desktop that had timed it
        alone, the fit read the studio at half the desktop's speed.)"""
        fewest = speed.fewest_decoding()
        if fewest is None:
            return speed.alone_tps()
        crowd, tps = fewest
        if crowd <= 1:
            return tps
        known = [(other.crowds[crowd][1], factor) for other in
                 list(self.by_node.get(node_id, {}).values()) if other is not speed
                 for factor in [other.crowd_factor(crowd)] if factor]
        return tps * max(known)[1] if known else max(tps, speed.alone_tps() or 0.0)

    def _shared_factor(self, node_id):
        """node_factor from the models this node and others have timed, or None."""
        logs = []
        for model, speed in self.by_node.get(node_id, {}).items():
            if not speed.decode_tps:
                continue
            others = [s.decode_tps for n, s in self.by_model[model].items()
                      if n != node_id and s.decode_tps]
            if others:
                logs.append(math.log(speed.decode_tps / statistics.median(others)))
        return math.exp(sum(logs) / len(logs)) if logs else None

    def estimate(self, node_id, model, size=0):
        """Figures for a node+model never timed: the same model elsewhere, scaled by
        this node's relative speed; else this node's other models of a comparable size,
        scaled by size (decode speed falls about as the weights grow: it reads them all
        for every token); else None (no basis yet)."""
        elsewhere = [s for n, s in self.by_model.get(model, {}).items() if n != node_id
                     and s.decode_tps and s.latency_ms]
        if elsewhere:
            factor = self.node_factor(node_id)
            return {"decode_tps": statistics.median(s.decode_tps for s in elsewhere) * factor,
                    "latency_ms": statistics.median(s.latency_ms for s in elsewhere) / factor,
                    "prompt_eval_ms": statistics.median(
                        s.prompt_eval_ms or 0.0 for s in elsewhere) / factor,
                    "basis": "the same model on other nodes"}
        here = [s for m, s in self.by_node.get(node_id, {}).items() if m != model
                and s.decode_tps and s.latency_ms and comparable_sizes(s.size, size)]
        if here:
            tps = statistics.median(s.decode_tps * s.size / size for s in here)
            return {"decode_tps": tps, "latency_ms": statistics.median(
                s.latency_ms * size / s.size for s in here),
                "prompt_eval_ms": statistics.median(
                    (s.prompt_eval_ms or 0.0) * size / s.size for s in here),
                "basis": "this node's other models, by size"}
        return None

    # -- keeping it --------------------------------------------------------------------

    def rows(self):
        self.dirty = False
        return self.export()

    def export(self):
        return [speed.row(n, m) for (n, m), speed in self.speeds.items()]

    def take(self, rows):
        """Another router's rows (FLEET_LEARNED_FROM, checked by learned_rows): each
        node+model it timed more lately than this router did is taken whole."""
        for row in rows[:self.MAX_PAIRS]:
            key = (row["node_id"], row["model"])
            mine = self.speeds.get(key)
            if mine is None:
                self._add(*key, Speed.from_row(row))
            elif row["updated_at"] > mine.updated_at:
                self.speeds[key] = self.by_model[key[1]][key[0]] = \
                    self.by_node[key[0]][key[1]] = Speed.from_row(row)
        self.dirty = True

    def load(self, rows):
        for row in rows[:self.MAX_PAIRS]:
            if (row["node_id"], row["model"]) not in self.speeds:
                self._add(row["node_id"], row["model"], Speed.from_row(row))

    def seed(self, rows):
        """Start from past traces when nothing was saved: [(node, model, latency s, n)]."""
        for node_id, model, latency_s, samples in rows:
            if (node_id, model) not in self.speeds:
                speed = self._add(node_id, model, Speed())
                speed.samples, speed.latency_ms = samples, latency_s * 1000

    def view(self, node_id, models, limits):
        """/fleet/status's `learned` for one node: every model it has, timed or guessed;
        `limits` maps each model to the requests in flight the router allows there."""
        out = {}
        for model in sorted(models):
            speed = self.get(node_id, model)
            if speed is not None and speed.samples:
                out[model] = {
                    "samples": speed.samples, "estimated": False,
                    "tokens_per_s": _round(speed.decode_tps),
                    "prompt_tokens_per_s": _round(speed.prompt_tps),
                    "ttft_ms": _round(speed.ttft_ms), "ttft_p50_ms": _round(
                        speed.percentile(0, 50)), "ttft_p75_ms": _round(speed.percentile(0, 75)),
                    "cold_load_ms": _round(speed.cold_ms), "load_ms": _round(speed.load_ms),
                    "prompt_eval_ms": _round(speed.prompt_eval_ms),
                    "queue_ms": _round(speed.queue_ms), "latency_ms": _round(speed.latency_ms),
                    "answer_tokens": _round(speed.tokens),
                    "concurrency": limits[model],
                    "tokens_per_s_by_concurrency": {
                        str(k): _round(speed.levels[k][0])
                        for k in sorted(speed.timed(speed.levels))},
                    "tokens_per_s_by_answers_streaming": {
                        str(k): _round(speed.crowds[k][0])
                        for k in sorted(speed.timed(speed.crowds))}}
                continue
            guess = self.estimate(node_id, model, sized(models[model]))
            if guess:
                out[model] = {"samples": 0, "estimated": True, "basis": guess["basis"],
                              "tokens_per_s": _round(guess["decode_tps"]), "ttft_ms": None,
                              "latency_ms": _round(guess["latency_ms"]),
                              "concurrency": limits[model]}
        return out

    def speed_drops(self, share=0.5, min_samples=10):
        """(node_id, model, now tokens/s, usual tokens/s) where decoding fell sharply."""
        return [(n, m, s.decode_tps, s.baseline_tps) for (n, m), s in self.speeds.items()
                if s.samples >= min_samples and s.decode_tps and s.baseline_tps
                and s.decode_tps < share * s.baseline_tps]


def _round(value):
    return round(value, 1) if value is not None else None


####################################################################################
# Stats: what the router counts, for /metrics, /fleet/status and the health checks
####################################################################################


class Stats:
    """Request counters and histograms, and routing events: since start and recent."""

    RECENT = 10000  # events kept with their time, for the health checks' window

    def __init__(self, known_model):
        self.known_model = known_model  # a model some node lists: it may be a label
        self.metrics = hc.Metrics()
        for name, kind, text in METRICS:
            self.metrics.describe(name, kind, text)
        self.events = collections.Counter()  # event -> count since start
        self.recent = collections.deque(maxlen=self.RECENT)  # (time, event)

    def count_event(self, event, message, ex=None, level=logging.INFO, client=None):
        """Count a decision (context protection, a reaped request, a refused heartbeat...)
        and log it."""
        self.events[event] += 1
        self.recent.append((time.time(), event))
        fleet_log.log(level, message, extra={"event": event, "client": client,
                                             "request_id": ex.request_id if ex else None,
                                             "node_id": ex.node_id if ex else None,
                                             "model": ex.model if ex else None})

    def events_since(self, since):
        return collections.Counter(e for t, e in self.recent if t > since)

    def label(self, model):
        """A model as a metric label: names no node lists fold into 'other', so a client
        sending made-up names cannot grow /metrics without end."""
        return model if self.known_model(model) else "other"

    def count_request(self, ex, row):
        """Fold one finished request (its trace row) into the counters."""
        m, node, status = self.metrics, ex.node_id or "", row["status"]
        model = self.label(ex.served_model)
        m.inc("herd_requests_total", (("model", model), ("node", node), ("status", status),
                                      ("kind", ex.kind)))
        m.observe("herd_request_duration_seconds", (("model", model),),
                  row["latency_ms"] / 1000)
        if ex.ttft is not None:
            m.observe("herd_time_to_first_token_seconds", (("model", model),), ex.ttft)
        for kind in ("prompt", "completion"):
            tokens = row[f"{kind}_tokens"]
            if tokens:
                m.inc("herd_tokens_total", (("model", model), ("kind", kind)), tokens)
        if ex.retries:
            m.inc("herd_retries_total", (("model", model),), ex.retries)
        if ex.served_model != ex.model:
            m.inc("herd_fallbacks_total", (("requested", self.label(ex.model)),
                                           ("served", model)))
        if status == hc.CANCELLED:
            m.inc("herd_cancellations_total", (("model", model),))

    def render(self, fleet, holding, traces_dropped, connections):
        """The Prometheus text: counters, plus gauges read from live state now."""
        gauges = [("herd_holding_requests", (), holding),
                  ("herd_trace_rows_dropped_total", (), traces_dropped),
                  ("herd_zombies_reaped_total", (), self.events["zombie_reaped"])]
        gauges += [("herd_connection_events_total", (("event", k),), connections[k])
                   for k in CONNECTION_COUNTERS]
        for (node_id, model), q in fleet.queues.items():
            labels = (("node", node_id), ("model", model))
            gauges.append(("herd_queue_in_flight", labels, q.active))
            gauges.append(("herd_queue_waiting", labels, q.waiting))
        for node in fleet.nodes.values():
            for status in NODE_STATUSES:
                gauges.append(("herd_node_status", (("node", node.node_id), ("status", status)),
                               int(node.status == status)))
            for kind, value in (("total", node.hb.mem_total),
                                ("available", node.hb.mem_available)):
                gauges.append(("herd_node_memory_bytes", (("node", node.node_id),
                                                          ("kind", kind)), value))
        for event, count in self.events.items():
            gauges.append(("herd_events_total", (("event", event),), count))
        return self.metrics.render(gauges)


####################################################################################
# Pulls and pre-warm: models the router puts on nodes by itself
####################################################################################


class Puller:
    """One pull per model at a time; requests that need the model wait on it."""

    KEEP_S = 3600  # how long a finished pull's progress stays in /fleet/status
    MAX_SHOWN = 64

    def __init__(self, cfg, fleet, tasks):
        self.cfg, self.fleet, self.tasks = cfg, fleet, tasks
        self.running = {}  # model -> Future of the pull
        self.progress = {}  # model -> {node_id, status, completed, total, ...}
        self._finished = {}  # model -> monotonic time its pull ended

    def check_name(self, name):
        """A name a pull may use (see check_registry); ValueError otherwise."""
        return check_registry(name, self.cfg.registries_allowed, "pulls from")

    def shown(self):
        """Pulls for /fleet/status: running ones, and those that ended in the last hour."""
        now = time.monotonic()
        for model, ended in list(self._finished.items()):
            if now - ended > self.KEEP_S or len(self.progress) > self.MAX_SHOWN:
                self.progress.pop(model, None)
                del self._finished[model]
        return self.progress

    def pick_node(self, wanted=None):
        """The node to pull onto: the one named, else the one with most free memory."""
        nodes = [n for n in self.fleet.working_ollamas() if n.status == ONLINE]
        if wanted:
            return next((n for n in nodes if n.node_id == wanted), None)
        return max(nodes, key=lambda n: n.hb.mem_available, default=None)

    async def ensure(self, model, name, not_found):
        """Pull `model` (once, however many requests ask); raise 404 if it fails."""
        try:
            self.check_name(name or model)
        except ValueError as e:
            raise RouteError(404, f"{not_found}; {e}") from None
        fut = self.running.get(model)
        if fut is None:
            fut = self.running[model] = asyncio.get_running_loop().create_future()
            # Every waiter may have given up by the time it fails: mark it seen.
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            self.tasks.spawn(self._pull(model, name or model, fut), f"auto-pull {model}")
        try:
            async with asyncio.timeout(self.cfg.auto_pull_timeout):
                await asyncio.shield(fut)
        except TimeoutError:
            raise RouteError(503, f"model '{name}' is still being pulled; try again "
                                  f"shortly", [(b"retry-after", b"10")]) from None
        except hc.UpstreamError as e:
            raise RouteError(404, f"{not_found}, and pulling it failed: {e}") from None

    async def _pull(self, model, name, fut):
        node = self.pick_node()
        try:
            if node is None:
                raise hc.UpstreamError("pull", "no online node to pull onto")
            await self.pull(node, name, model)
            fut.set_result(node)
        except (hc.UpstreamError, ValueError) as e:
            fut.set_exception(hc.UpstreamError("pull", str(e)))
            self.fleet.alerts.pull_failed(model, e)
        finally:
            self.running.pop(model, None)

    async def pull(self, node, name, model):
        """Stream Ollama's /api/pull on `node`, keeping its progress for /fleet/status."""
        state = self.progress[model] = {"node_id": node.node_id, "status": "starting",
                                        "started": hc.now_rfc3339()}
        fleet_log.info("pulling model", extra={"node_id": node.node_id, "model": model,
                                               "event": "pull"})
        up = await hc.Upstream.connect(node.host, node.port, self.cfg.connect_timeout)
        try:
            await up.send_request(b"POST", b"/api/pull", [(b"content-type", b"application/json")],
                                  hc.dump_json({"model": name, "stream": True}))
            status, _ = await up.receive_head(self.cfg.first_byte_timeout)
            pending = b""
            while data := await up.receive_data(self.cfg.chunk_timeout):
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    self._note(state, line, status)
            self._note(state, pending, status)
        except hc.UpstreamError as e:
            state["status"] = f"failed: {e}"[:300]
            raise
        finally:
            up.close()
            self._finished[model] = time.monotonic()
        if state.get("status") != "success":
            raise hc.UpstreamError("pull", state.get("error") or f"ended with {state['status']}")
        await self.refresh_models(node)

    @staticmethod
    def _note(state, line, status):
        if not line.strip():
            return
        try:
            event = json.loads(line)
        except ValueError:
            event = {"error": line.decode("utf-8", "replace")[:200]}
        if not isinstance(event, dict):
            event = {"error": "the node sent a line that is not a JSON object"}
        if status >= 400 or "error" in event:
            state["status"] = "failed"
            state["error"] = hc.printable(str(event.get("error", f"status {status}")))[:300]
            raise hc.UpstreamError("pull", state["error"])
        if isinstance(event.get("status"), str):
            state["status"] = hc.printable(event["status"])[:100]
        for key in ("completed", "total"):  # what Ollama counts its progress in: bytes
            if isinstance(event.get(key), int) and not isinstance(event[key], bool):
                state[key] = event[key]

    async def refresh_models(self, node):
        """Re-read a node's models now (a pull just added one), not at its next beat."""
        try:
            tags = await hc.http_json(node.ollama_url, "GET", "/api/tags", timeout=10)
            # Go writes an empty list as null; anything else keeps the heartbeat's list.
            entries = (tags.get("models") or []) if isinstance(tags, dict) else None
            if not isinstance(entries, list):
                raise hc.UpstreamError("body", "/api/tags answered no list of models")
        except hc.UpstreamError as e:
            fleet_log.warning(f"could not re-read models: {e}", extra={"node_id": node.node_id})
            return
        self.fleet.mark_pulled(node, entries)


def check_registry(name, allowed, use):
    """`name`, checked, if a node may use it to reach a registry (`use`: "pulls from",
    "pushes to", ...): an Ollama library name (namespace/name:tag), or one on a registry
    FLEET_PULL_REGISTRIES (`allowed`) lists; ValueError otherwise. A pull, a create
    from a model the node lacks (Ollama pulls it), a push, and a copy to a name a push
    would later send, all reach the registry the name starts with: one rule for each."""
    name = hc.check_model_name(name)
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or "/" in rest):
        check_host_allowed(first.lower(), allowed, use)
    return name


def check_host_allowed(registry, allowed, use):
    """ValueError unless FLEET_PULL_REGISTRIES (`allowed`) lists `registry` (or *)."""
    if "*" not in allowed and registry not in allowed:
        raise ValueError(f"{use} {registry} are not allowed (the router's "
                         f"FLEET_PULL_REGISTRIES)")


class Warmer:
    """Loads models before requests need them: what the placement plan places (at a
    quiet moment, first unloading what the plan dropped there), and a busy model on the
    runner-up node, where the plan places it too."""

    def __init__(self, cfg, fleet, tasks, placement):
        self.cfg, self.fleet, self.tasks, self.placement = cfg, fleet, tasks, placement
        self.warming = set()  # (node_id, model) being loaded
        self.last_move = {}  # (node_id, model) -> (monotonic, load|unload, plan version)

    def consider(self, choice, queue, name):
        """Pre-warm when the chosen node+model has FLEET_PRE_WARM_THRESHOLD requests."""
        threshold = self.cfg.pre_warm_threshold
        if not threshold or queue.active + queue.waiting < threshold:
            return
        runner_up = choice.runner_up
        if runner_up is None or runner_up.hot or runner_up.evicts:
            return  # a guess never pushes out what a node has loaded (it may be needed)
        if not self.placement.has_room(choice.model, runner_up.node_id):
            return  # a copy in the room of a planned model would be pushed out again
        key = (runner_up.node_id, choice.model)
        node = self.fleet.nodes.get(runner_up.node_id)
        if key in self.warming or node is None or not node.loads_models:
            return  # at most one warm-up per node+model at a time; none where the
            # server cannot load on request (it holds what it lists)
        self.warming.add(key)
        # Under way from now, as a request's cold load is: the next choice counts it.
        self.fleet.residency.start_load(node, choice.model, (), runner_up.load_estimate_s)
        self.tasks.spawn(self._warm(node, choice.model, name), f"pre-warm {key}")

    async def _warm(self, node, model, name):
        extra = {"node_id": node.node_id, "model": model, "event": "pre_warm"}
        fleet_log.info("pre-warming the runner-up node", extra=extra)
        status = None
        try:
            if node.speaks_ollama:  # an empty prompt only loads it: done_reason "load"
                status, _, _ = await hc.http_call(node.ollama_url, "POST", "/api/generate",
                                                  {"model": name, "prompt": ""},
                                                  timeout=self.cfg.first_byte_timeout)
            else:
                status = await send_other_control(node, model, False,
                                                  self.cfg.first_byte_timeout)
            if status != 200:
                fleet_log.warning(f"pre-warm answered {status}", extra=extra)
        except hc.UpstreamError as e:
            fleet_log.warning(f"pre-warm failed: {e}", extra=extra)
        finally:
            self.fleet.residency.finish_load(node, model, status == 200)
            self.warming.discard((node.node_id, model))

    # -- carrying out the placement plan ------------------------------------------------

    def tend_plan(self):
        """The placement duty's step: when the plan is due, follow_plan."""
        return self.follow_plan() if self.placement.due() else None

    async def follow_plan(self):
        """Rebuild the placement plan, then start the loads it asks for that can start."""
        await self.placement.replan_shared()
        for node, model in self.placement.pending_loads():
            self._carry_out(node, model)

    def _carry_out(self, node, model):
        """Load `model` on `node` now if room can be made with models the plan dropped
        there, idle ones (a quiet moment), and no move of ours is undone. A load into
        free room starts at once; one that unloads a model waits until the plan has
        held PLAN_SETTLE_S (a burst the next plan no longer sees pushes nothing out)."""
        key = (node.node_id, model)
        if key in self.warming or node.loading_left(model, time.monotonic()) or \
                self._undoes(key, "unload"):
            return
        need = len(self.fleet.residency.victims(node, model, sized(node.models[model])))
        victims = self.placement.dropped(node)[:need]
        if need and not self.placement.settled():
            return
        if len(victims) < need or any(self.fleet.busy(node, m) or
                                      self._undoes((node.node_id, m), "load")
                                      for m in victims):
            return  # the room is a planned model's, or not free yet: a later round
        self.warming.add(key)
        load_s = self.placement.gauge.load_s(node, model)
        self.fleet.residency.start_load(node, model, victims, load_s)
        self.tasks.spawn(self._move(node, model, victims), f"placement {key}")

    def _undoes(self, key, kind):
        """Was the last move of ours on this node+model a `kind`, a moment ago, under the
        plan version that holds now? (Then the opposite move would undo it.)"""
        last = self.last_move.get(key)
        return last is not None and last[1] == kind and last[2] == self.placement.version \
            and time.monotonic() - last[0] < MOVE_WINDOW_S

    def _note_move(self, node, model, kind):
        key = (node.node_id, model)
        self.last_move.pop(key, None)
        if len(self.last_move) >= hc.LEARNED_MAX_ROWS:
            self.last_move.pop(next(iter(self.last_move)))
        self.last_move[key] = (time.monotonic(), kind, self.placement.version)
        self.placement.done[kind] += 1
        fleet_log.info(f"placement: {kind}ed {model}", extra={
            "node_id": node.node_id, "model": model, "event": f"placement_{kind}"})

    async def _move(self, node, model, victims):
        """Unload the plan's dropped `victims` (keep_alive 0), then load `model`."""
        loaded = False
        try:
            for victim in victims:
                if await send_control(node, victim, True, self.cfg.first_byte_timeout) == 200:
                    self._note_move(node, victim, "unload")
            loaded = await send_control(node, model, False, self.cfg.first_byte_timeout,
                                        pin_keep_alive(node)) == 200
            if loaded:
                self._note_move(node, model, "load")
        except hc.UpstreamError as e:
            fleet_log.warning(f"placement load failed: {e}", extra={
                "node_id": node.node_id, "model": model, "event": "placement_failed"})
        finally:
            self.fleet.residency.finish_load(node, model, loaded)
            self.warming.discard((node.node_id, model))


# How a server other than Ollama loads and unloads a model on request: (path of a load,
# path of an unload, the body's field naming the model). LM Studio 0.4's REST API names
# a loaded model by its instance, whose id is the model's key unless set otherwise;
# llama-server in router mode by the model.
LOAD_APIS = {"lmstudio": ("/api/v1/models/load", "/api/v1/models/unload", "instance_id"),
             "llama-server": ("/models/load", "/models/unload", "model")}


async def send_control(node, model, unload, timeout, keep_alive=None):
    """Ollama's own load or unload of `model` on `node`: nothing to answer, and a
    keep_alive of 0 to unload (or this `keep_alive` for the load); returns the status.
    An embedding model is sent an empty input on /api/embed (Ollama refuses generate
    for it: "does not support generate"). Another server's through its own API
    (LOAD_APIS); UpstreamError where it has none."""
    if not node.speaks_ollama:
        return await send_other_control(node, model, unload, timeout)
    entry = node.models.get(model, NO_ENTRY)
    body = {"model": entry.name or model}  # as the node spells it
    if entry.is_embedding:
        path, body["input"] = "/api/embed", []
    else:
        path, body["prompt"] = "/api/generate", ""
    if unload:
        keep_alive = 0
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    status, _, _ = await hc.http_call(node.ollama_url, "POST", path, body, timeout=timeout)
    return status


async def send_other_control(node, model, unload, timeout):
    """A load or unload through LM Studio's or llama-server's own API (LOAD_APIS): 200
    when it says it did (LM Studio answers some errors with a 200 and an "error")."""
    kind = node.hb.server_kind
    if not node.loads_models or kind not in LOAD_APIS:
        raise hc.UpstreamError("status", f"the {kind} server cannot load or unload a "
                                         f"model on request")
    load_path, unload_path, field = LOAD_APIS[kind]
    name = node.own_name(model)
    body = {field: name} if unload else {"model": name}
    status, _, data = await hc.http_call(node.ollama_url, "POST",
                                         unload_path if unload else load_path, body,
                                         timeout=timeout)
    try:
        failed = "error" in json.loads(data)
    except (ValueError, TypeError, RecursionError):
        failed = False
    return 502 if status == 200 and failed else status


####################################################################################
# Managing models: delete, copy, create (with its blobs) and push, on the nodes
#
# Theory: these change what is on a node's disk, so each goes where the model is: a
# delete or a copy to every node that holds it (one name in the fleet should mean one
# model), a push to the best holder; or to the node the client names ("node" in the
# body, or the X-Herd-Node header, which a blob's raw body needs). A create needs its
# blobs on the node it runs on, and the blobs come first, each in a request of its own:
# so the node a client address sends a blob or create to is remembered for a while
# (ModelAdmin.placements), and its next ones go there too. A create that no such memory places
# goes to a node that has all its blobs, else one that has the model it starts from,
# else to the node with the most free disk. A blob is streamed to the node as it
# arrives (HttpConnection's stream_limits), never held whole. Answers are Ollama's,
# and the fleet's lists change as soon as a node did it (Fleet.mark_pulled), not at
# its next heartbeat.
####################################################################################

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")  # lower case: the blob's file name
ADMIN_TIMEOUT_S = 30.0  # a delete or a copy moves manifests, never weights: quick
PLACEMENT_S = 1800.0  # a client's blobs and create go to one node for this long
MAX_PLACEMENTS = 1024  # client addresses remembered
MAX_PROBED_BLOBS = 64  # blobs of a create asked about when looking for their node


class Refused(RouteError):
    """A model-management request answered with an error before it reached any node."""


class ModelAdmin:
    """Delete, copy, create, blobs and push through the router (see the theory above)."""

    def __init__(self, cfg, fleet, proxy, pulls, guard):
        self.cfg, self.fleet, self.proxy, self.pulls = cfg, fleet, proxy, pulls
        self.guard = guard
        self.placements = LastNode(MAX_PLACEMENTS, PLACEMENT_S)  # client -> node

    # -- handlers -------------------------------------------------------------------

    async def delete(self, request, conn, ex):
        """DELETE /api/delete on every node that holds the model (or the one named)."""
        body, name = read_admin_request(request)
        model = hc.canonical_model(name)
        ex.ask(model, fields=body)
        targets, skipped = self._holders(body, request, model)

        async def forget(node):  # routing stops sending the model there at once
            self.fleet.mark_deleted(node, model)
        await self._on_each(ex, targets, skipped, forget, forget,
                            f"model '{name}' not found")

    async def copy(self, request, conn, ex):
        """POST /api/copy on every node that holds the source (or the one named)."""
        body = parse_admin_body(request)
        source = check_copy_name(body.get("source"), "source")
        ex.ask(hc.canonical_model(source), fields=body)
        self._reaches(check_copy_name(body.get("destination"), "destination"),
                      "copies to")  # a push of the copy would go there
        targets, skipped = self._holders(body, request, ex.model)
        refresh = self.pulls.refresh_models  # the copy is listed at once
        await self._on_each(ex, targets, skipped, refresh, refresh,
                            f'model "{source}" not found')

    async def push(self, request, conn, ex):
        """POST /api/push from the named node, else the best holder; progress streamed."""
        body, name = read_admin_request(request)
        ex.ask(hc.canonical_model(name), body.get("stream") is not False, fields=body)
        self._reaches(name, "pushes to")
        if body.get("insecure") and not self.guard.is_admin(request):
            raise Refused(403, "'insecure' pushes are for the admin (FLEET_ADMIN_KEY)")
        node = self._named(body, request) or self.fleet.best_holder(ex.model)
        if node is None:
            raise Refused(404, f"model '{name}' not found")
        await self.proxy.forward(ex, node, without_node(body))

    async def create(self, request, conn, ex):
        """POST /api/create on the node that has (or will have) its blobs."""
        body, name = read_admin_request(request)
        ex.ask(hc.canonical_model(name), body.get("stream") is not False, fields=body)
        digests = create_digests(body)
        start = self._create_source(body)
        node = await self._place(request, body, digests, start)

        async def refresh():  # the new model is listed before the client sees the end
            await self.pulls.refresh_models(node)
        await self.proxy.forward(ex, node, without_node(body), refresh)

    async def blob(self, request, conn, ex):
        """HEAD or POST /api/blobs/sha256:<hex>: asked of, or streamed to, the node the
        client's create will run on."""
        digest = request.path[len("/api/blobs/"):]
        if not DIGEST_RE.fullmatch(digest):
            raise Refused(400, "invalid digest format: a blob is named sha256:<64 "
                               "lower-case hex digits>")
        node = await self._place(request, {})
        ex.node_id = node.node_id
        await self._blob_on(request, conn, node, ex)

    # -- which registries a node may reach ------------------------------------------

    def _reaches(self, name, use):
        """Refused(400) unless a node may reach `name`'s registry (check_registry)."""
        try:
            check_registry(name, self.cfg.registries_allowed, use)
        except ValueError as e:
            raise Refused(400, str(e)) from None

    def _create_source(self, body):
        """A create's "from" (None: none), and the host its "remote_host" names: Ollama
        pulls a "from" it lacks, and a model made with a remote_host sends every prompt
        there, so both answer to the registry rule."""
        start, remote = body.get("from") or None, body.get("remote_host")
        if start is not None:
            try:
                start = hc.check_model_name(start, "from")
            except ValueError as e:
                raise Refused(400, str(e)) from None
            self._reaches(start, "pulls from")
        if remote is not None:
            if not isinstance(remote, str) or CONTROL_OR_SPACE.search(remote):
                raise Refused(400, "remote_host must be a URL")
            try:
                check_host_allowed(remote_host_of(remote), self.cfg.registries_allowed,
                                   "models served from")
            except ValueError as e:
                raise Refused(400, str(e)) from None
        return start

    # -- where: the named node, the holders, the create's node --------------------------

    def _named(self, body, request):
        """The node the client names ("node" in the body, else X-Herd-Node), or None
        when it names none; Refused when that node is unknown or cannot be reached."""
        wanted = body.get("node", request.header("x-herd-node"))
        if wanted is None:
            return None
        if not isinstance(wanted, str):
            raise Refused(400, "node must be a string")
        node = self.fleet.nodes.get(wanted.strip())
        if node is None or node.status in GONE or not node.hb.reachable:
            raise Refused(404, f"node '{wanted[:64]}' is not online")
        if not node.speaks_ollama:
            raise Refused(400, f"node '{node.node_id}' runs {node.hb.server_kind}, not "
                               f"Ollama: its models are not managed through the router")
        return node

    def _holders(self, body, request, model):
        """([nodes to ask], [(node, why not)]) for a delete or a copy: the named node,
        or every node that lists the model (those offline or unreachable are skipped,
        and the answer says so)."""
        named = self._named(body, request)
        if named is not None:
            return [named], []
        targets, skipped = [], []
        for node in self.fleet.holders(model):
            if not node.speaks_ollama:
                continue  # its server manages its own models
            if node.status in GONE or not node.hb.reachable:
                skipped.append((node, node.status if node.status in GONE else
                                "its Ollama is unreachable"))
            else:
                targets.append(node)
        return targets, skipped

    async def _place(self, request, body, digests=(), start=None):
        """The node for a blob or a create, remembered for this client's next ones:
        the one named; for a create of blobs, the node this client's last blob went
        to, else one that has them all; for a create from a model, a node that has
        it; else this client's last node, else the one with the most free disk."""
        client = request.client.rpartition(":")[0]
        node = self._named(body, request)
        last = self.fleet.nodes.get(self.placements.node_for(client) or "")
        if last is not None and (last.accepts_work() is not None or not last.speaks_ollama):
            last = None
        if node is None and digests:
            node = last or await self._blob_holder(digests)
        if node is None and start:
            start = hc.canonical_model(start)
            node = last if last is not None and start in last.models else \
                self.fleet.best_holder(start)
        if node is None:
            nodes = [n for n in self.fleet.working_ollamas() if n.status == ONLINE]
            node = last or max(nodes, key=lambda n: n.hb.disk_free, default=None)
        if node is None:
            raise Refused(503, "no online node to create models on")
        self.placements.remember(client, node.node_id)
        return node

    async def _blob_holder(self, digests):
        """A working node that has every one of these blobs, or None."""
        nodes = self.fleet.working_ollamas()
        found = await asyncio.gather(*(self._has_blobs(n, digests) for n in nodes))
        return next((n for n, has in zip(nodes, found) if has), None)

    async def _has_blobs(self, node, digests):
        for digest in sorted(digests)[:MAX_PROBED_BLOBS]:
            try:
                status, _, _ = await hc.http_call(node.ollama_url, "HEAD",
                                                  f"/api/blobs/{digest}",
                                                  timeout=self.cfg.connect_timeout)
            except hc.UpstreamError:
                return False
            if status != 200:
                return False
        return True

    # -- on each holder: delete, copy ------------------------------------------------

    async def _on_each(self, ex, targets, skipped, done, missing, not_found):
        """Send the request to each target at once and answer as Ollama does: 200 with
        an empty body if any node did it (X-Fleet-Node names them, X-Fleet-Failed the
        nodes that failed or were skipped), else the nodes' own 4xx (404 `not_found`
        when no node lists the model), else 502 (503: none could be asked) naming why.
        `done(node)` / `missing(node)` update the fleet after a 200 / a 404."""
        ex.body = without_node(ex.fields)
        ex.node_id = ",".join(n.node_id for n in targets) or None
        results = await asyncio.gather(*(
            hc.http_call(n.ollama_url, ex.request.method, ex.endpoint, ex.body,
                         timeout=ADMIN_TIMEOUT_S) for n in targets),
            return_exceptions=True)
        did, refused, failed = [], [], [f"{n.node_id}: {why}" for n, why in skipped]
        done_type = None  # the Content-Type of the first 200 (Ollama's has none)
        for node, result in zip(targets, results):
            if isinstance(result, hc.UpstreamError):
                failed.append(f"{node.node_id}: {result}")
            elif isinstance(result, BaseException):
                raise result
            elif result[0] == 200:
                did.append(node.node_id)
                done_type = done_type or content_type(result[1])
                await done(node)
            elif result[0] < 500:
                refused.append(result)
                if result[0] == 404:
                    await missing(node)
            else:
                said = hc.printable(result[2][:200].decode("utf-8", "replace"))
                failed.append(f"{node.node_id}: answered {result[0]}: {said}")
        await self._answer_each(ex, did, refused, failed, not_found, done_type)

    @staticmethod
    async def _answer_each(ex, did, refused, failed, not_found, done_type):
        if failed:
            ex.error = "; ".join(failed)[:500]
            proxy_log.warning(f"{ex.endpoint} of '{ex.model}' failed on some nodes: "
                              f"{ex.error}", extra={"model": ex.model,
                                                    "request_id": ex.request_id})
        if did:
            headers = [(b"x-fleet-node", ",".join(did).encode())]
            if failed:
                headers.append((b"x-fleet-failed", header_text(ex.error)))
            await ex.reply(200, b"", done_type, headers)
        elif failed:  # asked and failed / none could be asked; the trace keeps each why
            await ex.reply(502 if ex.node_id else 503, hc.ollama_error_body(
                f"{ex.endpoint} of '{ex.model}' failed: {ex.error}"), error=ex.error)
        elif refused:
            status, headers, body = refused[0]
            await ex.reply(status, body, content_type(headers) or hc.JSON_TYPE)
        else:
            raise Refused(404, not_found)

    # -- blobs: asked of, or streamed to, one node ------------------------------------

    async def _blob_on(self, request, conn, node, ex):
        headers = [(b"x-fleet-node", node.node_id.encode())]
        try:  # a blob the node has is not sent again: Ollama answers 200 to that too
            status, _, _ = await hc.http_call(node.ollama_url, "HEAD", request.path,
                                                 timeout=self.cfg.connect_timeout)
        except hc.UpstreamError as e:
            raise Refused(502, f"node {node.node_id}: {e}") from None
        if request.method == "HEAD" or status == 200:
            if request.method == "POST" and not conn.waits_for_continue():
                await self._drain(request, conn)  # a clean answer, after its body
            return await ex.reply(status, b"", None, headers)
        status, up_headers, body = await self._upload(request, conn, node, ex)
        await ex.reply(status, body, content_type(up_headers), headers)

    async def _upload(self, request, conn, node, ex):
        """Stream the client's body to the node; (status, headers, body) of its answer."""
        cfg, stream = self.cfg, request.stream
        up = await self._connect(node)
        try:
            up.send_head(b"POST", request.target.encode(), forward_headers(request),
                         hc.forwarded_length(request))
            ex.touch()
            try:
                while data := await stream.receive(conn.read_timeout):
                    await up.send_body(data, cfg.chunk_timeout)
                up.end_body()
            except hc.BodyTooLarge:
                raise Refused(413, f"blob larger than the router's limit "
                                   f"({cfg.max_blob_gb:g} GB)") from None
            except TimeoutError:
                raise Refused(408, f"the client sent nothing for {conn.read_timeout:g}s "
                                   f"of its blob") from None
            except ConnectionError as e:
                if conn.client_gone:
                    raise
                raise Refused(400, str(e)) from None  # a body framed wrongly, cut short
            except hc.UpstreamError as e:  # the node may have answered and closed early
                return await self._early_answer(up, node, e)
            try:
                status, headers = await up.receive_head(cfg.first_byte_timeout)
                return status, headers, await up.read_body(cfg.chunk_timeout, 1 << 20)
            except hc.UpstreamError as e:
                raise Refused(502, f"node {node.node_id}: {e}") from None
        finally:
            up.close()

    @staticmethod
    async def _drain(request, conn):
        """Read a body that need not go anywhere: the client is sending it anyway, and
        an answer before its end would close the connection under it."""
        try:
            while await request.stream.receive(conn.read_timeout):
                pass
        except (hc.BodyTooLarge, TimeoutError):
            pass  # answered all the same; the connection then closes
        except ConnectionError as e:
            if conn.client_gone:
                raise
            raise Refused(400, str(e)) from None  # a body framed wrongly, cut short

    async def _connect(self, node):
        try:
            return await hc.Upstream.connect(node.host, node.port, self.cfg.connect_timeout)
        except hc.UpstreamError as e:
            raise Refused(502, f"node {node.node_id}: {e}") from None

    async def _early_answer(self, up, node, error):
        try:
            status, headers = await up.receive_head(1.0)
            return status, headers, await up.read_body(1.0, 1 << 20)
        except hc.UpstreamError:
            raise Refused(502, f"node {node.node_id}: {error}") from None


def read_admin_request(request):
    """(body, model name) of a delete, push or create; Refused(400) in Ollama's words."""
    body = parse_admin_body(request)
    try:  # "name" is the older spelling
        return body, hc.check_model_name(body.get("model") or body.get("name"))
    except ValueError as e:
        raise Refused(400, str(e)) from None


def parse_admin_body(request):
    try:
        return hc.parse_json_body(request.body, request.shape)
    except ValueError as e:
        raise Refused(400, str(e)) from None


def check_copy_name(name, field):
    """A copy's source or destination, refused as Ollama words it: `source "x" is
    invalid`."""
    try:
        return hc.check_model_name(name, field)
    except ValueError:
        shown = name[:60] if isinstance(name, str) else ""
        raise Refused(400, f"{field} {json.dumps(shown)} is invalid") from None


def create_digests(body):
    """The blobs a create names (files, adapters: name -> sha256:<hex>), each checked."""
    digests = set()
    for field in ("files", "adapters"):
        files = body.get(field)
        if files is None:
            continue
        if not isinstance(files, dict):
            raise Refused(400, f"{field} must map file names to sha256:<hex> digests")
        for file_name, digest in files.items():
            if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
                raise Refused(400, f"{field}: {json.dumps(file_name[:60])} needs a digest "
                                   f"sha256:<64 lower-case hex digits>")
            digests.add(digest)
    return digests


def without_node(body):
    """The body to forward: the router's "node" field goes."""
    return hc.dump_json({k: v for k, v in body.items() if k != "node"})


def header_text(text):
    """Text safe in a header value: printable ASCII, at most 500 characters."""
    return hc.printable(text).encode("ascii", "replace")[:500]


CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")


def remote_host_of(url):
    """The host[:port] a create's remote_host names, read as Ollama reads it (remoteURL
    in server/create.go): a bare path means localhost:11434, no scheme means http://."""
    if url.startswith("/"):
        return "localhost:11434"
    netloc = urllib.parse.urlsplit(url if "://" in url else "http://" + url).netloc
    return netloc.rpartition("@")[2].lower() or "localhost"


####################################################################################
# Health: checks over a snapshot of the fleet, the traces and the event counters
#
# Each check is a pure function of one snapshot (a dict), so a test can craft the
# state that must trigger it and the state that must not. A check that finds nothing
# says nothing. Findings: id, severity, title, description with the numbers and the
# window they cover, node / model, and what to do.
####################################################################################

HEALTH_WINDOW_S = 3600  # the traces a check looks at
SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


def finding(check, severity, title, description, recommendation, node=None, model=None):
    return {"check": check, "severity": severity, "title": title,
            "description": description, "recommendation": recommendation,
            "node_id": node, "model": model}


def check_no_nodes(snap):
    working = [n for n in snap["nodes"] if n["status"] in (ONLINE, DEGRADED)]
    if not working:
        seen = f"{len(snap['nodes'])} known, none online" if snap["nodes"] else \
            "no node has sent a heartbeat"
        yield finding("no_nodes", "critical", "No node can serve requests",
                      f"The router has no node to send work to ({seen}); every request "
                      f"waits, then gets a 503 or 404.",
                      "Start Ollama on this machine (the router serves it by itself), or "
                      "run herd_node.py beside an Ollama on another machine.")


def check_open_fleet(snap):
    if not snap["open_fleet"]:
        return
    signing = [n["node_id"] for n in snap["nodes"] if n.get("signs")]
    if not signing:
        yield finding("open_fleet", "warning", "Any host can join this fleet",
                      "FLEET_TOKEN is not set: any machine that can reach the router can "
                      "send heartbeats, join as a node and receive other users' prompts.",
                      "Set FLEET_TOKEN on the router and the same value as "
                      "FLEET_NODE_TOKEN on every agent.")
        return
    named = ", ".join(signing[:5]) + (f" and {len(signing) - 5} more" if signing[5:] else "")
    yield finding("open_fleet", "warning", "The agents' token is not checked",
                  f"FLEET_TOKEN is not set, yet {len(signing)} node(s) sign their "
                  f"heartbeats with a FLEET_NODE_TOKEN ({named}): this router checks no "
                  f"signature, so any machine that can reach it can join as a node and "
                  f"receive other users' prompts.",
                  "Set FLEET_TOKEN on the router to the value the agents have as "
                  "FLEET_NODE_TOKEN.")


def check_refused_heartbeats(snap):
    refused = snap["events"].get("heartbeat_refused", 0)
    if refused:
        yield finding("refused_heartbeats", "warning", "Heartbeats were refused",
                      f"{refused} heartbeats in the last {HEALTH_WINDOW_S // 60} min were "
                      f"refused: unsigned or badly signed, malformed, naming another "
                      f"machine's Ollama, or claiming a node id another address holds.",
                      "The router's log says which address sent each and why (grep "
                      "heartbeat_refused ~/.fleet-manager/logs/herd.jsonl).")


def check_speed_drops(snap):
    for node, model, now, usual in snap["speed_drops"]:
        yield finding("speed_drops", "warning", f"{model} got slower on {node}",
                      f"It decodes {now:.0f} tokens/s over its last requests, against "
                      f"{usual:.0f} usually.",
                      "Something else may be using that machine (its CPU, memory or GPU), "
                      "or the model now runs partly on the CPU: see /api/ps there.",
                      node=node, model=model)


def check_offline_nodes(snap):
    for n in snap["nodes"]:
        if n["status"] == OFFLINE and n.get("asleep"):
            yield finding("offline_nodes", "info", f"{n['node_id']} is asleep",
                          f"No heartbeat for {n['silent_s']:.0f}s. It can be woken: a "
                          f"request for a model only it has sends it Wake-on-LAN.",
                          "Nothing to do, unless it should stay awake (its power "
                          "settings).", node=n["node_id"])
        elif n["status"] == OFFLINE:
            yield finding("offline_nodes", "critical", f"{n['node_id']} is offline",
                          f"No heartbeat for {n['silent_s']:.0f}s; it gets no work.",
                          "Check that herd_node.py runs there and can reach the router "
                          "(curl the router's /fleet/status from that machine).",
                          node=n["node_id"])


def check_left_nodes(snap):
    for n in snap["nodes"]:
        if n["status"] == LEFT:
            yield finding("left_nodes", "info", f"{n['node_id']} left the fleet",
                          f"Its agent stopped cleanly {n['silent_s']:.0f}s ago and said "
                          f"so; it gets no work until it starts again.",
                          "Nothing to do if it was stopped on purpose. To bring it back, "
                          "start herd_node.py on that machine again.", node=n["node_id"])


def check_degraded_nodes(snap):
    for n in snap["nodes"]:
        if n["status"] == DEGRADED:
            yield finding("degraded_nodes", "warning", f"{n['node_id']} is degraded",
                          f"No heartbeat for {n['silent_s']:.0f}s (degraded after "
                          f"{snap['heartbeat_timeout']:g}s); it is scored lower.",
                          "Look at ~/.fleet-manager/logs/herd-node.jsonl on that machine.",
                          node=n["node_id"])


def check_memory_pressure(snap):
    for n in snap["nodes"]:
        pressure = n["memory"].get("pressure", "normal")
        if pressure in ("warning", "critical") and n["status"] not in GONE:
            yield finding("memory_pressure", pressure, f"{n['node_id']} is short of memory",
                          f"{n['memory'].get('percent', 0):.0f}% of its memory is in use "
                          f"(pressure {pressure}); at critical it gets no work.",
                          "Unload models it does not need (keep_alive 0), or lower "
                          "OLLAMA_MAX_LOADED_MODELS there.", node=n["node_id"])


def check_paused_nodes(snap):
    for n in snap["nodes"]:
        if n.get("paused") and n["status"] not in GONE:
            reason = n.get("paused_reason") or "its agent did not say why"
            yield finding("paused_nodes", "warning", f"{n['node_id']} is paused",
                          f"It takes no new work ({reason}); requests already running "
                          f"there finish.",
                          "Nothing to do while its owner needs it: it resumes by itself "
                          "once that clears. A machine that should always serve leaves "
                          "FLEET_NODE_ENABLE_CAPACITY_LEARNING off.", node=n["node_id"])


def check_underutilized_nodes(snap):
    busy = {n: c for n, c in snap["requests_by_node"].items() if c}
    if sum(busy.values()) < 20:
        return  # too little traffic to call anyone idle
    for n in snap["nodes"]:
        if n["status"] == ONLINE and not busy.get(n["node_id"]):
            yield finding("underutilized_nodes", "info", f"{n['node_id']} served nothing",
                          f"0 of {sum(busy.values())} requests in the last "
                          f"{HEALTH_WINDOW_S // 60} min went there.",
                          "Pull the models your apps use onto it (POST /api/pull with "
                          f'"node": "{n["node_id"]}").', node=n["node_id"])


def check_vram_fallbacks(snap):
    for n in snap["nodes"]:
        for m in n["loaded"]:
            size, vram = m.get("size") or 0, m.get("size_vram") or 0
            if 0 < vram < size:
                yield finding("vram_fallbacks", "warning",
                              f"{m['model']} runs partly on the CPU on {n['node_id']}",
                              f"{vram / hc.GIB:.1f} of {size / hc.GIB:.1f} GiB are in VRAM; "
                              f"the rest runs on the CPU, much slower.",
                              "Use a smaller quantization or context (num_ctx), or unload "
                              "other models there.", node=n["node_id"], model=m["model"])


def check_kv_cache_bloat(snap):
    for n in snap["nodes"]:
        for m in n["loaded"]:
            weights, size = m.get("disk_size") or 0, m.get("size") or 0
            if weights and size > 2 * weights and size - weights > hc.GIB:
                yield finding("kv_cache_bloat", "warning",
                              f"{m['model']} on {n['node_id']} holds a large context",
                              f"The runner uses {size / hc.GIB:.1f} GiB for "
                              f"{weights / hc.GIB:.1f} GiB of weights (context "
                              f"{m.get('context_length')}); the rest is KV cache.",
                              "Set OLLAMA_CONTEXT_LENGTH lower on that node, or stop "
                              "clients sending a large num_ctx.",
                              node=n["node_id"], model=m["model"])


def check_model_thrashing(snap):
    """A model loaded often on one node, and back soon after it was pushed out with the
    placement plan unchanged (a move the plan made on purpose is no thrash)."""
    for (node, model), loads in snap["loads_by_model"].items():
        thrashes = snap["thrashes_by_model"].get((node, model), 0)
        if loads >= snap["limits"]["thrash_loads"] and thrashes:
            yield finding("model_thrashing", "warning", f"{model} keeps reloading on {node}",
                          f"Loaded {loads} times in the last {HEALTH_WINDOW_S // 60} min, "
                          f"{thrashes} of them soon after it was pushed out, with the "
                          f"placement plan unchanged.",
                          "More models are asked for than the nodes hold: see "
                          "/fleet/status's placement for what is kept where; set a higher "
                          "OLLAMA_MAX_LOADED_MODELS on that node, or add one.",
                          node=node, model=model)


def _rate_check(check, title, count_key, limit, recommendation):
    def run(snap):
        total, count = snap["requests"], snap[count_key]
        threshold = snap["limits"][limit]
        if total >= 10 and count / total >= threshold:
            severity = "critical" if count / total >= min(1.0, 4 * threshold) else "warning"
            yield finding(check, severity, title,
                          f"{count} of {total} requests ({100 * count / total:.0f}%) in the "
                          f"last {HEALTH_WINDOW_S // 60} min.", recommendation)
    run.__name__ = f"check_{check}"
    return run


check_error_rates = _rate_check(
    "error_rates", "Requests are failing", "failed", "error_rate",
    "See which node and error: sqlite3 ~/.fleet-manager/latency.db \"SELECT model, node_id, "
    "error_message FROM request_traces WHERE status='failed' ORDER BY timestamp DESC LIMIT 10\"")
check_retry_rates = _rate_check(
    "retry_rates", "Nodes fail before answering", "retried", "retry_rate",
    "The retried rows' error_message names the node; check its Ollama.")
check_client_disconnects = _rate_check(
    "client_disconnects", "Clients give up before the answer", "cancelled", "disconnect_rate",
    "Clients time out first: raise their timeout, or add nodes for the busy models.")


def check_request_timeouts(snap):
    if snap["timeouts"]:
        yield finding("request_timeouts", "warning", "Nodes time out",
                      f"{snap['timeouts']} requests in the last {HEALTH_WINDOW_S // 60} min "
                      f"waited past FLEET_FIRST_BYTE_TIMEOUT or went silent mid-answer "
                      f"(images and speech are counted per node: media_timeouts).",
                      "Look for an overloaded node in /fleet/status, or raise the time-outs "
                      "for very large models.")


# How the media checks name a kind, and the tool or server to look at for it.
MEDIA_WORDS = {hc.IMAGE: ("image", "mflux-generate or diffusionkit-cli, or the server "
                                   "FLEET_NODE_IMAGE_URL names"),
               hc.TRANSCRIPTION: ("speech-to-text", "mlx-qwen3-asr, or the server "
                                                    "FLEET_NODE_TRANSCRIBE_URL names")}


def _media_troubles(snap, key):
    """(row, severity) of each node and media kind whose `key` count (timeouts, failed)
    is FLEET_HEALTH_ERROR_RATE or more of the requests sent there. Images and speech
    are few and slow, so one in a quiet hour counts; critical needs ten requests."""
    threshold = snap["limits"]["error_rate"]
    for row in snap["media"]:
        count, total = row[key], row["requests"]
        if count and count / total >= threshold:
            critical = total >= 10 and count / total >= min(1.0, 4 * threshold)
            yield row, "critical" if critical else "warning"


def check_media_timeouts(snap):
    for row, severity in _media_troubles(snap, "timeouts"):
        what, node = MEDIA_WORDS[row["kind"]][0], row["node_id"]
        yield finding("media_timeouts", severity, f"{what.capitalize()} requests time out "
                                                  f"on {node}",
                      f"{row['timeouts']} of {row['requests']} {what} requests sent to "
                      f"{node} in the last {HEALTH_WINDOW_S // 60} min timed out: its tool "
                      f"or server took longer than FLEET_NODE_MEDIA_TIMEOUT, or the router "
                      f"waited past FLEET_FIRST_BYTE_TIMEOUT.",
                      "Raise FLEET_NODE_MEDIA_TIMEOUT on that node (and the router's "
                      "FLEET_FIRST_BYTE_TIMEOUT if it is lower), or ask for less at once "
                      "(smaller images, fewer steps, shorter audio).", node=node)


def check_media_errors(snap):
    for row, severity in _media_troubles(snap, "failed"):
        (what, tool), node = MEDIA_WORDS[row["kind"]], row["node_id"]
        yield finding("media_errors", severity, f"{what.capitalize()} requests fail on "
                                                f"{node}",
                      f"{row['failed']} of {row['requests']} {what} requests sent to {node} "
                      f"in the last {HEALTH_WINDOW_S // 60} min failed there (time-outs "
                      f"aside).",
                      f"Check the tool on that node: run {tool} there by hand, and read "
                      f"~/.fleet-manager/logs/herd-node.jsonl; the failed and retried "
                      f"traces' error_message says what it answered.", node=node)


def check_incomplete_streams(snap):
    if snap["incomplete"]:
        yield finding("incomplete_streams", "warning", "Answers broke off mid-stream",
                      f"{snap['incomplete']} streams in the last {HEALTH_WINDOW_S // 60} min "
                      f"ended with an error after their first chunk.",
                      "A node died or stalled mid-answer: its error_message in the traces "
                      "says which.")


def check_version_mismatch(snap):
    versions = {n["ollama_version"] for n in snap["nodes"]
                if n["status"] not in GONE and n["ollama_version"]}
    if len(versions) > 1:
        yield finding("version_mismatch", "info", "Nodes run different Ollama versions",
                      f"Versions in the fleet: {', '.join(sorted(versions))}.",
                      "Update Ollama on the older nodes, so every model runs everywhere.")


def check_context_protection(snap):
    events = {k: v for k, v in snap["events"].items() if k.startswith("context_")}
    if events:
        counts = ", ".join(f"{k.removeprefix('context_')} {v}" for k, v in sorted(events.items()))
        yield finding("context_protection", "info", "Clients send reload-forcing num_ctx",
                      f"Since the router started: {counts}.",
                      "Set the context once on the nodes (OLLAMA_CONTEXT_LENGTH) and stop "
                      "sending num_ctx from clients.")


def check_zombie_reaper(snap):
    if snap["zombies_reaped"]:
        yield finding("zombie_reaper", "warning", "Requests got stuck",
                      f"Since the router started, the reaper stopped "
                      f"{snap['zombies_reaped']} requests that made no progress for too long.",
                      "A node or a client hangs: the failed traces' error_message names it.")


def check_trace_store(snap):
    trouble = snap.get("trace_store")
    if trouble is None:
        return
    if trouble["problem"] == "damaged":
        yield finding("trace_store", "warning", "The trace database was damaged",
                      f"At start the router could not read its traces ({trouble['detail']})"
                      f": it moved the file to {trouble['file']} and started a fresh one. "
                      f"Older traces and what it had learned of the nodes' speeds are in "
                      f"that file.", "Nothing is needed to go on; look at the old file with "
                      "sqlite3, or delete it.")
    else:
        moved = f" (the damaged one was moved to {trouble['moved_to']})" \
            if trouble.get("moved_to") else ""
        yield finding("trace_store", "warning", "Traces are kept in memory only",
                      f"The router cannot keep {trouble['file']} ({trouble['detail']})"
                      f"{moved}: traces and what it learns of the nodes' speeds are kept "
                      f"in memory, the newest {hc.TraceStore.MEMORY_ROWS}, and go when it "
                      f"stops.", "Make FLEET_DATA_DIR a folder the router may write to, "
                      "with free space, and restart the router.")


HEALTH_CHECKS = (check_no_nodes, check_open_fleet, check_refused_heartbeats, check_speed_drops,
                 check_offline_nodes, check_left_nodes, check_degraded_nodes,
                 check_memory_pressure, check_paused_nodes, check_underutilized_nodes,
                 check_vram_fallbacks, check_kv_cache_bloat, check_model_thrashing,
                 check_request_timeouts, check_error_rates, check_retry_rates,
                 check_client_disconnects, check_media_timeouts, check_media_errors,
                 check_incomplete_streams, check_version_mismatch, check_context_protection,
                 check_zombie_reaper, check_trace_store)


# Findings that report what the owner did, not a fault: they cost the score nothing and
# leave the status "healthy" (an agent stopped on purpose once turned health critical).
NEWS_CHECKS = frozenset({"left_nodes"})


def run_health_checks(snap):
    """Every finding, worst first, and a score from 100 down."""
    found = [f for check in HEALTH_CHECKS for f in check(snap)]
    found.sort(key=lambda f: SEVERITY_ORDER[f["severity"]])
    penalty = {"critical": 25, "warning": 10, "info": 2}
    score = max(0, 100 - sum(penalty[f["severity"]] for f in found
                             if f["check"] not in NEWS_CHECKS))
    return found, score


def health_status(findings):
    """The worst severity among the findings that are faults, or "healthy"."""
    return next((f["severity"] for f in findings if f["check"] not in NEWS_CHECKS),
                "healthy")


class Health:
    """The health API: a snapshot of live state, an hour of traces and the counters,
    the checks over it, and a day of vitals."""

    def __init__(self, cfg, fleet, traces, stats, learner):
        self.cfg, self.fleet, self.traces, self.stats = cfg, fleet, traces, stats
        self.learner = learner

    async def snapshot(self):
        """What the checks look at (a plain dict, so tests can craft one)."""
        self.fleet.refresh_status()
        since = time.time() - HEALTH_WINDOW_S
        now = time.monotonic()
        nodes = [{
            "node_id": n.node_id, "status": n.status, "silent_s": now - n.last_seen,
            "asleep": self.fleet.waker.asleep(n),
            "memory": n.hb.memory, "ollama_version": n.hb.ollama_version,
            "paused": n.hb.paused, "paused_reason": n.hb.paused_reason, "signs": n.signs,
            "loaded": [{**e.json(), "model": name,
                        "disk_size": n.models[name].size if name in n.models else None}
                       for name, e in n.loaded.items()],
        } for n in self.fleet.nodes.values()]
        cfg = self.cfg
        limits = {"error_rate": cfg.health_error_rate, "retry_rate": cfg.health_retry_rate,
                  "disconnect_rate": cfg.health_disconnect_rate,
                  "thrash_loads": cfg.health_thrash_loads}
        recent = self.stats.events_since(since)
        loads = self.fleet.residency.moves_since(since, "load")
        thrashes = self.fleet.residency.thrashes_since(since)
        return {"nodes": nodes, "loads_by_model": dict(loads), "limits": limits,
                "thrashes_by_model": dict(thrashes),
                "events": {k: v for k, v in recent.items() if k != "zombie_reaped"},
                "zombies_reaped": recent["zombie_reaped"],
                "heartbeat_timeout": cfg.heartbeat_timeout, "open_fleet": not cfg.token,
                "speed_drops": self.learner.speed_drops(),
                "trace_store": self.traces.trouble,
                "media": await self.traces.media_window(since),
                **await self.traces.health_window(since)}

    async def report(self):
        """/dashboard/api/health: score, worst severity, findings and vitals."""
        snap = await self.snapshot()
        findings, score = run_health_checks(snap)
        counts = collections.Counter(n["status"] for n in snap["nodes"])
        day_ago = time.time() - 86400
        day = await self.traces.vitals(day_ago)
        return {
            "score": score,
            "status": health_status(findings),
            "checks_window_s": HEALTH_WINDOW_S,
            "vitals": {"window_s": 86400, "nodes_online": counts[ONLINE],
                       "nodes_degraded": counts[DEGRADED], "nodes_draining": counts[DRAINING],
                       "nodes_left": counts[LEFT], "nodes_offline": counts[OFFLINE],
                       "requests": day["requests"],
                       "error_rate": round(day["failed"] / day["requests"], 4)
                       if day["requests"] else 0.0,
                       "mean_ttft_ms": round(day["ttft"], 1) if day["ttft"] else None,
                       "model_loads": sum(self.fleet.residency.moves_since(
                           day_ago, "load").values())},
            "checks": findings,
            # The dashboard's banner: the alerts of the last hour, sent or not, newest first.
            "alerts": [a for a in self.fleet.alerts.view()["recent"]
                       if a["time"] > time.time() - 3600][:ALERT_BANNER]}


####################################################################################
# Waking a sleeping node (Wake-on-LAN): a node whose agent reported its interfaces
# and that went quiet is asleep, not gone. A request for a model that only such nodes
# have sends each the magic packet and waits up to WAKE_WAIT_S for its first heartbeat
# (the holding queue looks again at every heartbeat). A backlog on the awake nodes
# that have a model can wake one too (Scheduler.wake_for_backlog). How long a node took
# from the packet to its first heartbeat is kept: what waking it costs next time.
####################################################################################

WAKE_PORT = 9  # the discard port, where Wake-on-LAN packets are usually sent
WAKE_EVERY_S = 15.0  # a sleeping node is sent the packet again this often, at most
WAKE_WAIT_S = 90.0  # how long a request waits for a node it woke (a boot is slow)


def read_wake_address(setting):
    """FLEET_WAKE_ADDRESS as the target of the packets: None for each node's own subnet
    broadcast, "off", or (host, port). ConfigError if it is none of these."""
    setting = setting.strip()
    if not setting:
        return None
    if setting.lower() == "off":
        return "off"
    host, _, port = setting.rpartition(":") if setting.count(":") == 1 else (setting, "", "")
    try:
        number = int(port) if port else WAKE_PORT
        if not host or not 0 < number < 65536:
            raise ValueError
    except ValueError:
        raise hc.ConfigError(f"FLEET_WAKE_ADDRESS={setting!r}: use host or host:port, "
                             f"or off") from None
    return host, number


def magic_packet(mac):
    """Wake-on-LAN's packet: six 0xFF bytes, then the MAC sixteen times (102 bytes)."""
    return b"\xff" * 6 + bytes.fromhex(mac.replace(":", "")) * 16


class Waker:
    """Sends the magic packet to sleeping nodes, each at most every WAKE_EVERY_S, and
    remembers when it first woke each (until it is heard from again, or WAKE_WAIT_S
    passes unanswered: a wake after that is a new one)."""

    def __init__(self, target):
        self.target = target  # read_wake_address's
        self.sent = {}  # node_id -> (monotonic time first woken, last sent)
        self.took = {}  # node_id -> seconds from its last wake's packet to its heartbeat
        self.packets = 0

    def asleep(self, node):
        """Gone quiet after it said how it can be woken (and waking is not off)."""
        return node.status == OFFLINE and bool(node.hb.wake) and self.target != "off"

    def wake_for(self, holders):
        """Wake the sleeping ones among the nodes that have a request's model; returns
        when the first of them was first woken (0: none is asleep)."""
        now, first = time.monotonic(), 0.0
        for node in holders:
            if not self.asleep(node):
                self.sent.pop(node.node_id, None)  # awake again: a later sleep is new
                continue
            woken, last = self.sent.get(node.node_id, (now, 0.0))
            if now - woken >= WAKE_WAIT_S:  # that wake went unanswered: this one is new,
                woken = now                 # and its request waits for it as long
            if now - last >= WAKE_EVERY_S:
                self._send(node)
                last = now
            self.sent[node.node_id] = (woken, last)
            first = min(first, woken) if first else woken
        return first

    def woken_names(self, holders):
        return ", ".join(n.node_id for n in holders if n.node_id in self.sent)

    def heard(self, node):
        """An offline node sends heartbeats again: when we woke it, how long that took.
        One back later than WAKE_WAIT_S woke for its own reasons (its owner), not ours."""
        woken = self.sent.pop(node.node_id, None)
        if woken is None:
            return
        took = time.monotonic() - woken[0]
        if took <= WAKE_WAIT_S:
            if len(self.took) >= hc.LEARNED_MAX_ROWS and node.node_id not in self.took:
                self.took.pop(next(iter(self.took)))
            self.took[node.node_id] = took

    def wake_left_s(self, node):
        """Seconds until a sleeping node would be back if woken now, or if it is on its
        way up, what is left of that: its last wake's time, else WAKE_WAIT_S (the
        longest a boot is waited for; a prudent guess). One woken longer ago than
        WAKE_WAIT_S did not answer: it is as far away as if never woken."""
        wake = self.took.get(node.node_id, WAKE_WAIT_S)
        woken = self.sent.get(node.node_id)
        if woken is None or time.monotonic() - woken[0] >= WAKE_WAIT_S:
            return wake
        return max(0.0, wake - (time.monotonic() - woken[0]))

    def _send(self, node):
        """One packet to each interface the node reported."""
        for address in node.hb.wake:
            host, port = self.target or (address["broadcast"], WAKE_PORT)
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                    s.setblocking(False)
                    s.sendto(magic_packet(address["mac"]), (host, port))
                self.packets += 1
            except OSError as e:
                fleet_log.warning(f"a Wake-on-LAN packet to {host}:{port} failed: {e}",
                                  extra={"node_id": node.node_id, "event": "wake_failed"})
        fleet_log.info("woke a sleeping node (Wake-on-LAN)", extra={
            "node_id": node.node_id, "event": "wake"})


####################################################################################
# Alerts: telling someone (FLEET_ALERT_URL) when a node goes offline or comes back, a
# health check turns critical or clears, an automatic pull fails
#
# Theory: alert() is all the rest of the router calls, and it only queues: nothing on a
# request's path waits for a receiver. One sender task posts each alert in the format
# the setting names, retrying with back-off; news that repeats what was last said of
# the same thing within ALERT_REPEAT_S is not sent again, and past ALERT_RATE a minute
# alerts are counted, not sent. The dashboard shows the same events (recent), sent or
# not, with no setting at all.
####################################################################################

ALERT_QUEUE = 64  # alerts waiting to be sent; past it the oldest is dropped (and counted)
ALERT_RATE = 10  # sent in any minute, at most
ALERT_REPEAT_S = 600.0  # the same news of the same thing is said once in this long
ALERT_TRIES = 5  # a failing receiver is tried this often, 1, 2, 4, 8 s apart
ALERT_TIMEOUT_S = 10.0  # one try, or one run of the command
ALERT_RECENT = 50  # events /fleet/status shows
ALERT_BANNER = 5  # of those, the dashboard's banner
HEALTH_ALERT_EVERY_S = 30.0  # how often the health checks are looked at for alerts


def read_alert_url(setting):
    """FLEET_ALERT_URL as (kind, target): ("ntfy", url) for `ntfy:<url>` (ntfy's plain
    text with a title header), ("json", url) for an http(s) URL (a JSON webhook), ("exec",
    argv) for `exec:<command>`; None when unset. ConfigError for anything else."""
    setting = setting.strip()
    if not setting:
        return None
    kind, _, rest = setting.partition(":")
    if kind in ("ntfy", "http", "https"):
        url = rest if kind == "ntfy" else setting
        try:
            hc.split_url(url)
        except ValueError as e:
            raise hc.ConfigError(f"FLEET_ALERT_URL: {e}") from None
        return ("ntfy" if kind == "ntfy" else "json"), url
    if kind == "exec" and rest.strip():
        import shlex
        return "exec", shlex.split(rest)
    raise hc.ConfigError(f"FLEET_ALERT_URL={setting!r}: use an http(s) URL (a JSON "
                         f"webhook), ntfy:<url>, or exec:<command>")


class Alerts:
    """The alerts this router raises, the recent ones for the dashboard, and the one
    task that sends them (run)."""

    def __init__(self, cfg):
        self.target = cfg.alert_target  # read_alert_url's
        self.queue = asyncio.Queue(ALERT_QUEUE)
        self.recent = collections.deque(maxlen=ALERT_RECENT)
        self.said = {}  # what an alert is about -> (time, state) last said of it
        self.sent_at = collections.deque()  # times of the alerts sent in the last minute
        self.counts = collections.Counter()  # sent, failed, dropped, limited, repeated
        self.critical = set()  # the health checks critical when last looked at

    def alert(self, event, title, message, *, about, state, severity="warning",
              node_id=None):
        """Say it (queued; never waits): `about` names what it concerns, `state` what
        is now true of it; the same state of the same thing said again within
        ALERT_REPEAT_S is not sent."""
        now = time.time()
        item = {"event": event, "severity": severity, "title": title, "message": message,
                "node_id": node_id, "time": now}
        self.recent.append(item)
        self.counts["raised"] += 1
        last = self.said.get(about)
        if last is not None and last[1] == state and now - last[0] < ALERT_REPEAT_S:
            self.counts["repeated"] += 1
            return
        if len(self.said) >= hc.LEARNED_MAX_ROWS:
            self.said.pop(next(iter(self.said)))
        self.said[about] = (now, state)
        if self.target is None:
            return
        if self.queue.full():  # the oldest unsent gives way: the newest says what is now
            self.queue.get_nowait()
            self.counts["dropped"] += 1
        self.queue.put_nowait(item)

    # -- the events -----------------------------------------------------------------

    def node_status(self, node, old, new, wakeable=False):
        """A node went offline (asleep, when it can be woken), or came back from it."""
        if new == OFFLINE:
            self.alert("node_offline", f"node {node.node_id} is "
                       f"{'asleep' if wakeable else 'offline'}",
                       f"No heartbeat from {node.node_id} for "
                       f"{time.monotonic() - node.last_seen:.0f} s; its requests go to "
                       f"other nodes" + (", or wake it (Wake-on-LAN) where only it has "
                                         "their model." if wakeable else "."),
                       about=("node", node.node_id), state="offline", node_id=node.node_id,
                       severity="info" if wakeable else "warning")
        elif old == OFFLINE and new in (ONLINE, DEGRADED, DRAINING):
            self.alert("node_back", f"node {node.node_id} is back",
                       f"{node.node_id} sends heartbeats again.", about=("node",
                       node.node_id), state="online", severity="info", node_id=node.node_id)

    def pull_failed(self, model, error):
        self.alert("pull_failed", f"pulling {model} failed", str(error)[:500],
                   about=("pull", model), state=str(error)[:100])

    def health(self, findings):
        """The health checks now: one critical that was not, or no longer is."""
        now = {(f["check"], f["node_id"], f["model"]): f for f in findings
               if f["severity"] == "critical"}
        for key in now.keys() - self.critical:
            f = now[key]
            self.alert("check_critical", f["title"], f["description"],
                       about=("check", *key), state="critical", severity="critical",
                       node_id=f["node_id"])
        for key in self.critical - now.keys():
            self.alert("check_cleared", f"cleared: {key[0]}",
                       f"The {key[0]} health check is no longer critical.",
                       about=("check", *key), state="clear", severity="info",
                       node_id=key[1])
        self.critical = set(now)

    # -- sending ----------------------------------------------------------------------

    async def run(self):
        """Send what is queued, one at a time, for as long as the router runs."""
        while True:
            item = await self.queue.get()
            now = time.monotonic()
            while self.sent_at and now - self.sent_at[0] > 60:
                self.sent_at.popleft()
            if len(self.sent_at) >= ALERT_RATE:
                self.counts["limited"] += 1
                continue
            self.sent_at.append(now)
            await self._deliver(item)

    async def _deliver(self, item):
        for attempt in range(ALERT_TRIES):
            try:
                await self._send(item)
                self.counts["sent"] += 1
                return
            except (hc.UpstreamError, OSError, TimeoutError) as e:
                error = e
            if attempt + 1 < ALERT_TRIES:
                await asyncio.sleep(2 ** attempt)
        self.counts["failed"] += 1
        log.warning(f"an alert could not be sent after {ALERT_TRIES} tries: {error}",
                    extra={"event": "alert_failed"})

    async def _send(self, item):
        kind, target = self.target
        text = f"{item['title']}: {item['message']}"
        if kind == "exec":
            return await self._run_command(target, item)
        if kind == "ntfy":  # ntfy's publish: the body is the message, headers the rest
            body = item["message"].encode()
            headers = [(b"title", hc.printable(item["title"]).encode()),
                       (b"priority", b"high" if item["severity"] == "critical" else
                        b"default"), (b"tags", item["event"].encode()),
                       (b"content-type", b"text/plain; charset=utf-8")]
        else:  # "text" is what Slack's and Mattermost's webhooks show, "content" Discord's
            body = hc.dump_json({**item, "text": text, "content": text})
            headers = [(b"content-type", hc.JSON_TYPE)]
        parts = urllib.parse.urlsplit(target)  # split_url keeps the path, not the query
        path = ("" if parts.path.rstrip("/") else "/") + \
            (f"?{parts.query}" if parts.query else "")
        status, _, answer = await hc.http_call(target, "POST", path, body, headers=headers,
                                               timeout=ALERT_TIMEOUT_S)
        if status >= 300:
            raise hc.UpstreamError("status", f"the receiver answered {status}: "
                                             f"{answer[:200]!r}")

    @staticmethod
    async def _run_command(argv, item):
        """The command, with the alert in its environment and as JSON on its stdin."""
        env = {**os.environ, "HERD_ALERT_EVENT": item["event"],
               "HERD_ALERT_TITLE": item["title"], "HERD_ALERT_MESSAGE": item["message"],
               "HERD_ALERT_SEVERITY": item["severity"]}
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, env=env)
        try:
            async with asyncio.timeout(ALERT_TIMEOUT_S):
                await proc.communicate(hc.dump_json(item))
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise OSError(f"{argv[0]} exited with {proc.returncode}")

    def view(self):
        """/fleet/status's and the dashboard's `alerts`: the recent events, newest
        first, what became of those raised, and how many wait to be sent (at most
        queue_limit: past it they are dropped)."""
        return {"to": self.target[0] if self.target else None,
                "recent": list(reversed(self.recent))[:20], "counts": dict(self.counts),
                "queued": self.queue.qsize(), "queue_limit": ALERT_QUEUE}


####################################################################################
# Background duties: the local node, the status watch, the reaper, the rebalancer
####################################################################################


class LocalNode:
    """Serves this machine's Ollama as a node while no agent reports it."""

    def __init__(self, cfg, fleet):
        self.cfg, self.fleet = cfg, fleet
        self.node_id = hc.default_node_id()
        self.addresses = local_addresses()
        self._settings, self._settings_at = {}, -1e9

    def covers(self, hb):
        """Does a heartbeat describe the Ollama we would serve locally?"""
        host, port, _ = hc.split_url(hb.ollama_url)
        _, local_port, _ = hc.split_url(self.cfg.local_ollama_url)
        return port == local_port and (hc.is_loopback_host(host) or host in self.addresses)

    def is_router(self, url, router_port):
        """Does `url` point at this router itself (a request would go round in a loop)?"""
        host, port, _ = hc.split_url(url)
        return port == router_port and (hc.is_loopback_host(host) or host in self.addresses)

    def yield_to(self, hb):
        """An agent's heartbeat for this machine's Ollama: the agent reports it now."""
        node = self.fleet.nodes.get(self.node_id)
        if node is not None and node.local and self.covers(hb):
            self.fleet.remove(self.node_id)

    def _taken(self):
        node = self.fleet.nodes.get(self.node_id)
        if node is not None and not node.local and node.status not in GONE:
            return True
        return any(not n.local and n.status not in GONE and self.covers(n.hb)
                   for n in self.fleet.nodes.values())

    async def poll(self):
        """One look at the local Ollama, reported as a heartbeat of our own."""
        if self._taken():
            return
        ollama = await hc.read_ollama(self.cfg.local_ollama_url, timeout=3)
        if not ollama["ok"] and self.node_id not in self.fleet.nodes:
            return  # no Ollama here (yet): nothing to serve
        if time.monotonic() - self._settings_at >= 60:  # Ollama may restart with others
            port = hc.split_url(self.cfg.local_ollama_url)[1]
            found, _ = await asyncio.to_thread(hc.find_ollama_settings, psutil, port)
            self._settings, self._settings_at = found or {}, time.monotonic()
        machine = await asyncio.to_thread(hc.read_machine, psutil, self.cfg.data_dir)
        if self._taken():
            return  # an agent took this Ollama over while we looked at it
        slots, source = hc.resolve_num_parallel(0, self._settings, os.environ)
        self.fleet.apply_heartbeat(hc.Heartbeat(hc.build_heartbeat(
            self.node_id, self.cfg.local_ollama_url, machine, ollama, self._settings,
            slots, source)), local=True)


def local_addresses():
    """This machine's IP addresses (to recognise its own Ollama in heartbeats)."""
    found = set()
    try:
        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    found.add(a.address.split("%")[0])
    except OSError:
        pass
    return found


async def load_learning(learner, fleet, traces, cfg):
    """Start from what an earlier run learned, and what the router FLEET_LEARNED_FROM
    names learned more lately; failing both, a week of traces."""
    try:
        learner.load(await traces.load_learned())
        if cfg.learned_from:
            learner.take(await learned_from(cfg))
        if not learner.speeds:
            learner.seed(await traces.mean_latencies(time.time() - 7 * 86400))
    except Exception as e:  # a damaged database must not stop the router
        log.warning("could not read what earlier runs learned: %s", e)
    for key, speed in learner.speeds.items():
        if speed.concurrency:
            fleet.concurrency.setdefault(key, speed.concurrency)


async def learned_from(cfg):
    """The learned rows of the router FLEET_LEARNED_FROM names, checked as any network
    input is (learned_rows); [] when it cannot be asked, said in the log. A key of ours
    goes with the request (a router and its standby share their keys)."""
    key = cfg.admin_key or next(iter(sorted(cfg.client_keys)), "")
    headers = [(b"authorization", b"Bearer " + key.encode())] if key else []
    try:
        status, _, body = await hc.http_call(cfg.learned_from, "GET", "/fleet/learned",
                                             headers=headers, timeout=10)
        if status != 200:
            raise hc.UpstreamError("status", f"answered {status}")
        rows, refused = learned_rows(json.loads(body).get("learned"))
    except (hc.UpstreamError, ValueError, AttributeError, RecursionError) as e:
        log.warning(f"could not take what {cfg.learned_from} learned: {e}",
                    extra={"event": "learned_from"})
        return []
    log.info(f"took {len(rows)} learned figures from {cfg.learned_from}"
             + (f" ({refused} left out)" if refused else ""), extra={"event": "learned_from"})
    return rows


LEARNED_NUMBERS = ("ttft_ms", "cold_ms", "load_ms", "prompt_eval_ms", "queue_ms",
                   "decode_tps", "prompt_tps", "latency_ms", "service_ms", "tokens")


def learned_rows(listed):
    """Another router's learned rows, each field checked as a heartbeat's are: (rows,
    how many were left out). ValueError when it is no list at all."""
    if not isinstance(listed, list):
        raise ValueError("no list of learned figures")
    rows, refused = [], 0
    for item in listed[:hc.LEARNED_MAX_ROWS]:
        try:
            f = hc.Fields(item)
            row = {"node_id": hc.check_node_id(f.text("node_id", 64)),
                   "model": hc.canonical_model(hc.check_model_name(f.text("model", 256))),
                   "samples": f.integer("samples", 10**9),
                   "concurrency": f.integer("concurrency", 1024),
                   "size": f.integer("size", 1 << 50),
                   "levels": f.text("levels", 16384),
                   "updated_at": f.number("updated_at", time.time() + 86400)}
            row.update((k, f.number(k, 1e9, None)) for k in LEARNED_NUMBERS)
        except (ValueError, TypeError) as e:
            refused += 1
            log.debug(f"a learned row left out: {e}")
            continue
        rows.append(row)
    return rows, refused


def save_learning(learner, traces):
    if learner.dirty:
        traces.save_learned(learner.rows())


def start_duties(tasks, cfg, fleet, scheduler, proxy, local, traces, learner, health):
    """The router's background loops, each a named task in `tasks`."""
    tasks.spawn(hc.repeat(fleet.refresh_status, min(1.0, cfg.heartbeat_timeout / 4), log,
                          "the node status watch"), "status-watcher")
    tasks.spawn(fleet.alerts.run(), "alerts")
    tasks.spawn(hc.repeat(lambda: look_for_alerts(health, fleet.alerts),
                          HEALTH_ALERT_EVERY_S, log, "the health checks' alerts"),
                "health-alerts")
    if cfg.learning:
        tasks.spawn(load_learning(learner, fleet, traces, cfg), "load-learning")
        tasks.spawn(hc.repeat(lambda: save_learning(learner, traces), Learner.SAVE_EVERY_S,
                              log, "saving what was learned"), "save-learning")
    tasks.spawn(hc.repeat(scheduler.rebalance, cfg.rebalance_interval, log, "rebalancing"),
                "rebalancer")
    tasks.spawn(hc.repeat(proxy.warmer.tend_plan, PLAN_SOON_S, log, "placement"),
                "placement")
    tasks.spawn(hc.repeat(proxy.records.reap_zombies, min(30.0, cfg.stale_timeout / 4), log,
                          "the zombie reaper"), "zombie-reaper")
    if cfg.local_node:
        tasks.spawn(hc.repeat(local.poll, cfg.local_node_interval, log,
                              "polling the local Ollama"), "local-node")


####################################################################################
# mDNS: tell node agents where we are
####################################################################################


async def look_for_alerts(health, alerts):
    """The health checks, run for their alerts (a critical one, one that clears); not in
    the router's first moments, while its nodes are still joining."""
    if time.monotonic() - health.fleet.started < HEALTH_ALERT_EVERY_S:
        return
    findings, _ = run_health_checks(await health.snapshot())
    alerts.health(findings)


def advertised_addresses(host):
    """The addresses we really listen on, as mDNS should announce them."""
    if hc.is_loopback_host(host) and host not in ("0.0.0.0", "::", ""):
        return ["127.0.0.1"]
    if host not in ("0.0.0.0", "::", ""):
        return [host]
    addrs = []
    for name, entries in psutil.net_if_addrs().items():
        for a in entries:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                addrs.append(a.address)
    return addrs or ["127.0.0.1"]


async def advertise(cfg, port):
    """Register _fleet-manager._tcp until cancelled."""
    addrs = advertised_addresses(cfg.host)
    interfaces = addrs if cfg.host not in ("0.0.0.0", "::", "") else None
    zc = AsyncZeroconf(interfaces=interfaces or InterfaceChoice.All, ip_version=IPVersion.V4Only)
    name = f"herd-{hc.short_hostname()}-{port}.{hc.MDNS_SERVICE_TYPE}"
    info = AsyncServiceInfo(hc.MDNS_SERVICE_TYPE, name,
                            addresses=[socket.inet_aton(a) for a in addrs], port=port,
                            properties={"version": hc.VERSION, "api": "ollama,openai",
                                        "tls": "1" if cfg.tls else "0"},
                            server=f"{hc.short_hostname()}.local.")
    try:
        # zeroconf's async calls return a task that finishes the announcements.
        await (await zc.async_register_service(info, allow_name_change=True))
        scheme = "https" if cfg.tls else "http"
        log.info("advertising on mDNS", extra={"url": f"{scheme}://{addrs[0]}:{port}"})
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await (await zc.async_unregister_service(info))
        await zc.async_close()


####################################################################################
# Run
####################################################################################


# Connections on their way out or in, bounded so that no one address fills the file
# table: refused ones in their lingering close (past this they close at once), and TLS
# handshakes under way, each given HttpConnection.HANDSHAKE_TIMEOUT (asyncio's 60 s).
MAX_REFUSING = 128
MAX_HANDSHAKES_PER_CLIENT = 32
MAX_HANDSHAKES = 256
# Connections this machine's own loopback address may open past FLEET_MAX_CONNECTIONS: a
# health check here (keepalived's curl) says the router is up when it is full, not down.
LOCAL_RESERVE = 4
OWN_ADDRESSES = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


class RouterServer:
    """The router: every part made once, wired together, with its socket and tasks."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.traces = hc.TraceStore(os.path.join(cfg.data_dir, "latency.db"),
                                    cfg.trace_queue, cfg.trace_retention_days)
        self.tasks = hc.TaskSet(log)  # background duties and one-off jobs
        self.connections = set()  # every client connection, admitted or being refused
        self.per_client = collections.Counter()  # client address -> connections admitted
        self.admitted = 0  # what FLEET_MAX_CONNECTIONS caps: refused ones are not counted
        self.refusing = 0  # refused and closing (a second of lingering close at most)
        self.handshakes = collections.Counter()  # client address -> TLS handshakes pending
        self.counters = collections.Counter()  # connection events, for /fleet/status
        self.max_connections = cfg.max_connections
        self.stopping = False
        self.server = self.port = None
        self._fd_warned = 0.0

    def _build(self):
        cfg, traces, tasks = self.cfg, self.traces, self.tasks
        self.pool = hc.UpstreamPool()
        self.fleet = fleet = Fleet(cfg)
        stats = Stats(fleet.knows_model)
        self.learner = learner = Learner()
        self.scheduler = scheduler = Scheduler(cfg, fleet, learner, stats)
        pulls = Puller(cfg, fleet, tasks)
        warmer = Warmer(cfg, fleet, tasks, scheduler.placement)
        self.proxy = Proxy(cfg, fleet, scheduler, learner, pulls, warmer, stats, traces,
                           self.pool)
        self.local = LocalNode(cfg, fleet)
        self.health = Health(cfg, fleet, traces, stats, learner)
        dashboard = DashboardApi(cfg, fleet, traces, self.health)
        self.api = Api(cfg, fleet, scheduler, self.proxy, pulls, stats, traces, self.local,
                       self.counters, dashboard, learner)

    async def start(self):
        # psutil and SQLite reads are short: two threads do (each extra thread costs
        # memory, and idle memory is a target).
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="herd-io"))
        loop.set_exception_handler(self._loop_error)
        self.max_connections = min(self.cfg.max_connections, connection_room())
        self.traces.start()
        self._build()
        # With TLS too the socket is accepted plain: each connection then counts from
        # its accept, per address, and does its own handshake (HttpConnection).
        self.server = await loop.create_server(self._new_connection, self.cfg.host,
                                               self.cfg.port, reuse_address=True,
                                               backlog=1024)
        port = self.server.sockets[0].getsockname()[1]
        self.port = self.api.port = self.api.nodes.port = port
        start_duties(self.tasks, self.cfg, self.fleet, self.scheduler, self.proxy, self.local,
                     self.traces, self.learner, self.health)
        if self.cfg.mdns:
            self.tasks.spawn(advertise(self.cfg, self.port), "mdns-advertise")
        scheme = "https" if self.cfg.tls else "http"
        log.info(f"herd router {hc.VERSION} listening on {scheme}://{self.cfg.host}:{self.port}")
        if not self.cfg.token:
            log.warning("FLEET_TOKEN is not set: any host that can reach this router can "
                        "join as a node and receive prompts. Set FLEET_TOKEN here and "
                        "FLEET_NODE_TOKEN on each agent", extra={"event": "open_fleet"})
        return self.port

    def _new_connection(self):
        conn = hc.HttpConnection(
            self.api.handle, max_body=int(self.cfg.max_body_mb * (1 << 20)),
            body_limits={"/heartbeat": hc.HEARTBEAT_MAX_BYTES},
            stream_limits={"/api/blobs/": int(self.cfg.max_blob_gb * (1 << 30)),
                           **{path: int(self.cfg.max_upload_mb * (1 << 20))
                              for path in TRANSCRIBE_ROUTES}},
            idle_timeout=self.cfg.idle_timeout, read_timeout=30.0,
            header_timeout=self.cfg.header_timeout, log=log, on_open=self._opened,
            on_close=self._closed, counters=self.counters, check_head=self.api.check_head,
            tls=self.cfg.tls, on_secure=self._handshake_over)
        return conn

    def _opened(self, conn):
        """Admit a connection, or say why not. An address past its own cap is refused
        before the router-wide cap is looked at, and a refused connection is not
        counted against that cap while it closes: one address opening hundreds a
        second takes no room from others. A connection still to do its TLS handshake
        also has to fit under the handshake caps, as a silent one holds it for
        HANDSHAKE_TIMEOUT."""
        self.connections.add(conn)
        if self.stopping:
            conn.abort()  # accepted as the router shuts down: dropped
            return None
        refusal = self._refusal(conn.client_ip, conn.handshaking)
        if refusal is None:
            self.per_client[conn.client_ip] += 1
            self.admitted += 1
            conn.admitted = True
            if conn.handshaking:
                self.handshakes[conn.client_ip] += 1
            return None
        self.counters["connections_refused"] += 1
        self.refusing += 1
        conn.refused = True
        conn.lingers = self.refusing <= MAX_REFUSING  # past it, close at once
        return refusal

    def _refusal(self, ip, handshaking):
        """Why a new connection from `ip` is refused, or None."""
        if self.per_client[ip] >= self.cfg.max_connections_per_client:
            return (f"{ip} has {self.cfg.max_connections_per_client} connections open "
                    f"(FLEET_MAX_CONNECTIONS_PER_CLIENT)")
        if self.admitted >= self.max_connections + (LOCAL_RESERVE if ip in OWN_ADDRESSES
                                                    else 0):
            return f"the router has {self.max_connections} connections open; try again"
        if handshaking and (self.handshakes[ip] >= MAX_HANDSHAKES_PER_CLIENT
                            or self.handshakes.total() >= MAX_HANDSHAKES):
            return "too many TLS handshakes under way"
        return None

    def _handshake_over(self, conn):
        """A connection's TLS handshake is done, or it closed before it was."""
        if getattr(conn, "admitted", False) and not getattr(conn, "secured", False):
            conn.secured = True
            self.handshakes[conn.client_ip] -= 1
            if not self.handshakes[conn.client_ip]:
                del self.handshakes[conn.client_ip]

    def _closed(self, conn):
        self.connections.discard(conn)
        if getattr(conn, "refused", False):
            self.refusing -= 1
        if not getattr(conn, "admitted", False):
            return
        if self.cfg.tls is not None:
            self._handshake_over(conn)
        self.admitted -= 1
        self.per_client[conn.client_ip] -= 1
        if not self.per_client[conn.client_ip]:
            del self.per_client[conn.client_ip]

    def _loop_error(self, loop, context):
        """Out of file descriptors, asyncio pauses accepting for a second and reports it
        each time: one line a minute here, counted, instead of a traceback a second."""
        if "out of system resource" in context.get("message", ""):
            self.counters["accept_paused"] += 1
            if time.monotonic() - self._fd_warned > 60:
                self._fd_warned = time.monotonic()
                log.warning(f"out of file descriptors ({context.get('exception')}): not "
                            f"accepting for a moment; raise the limit (ulimit -n)",
                            extra={"event": "accept_paused"})
            return
        exc = context.get("exception")
        if self.stopping and isinstance(exc, ValueError) and "file descriptor" in str(exc):
            # asyncio retries accepting a second after EMFILE, on a timer it never
            # cancels: fired after stop() closed the listener, it finds fd -1.
            return
        loop.default_exception_handler(context)

    async def stop(self, grace=0.0):
        """Stop listening, give streams `grace` seconds, then close everything."""
        self.stopping = True
        self.server.close()
        if grace:
            await self.api.wait_in_flight(grace)
        conns = list(self.connections)
        handlers = [c.task for c in conns if c.task]
        for task in handlers:
            task.cancel(msg="router shutting down")
        await asyncio.gather(*handlers, self.tasks.stop("router shutting down"),
                             return_exceptions=True)
        for conn in conns:
            conn.abort()
        await asyncio.gather(*(c.closed for c in conns), return_exceptions=True)
        await self.server.wait_closed()
        self.pool.close_all()
        self.traces.save_learned(self.learner.rows())  # written before the writer stops
        await asyncio.to_thread(self.traces.close)


def connection_room():
    """Client connections the file limit leaves room for: each proxied request also holds
    a connection to a node, and the trace store, logs and mDNS need a few. The soft limit
    is raised to the hard one first (macOS starts at 256)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else 65536
        if soft < min(wanted, 65536):
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, 65536), hard))
                soft = min(wanted, 65536)
    except ImportError:  # pragma: no cover - Windows has no such limit to mind
        return 1 << 20
    return max(16, (soft - 64) // 2)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="herd.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Herd router: one Ollama/OpenAI endpoint for every Ollama on the LAN.",
        epilog=hc.format_settings_help(ROUTER_SETTINGS))
    parser.add_argument("--host", help="address to listen on (FLEET_HOST)")
    parser.add_argument("--port", help="port to listen on (FLEET_PORT)")
    hc.add_service_flags(parser)
    return parser.parse_args(argv)


async def run(cfg):
    server = RouterServer(cfg)
    try:
        await server.start()
    except OSError as e:
        log.error(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}")
        return 1
    await hc.stop_signal().wait()
    log.info("shutting down: letting streams finish", extra={"event": "shutdown"})
    await server.stop(grace=cfg.shutdown_grace)
    log.info("stopped")
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if hc.service_asked(args):
        return hc.service_main("herd", args, os.environ, load_router_config, ROUTER_SETTINGS,
                               __file__, lambda cfg: cfg.shutdown_grace)
    return hc.run_program("herd", os.environ, args, load_router_config, "herd.jsonl", run)


if __name__ == "__main__":
    sys.exit(main())
