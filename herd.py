#!/usr/bin/env python3
"""herd.py: the Herd router. One URL in front of every Ollama in the house.

It speaks Ollama's API (/api/*) and OpenAI's (/v1/*) on port 11435, picks the machine
that will answer fastest for each request (elimination, seven scored signals, a queue
per node+model), relays the answer chunk by chunk, and writes one trace row per request
to ~/.fleet-manager/latency.db. Node agents (herd_node.py) find it by mDNS and send
heartbeats; an Ollama on this machine is served by itself with no agent at all.

Run:   python herd.py            (python herd.py --help lists every FLEET_* setting)
Key settings: FLEET_PORT (11435), FLEET_HOST (0.0.0.0), FLEET_DATA_DIR (~/.fleet-manager),
              FLEET_TOKEN (heartbeat secret), FLEET_HOLD_TIMEOUT (30 s)

    $ curl -s localhost:11435/api/chat -d '{"model":"llama3.2:3b","stream":false,
        "messages":[{"role":"user","content":"hi"}]}'
    {"model":"llama3.2:3b","created_at":"2026-11-22T12:00:00.1Z","message":{"role":
    "assistant","content":"Hello! How can I help?"},"done":true,"done_reason":"stop",...}
    $ curl -s localhost:11435/fleet/queue
    {"queues":[{"node_id":"mac-studio","model":"llama3.2:3b","active":1,"waiting":0,
    "limit":4,"estimated_wait_s":0.0}],"total_active":1,"total_waiting":0,"holding":0}
"""

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import hmac
import json
import logging
import os
import re
import socket
import sys
import time
import urllib.parse

try:
    import psutil
    from zeroconf import InterfaceChoice, IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
except ImportError:  # pragma: no cover
    sys.exit("Herd needs h11, psutil and zeroconf: pip install h11 psutil zeroconf")

import herd_common as hc

log = logging.getLogger("herd.router")
fleet_log = logging.getLogger("herd.fleet")
proxy_log = logging.getLogger("herd.proxy")

ROUTER_SETTINGS = [
    hc.Setting("FLEET_HOST", "0.0.0.0", "address to listen on"),
    hc.Setting("FLEET_PORT", hc.DEFAULT_ROUTER_PORT, "port to listen on"),
    hc.Setting("FLEET_DATA_DIR", "~/.fleet-manager", "traces (latency.db) and logs/"),
    hc.Setting("FLEET_TOKEN", "", "if set, node agents must send it (Bearer) or get 401"),
    hc.Setting("FLEET_HEARTBEAT_TIMEOUT", 15.0, "seconds without a heartbeat before a node "
               "is degraded"),
    hc.Setting("FLEET_HEARTBEAT_OFFLINE", 30.0, "seconds without a heartbeat before a node "
               "is offline and gets no work"),
    hc.Setting("FLEET_HOLD_TIMEOUT", 30.0, "seconds a request waits for a node that can "
               "serve it before a 503"),
    hc.Setting("FLEET_STARTUP_WINDOW", 6.0, "seconds after start during which a model no "
               "node has reported yet waits (nodes report every 5 s) instead of a 404"),
    hc.Setting("FLEET_AUTO_PULL", True, "pull a model no node has onto the node with the "
               "most free memory, then serve the request"),
    hc.Setting("FLEET_AUTO_PULL_TIMEOUT", 600.0, "seconds a request waits for such a pull "
               "(503 after; the pull goes on)"),
    hc.Setting("FLEET_CONTEXT_PROTECTION", "strip", "a num_ctx that would reload a loaded "
               "model: strip (use the loaded context, or a larger loaded model of the same "
               "family), warn (log only) or passthrough"),
    hc.Setting("FLEET_MAX_RETRIES", 2, "other nodes tried when a node fails before the "
               "first chunk"),
    hc.Setting("FLEET_CLIENT_MAX_IN_FLIGHT", 0, "requests one client address may have in "
               "flight before it gets 429 (0: no limit)"),
    hc.Setting("FLEET_DEFAULT_NUM_PARALLEL", 4, "requests in flight per node+model when the "
               "node cannot tell Ollama's OLLAMA_NUM_PARALLEL"),
    hc.Setting("FLEET_PRE_WARM_THRESHOLD", 3, "requests queued or running on the chosen "
               "node+model at which the runner-up node loads the model too (0: never)"),
    hc.Setting("FLEET_REBALANCE_INTERVAL", 5.0, "seconds between moves of queued requests "
               "to nodes where their model is loaded and slots are free"),
    hc.Setting("FLEET_STALE_TIMEOUT", 600.0, "seconds a request sent to a node may show no "
               "progress before the reaper fails it and frees its slot"),
    hc.Setting("FLEET_MAX_BODY_MB", 64.0, "largest request body accepted (413 beyond)"),
    hc.Setting("FLEET_IDLE_TIMEOUT", 75.0, "seconds an idle keep-alive connection stays open"),
    hc.Setting("FLEET_CONNECT_TIMEOUT", 5.0, "seconds to connect to a node's Ollama"),
    hc.Setting("FLEET_FIRST_BYTE_TIMEOUT", 300.0, "seconds for Ollama to start answering "
               "(covers model load and prompt evaluation)"),
    hc.Setting("FLEET_CHUNK_TIMEOUT", 120.0, "seconds of silence mid-response before the "
               "node counts as stalled"),
    hc.Setting("FLEET_LOCAL_NODE", True, "serve an Ollama on this machine as a node "
               "without an agent"),
    hc.Setting("FLEET_LOCAL_OLLAMA_URL", "http://127.0.0.1:11434", "where that local "
               "Ollama listens"),
    hc.Setting("FLEET_LOCAL_NODE_INTERVAL", 5.0, "seconds between polls of the local Ollama"),
    hc.Setting("FLEET_MDNS", True, "advertise the router as _fleet-manager._tcp on the LAN"),
    hc.Setting("FLEET_TRACE_QUEUE", 10000, "trace rows buffered for the writer before "
               "rows are dropped (and counted)"),
    hc.Setting("FLEET_TRACE_RETENTION_DAYS", 30, "traces older than this are deleted "
               "(checked hourly; 0: keep them all)"),
    hc.Setting("FLEET_HEALTH_ERROR_RATE", 0.05, "share of failed requests in an hour that "
               "the health API calls a warning (critical at four times it)"),
    hc.Setting("FLEET_HEALTH_RETRY_RATE", 0.10, "share of retried attempts in an hour that is "
               "a warning (critical at four times it)"),
    hc.Setting("FLEET_HEALTH_DISCONNECT_RATE", 0.10, "share of requests whose client left, in "
               "an hour, that is a warning (critical at four times it)"),
    hc.Setting("FLEET_HEALTH_THRASH_LOADS", 3, "loads of one model on one node in an hour that "
               "count as thrashing"),
    hc.Setting("FLEET_SHUTDOWN_GRACE", 30.0, "seconds streams get to finish on SIGTERM"),
    *hc.LOG_SETTINGS,
]

# Fields a client may add for the router; they never reach Ollama.
ROUTING_FIELDS = ("fallback_models",)
NATIVE_INFERENCE = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings")
OPENAI_INFERENCE = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
BUSY_ERROR = "server busy, please try again.  maximum pending requests exceeded"
METRICS = [  # what GET /metrics exposes, in the Prometheus text format
    ("herd_requests_total", "counter", "Requests finished, by served model, node and status."),
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
]
MAX_MOVES = 8  # a queued request follows the rebalancer this often, then routes freely
NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

####################################################################################
# Fleet state: nodes, their queues, what we learned about them
####################################################################################


class Moved(Exception):
    """A waiting request is handed back for routing again (to `target` if given)."""

    def __init__(self, target=None):
        super().__init__(target)
        self.target = target


class SlotQueue:
    """One node+model: `limit` requests in flight, the rest wait in arrival order."""

    def __init__(self, limit):
        self.limit = limit
        self.active = 0
        self.waiters = collections.deque()

    @property
    def waiting(self):
        return len(self.waiters)

    async def acquire(self):
        if self.active < self.limit and not self.waiters:
            self.active += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed to us as we were cancelled
            else:
                self.waiters.remove(fut)
            raise

    def release(self):
        if self.active > self.limit:  # the node lowered its slots: shrink first
            self.active -= 1
            return
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes on; active stays the same
                return
        self.active -= 1

    def evict(self, count=None, target=None):
        """Hand the `count` oldest waiting requests (all by default) back for routing."""
        moved = 0
        while self.waiters and (count is None or moved < count):
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(Moved(target))
                moved += 1
        return moved

    def set_limit(self, limit):
        self.limit = limit
        while self.active < self.limit and self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                self.active += 1
                fut.set_result(None)


class Node:
    """A machine running Ollama, as its heartbeats describe it."""

    def __init__(self, node_id, local=False):
        self.node_id = node_id
        self.local = local
        self.ollama_url = ""
        self.host, self.port = "", 0
        self.first_seen = time.time()
        self.last_seen = 0.0  # monotonic
        self.status = "online"
        self.info = {}  # the last heartbeat body
        self.models = {}  # canonical name -> /api/tags entry
        self.loaded = {}  # canonical name -> /api/ps entry
        self.unloaded_at = {}  # canonical name -> monotonic time it left memory
        self.cpu_history = collections.deque(maxlen=6)
        self.num_parallel = 0

    @property
    def reachable(self):
        return bool(self.info.get("ollama", {}).get("reachable", True))

    @property
    def draining(self):
        return bool(self.info.get("draining"))

    @property
    def paused(self):
        return bool(self.info.get("paused"))

    def cpu_trend(self):
        h = list(self.cpu_history)
        if len(h) < 2:
            return 0.0
        half = len(h) // 2
        return sum(h[half:]) / (len(h) - half) - sum(h[:half]) / half

    def summary(self, fleet):
        mem = self.info.get("memory", {})
        return {
            "node_id": self.node_id, "status": self.status, "local": self.local,
            "ollama_url": self.ollama_url,
            "last_heartbeat_s": round(time.monotonic() - self.last_seen, 1),
            "agent_version": self.info.get("agent_version"),
            "hardware": self.info.get("hardware", {}),
            "memory": mem, "cpu": self.info.get("cpu", {}), "disk": self.info.get("disk", {}),
            "ollama": self.info.get("ollama", {}),
            "draining": self.draining, "paused": self.paused,
            "num_parallel": fleet.slots_for(self),
            "models_on_disk": sorted(self.models),
            "models_loaded": [
                {"model": name, "size": e.get("size"), "size_vram": e.get("size_vram"),
                 "context_length": e.get("context_length"), "expires_at": e.get("expires_at")}
                for name, e in sorted(self.loaded.items())],
            "queues": {model: {"active": q.active, "waiting": q.waiting, "limit": q.limit}
                       for (nid, model), q in fleet.queues.items() if nid == self.node_id},
        }


class Fleet:
    """Every node, every queue, and a signal for those waiting on a change."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.nodes = {}
        self.queues = {}
        self.latency = {}  # (node_id, model) -> [mean latency s, mean cold load s, samples]
        self.holding = 0
        self.started = time.monotonic()
        self.model_moves = collections.deque(maxlen=10000)  # (time, load|unload, node, model)
        self._changed = asyncio.get_running_loop().create_future()

    # -- change notification (the holding queue waits on this) -------------------

    def notify_change(self):
        if not self._changed.done():
            self._changed.set_result(None)
        self._changed = asyncio.get_running_loop().create_future()

    async def wait_change(self, timeout):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._changed)

    # -- heartbeats ---------------------------------------------------------------

    def apply_heartbeat(self, hb, local=False):
        """Take a validated heartbeat; returns the node."""
        node = self.nodes.get(hb["node_id"])
        if node is None:
            node = self.nodes[hb["node_id"]] = Node(hb["node_id"], local)
            fleet_log.info("node joined", extra={"node_id": node.node_id,
                                                 "url": hb["ollama_url"]})
        if node.ollama_url and node.ollama_url != hb["ollama_url"] and \
                node.status != "offline" and not local and not node.local:
            # Two machines with one name overwrite each other; say so once per change.
            fleet_log.warning(f"node id '{node.node_id}' now reports {hb['ollama_url']} "
                              f"instead of {node.ollama_url}: two machines with one name? "
                              f"Give each its own FLEET_NODE_NODE_ID",
                              extra={"node_id": node.node_id, "event": "node_id_conflict"})
        node.local = local
        node.ollama_url = hb["ollama_url"]
        node.host, node.port, _ = hc.split_url(node.ollama_url)
        node.info = hb
        node.last_seen = time.monotonic()
        if hb.get("ollama", {}).get("reachable", True):
            self._update_models(node, hb)
        # else: keep what it had; an Ollama restart should read as "unreachable" (503,
        # held), not as "model gone" (404).
        
        node.cpu_history.append(float(hb.get("cpu", {}).get("percent", 0.0)))
        node.num_parallel = int(hb.get("ollama", {}).get("num_parallel") or 0)
        self._set_status(node, "online")
        for (nid, _), q in self.queues.items():
            if nid == node.node_id:
                q.set_limit(self.slots_for(node))
        if node.draining or node.paused:
            self.evict_node(node, "draining" if node.draining else "paused")
        self.notify_change()
        return node

    def evict_node(self, node, why):
        """Send the requests waiting for `node` elsewhere; those running finish there."""
        moved = sum(q.evict() for (nid, _), q in self.queues.items() if nid == node.node_id)
        if moved:
            fleet_log.info(f"moved {moved} queued requests off a node that is {why}",
                           extra={"node_id": node.node_id, "event": "requeue"})

    def _update_models(self, node, hb):
        now = time.monotonic()
        node.models = {hc.canonical_model(m.get("model") or m["name"]): m
                       for m in hb.get("models", [])}
        loaded = {hc.canonical_model(m.get("model") or m["name"]): m
                  for m in hb.get("loaded", [])}
        for gone in node.loaded.keys() - loaded.keys():
            node.unloaded_at[gone] = now
            self.model_moves.append((time.time(), "unload", node.node_id, gone))
        for new in loaded.keys() - node.loaded.keys():
            self.model_moves.append((time.time(), "load", node.node_id, new))
        node.loaded = loaded

    def slots_for(self, node):
        return node.num_parallel or self.cfg.default_num_parallel

    def remove(self, node_id):
        if self.nodes.pop(node_id, None):
            fleet_log.info("node removed", extra={"node_id": node_id})
            self.notify_change()

    # -- status -------------------------------------------------------------------

    def refresh_status(self):
        """Move nodes to degraded / offline as heartbeats go missing."""
        now = time.monotonic()
        for node in self.nodes.values():
            silent = now - node.last_seen
            if silent >= self.cfg.heartbeat_offline:
                self._set_status(node, "offline")
            elif silent >= self.cfg.heartbeat_timeout:
                self._set_status(node, "degraded")

    def _set_status(self, node, status):
        if node.status != status:
            level = logging.INFO if status == "online" else logging.WARNING
            fleet_log.log(level, f"node {status}", extra={"node_id": node.node_id,
                                                         "event": f"node_{status}"})
            node.status = status
            if status == "offline":
                self.evict_node(node, "offline")
            self.notify_change()

    # -- queues and learning ------------------------------------------------------

    def queue(self, node, model):
        key = (node.node_id, model)
        q = self.queues.get(key)
        if q is None:
            q = self.queues[key] = SlotQueue(self.slots_for(node))
        return q

    def can_serve_now(self, node, model):
        """Free slots on a node where `model` is loaded (the only place to move work)."""
        if node.status != "online" or node.draining or node.paused or not node.reachable \
                or model not in node.loaded:
            return 0
        q = self.queues.get((node.node_id, model))
        busy = (q.active + q.waiting) if q else 0
        return max(0, self.slots_for(node) - busy)

    def rebalance(self):
        """Move queued requests to nodes where their model is hot and slots are free."""
        moved, free = 0, {}
        for (node_id, model), q in list(self.queues.items()):
            for target in self.nodes.values():
                if not q.waiters:
                    break
                if target.node_id == node_id:
                    continue
                key = (target.node_id, model)
                if key not in free:
                    free[key] = self.can_serve_now(target, model)
                count = q.evict(free[key], target.node_id) if free[key] else 0
                free[key] -= count  # moved requests arrive there a moment later
                moved += count
        if moved:
            fleet_log.info(f"rebalanced {moved} queued requests", extra={"event": "rebalance"})
        return moved

    def learn(self, node_id, model, latency_s, load_s=None):
        """Fold one completed request into the node+model averages."""
        entry = self.latency.setdefault((node_id, model), [latency_s, 0.0, 0])
        entry[2] += 1
        alpha = max(0.1, 1.0 / entry[2])
        entry[0] += alpha * (latency_s - entry[0])
        if load_s is not None:
            entry[1] = load_s if not entry[1] else entry[1] + 0.3 * (load_s - entry[1])

    def warm_until(self):
        return self.started + self.cfg.startup_window

    def warming_up(self):
        """Just started: nodes may not have reported yet, so 'unknown model' can wait."""
        return time.monotonic() < self.warm_until()

    def holders(self, model):
        """Nodes that have `model` on disk, whatever their state."""
        return [n for n in self.nodes.values() if model in n.models]


####################################################################################
# Heartbeats: validated before anything about the node changes
####################################################################################

_HEARTBEAT_FIELDS = [
    # (dotted path, type(s), required)
    ("node_id", str, True), ("ollama_url", str, True), ("agent_version", str, False),
    ("hardware", dict, False), ("cpu", dict, False), ("cpu.percent", (int, float), False),
    ("memory", dict, False), ("memory.total", int, False), ("memory.used", int, False),
    ("memory.available", int, False), ("memory.pressure", str, False), ("disk", dict, False),
    ("ollama", dict, False), ("ollama.reachable", bool, False),
    ("ollama.version", str, False), ("ollama.num_parallel", int, False),
    ("ollama.settings", dict, False), ("models", list, False), ("loaded", list, False),
    ("draining", bool, False), ("paused", bool, False),
]


def _lookup(body, path):
    value = body
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None, False
        value = value[part]
    return value, True


def validate_heartbeat(body):
    """Raise ValueError naming the first bad field; returns the body."""
    for path, kinds, required in _HEARTBEAT_FIELDS:
        value, present = _lookup(body, path)
        if not present or value is None:
            if required:
                raise ValueError(f"field '{path}' is required")
            continue
        if isinstance(value, bool) and kinds is not bool:
            raise ValueError(f"field '{path}' must be a {_kind_name(kinds)}")
        if not isinstance(value, kinds):
            raise ValueError(f"field '{path}' must be a {_kind_name(kinds)}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"field '{path}' must not be negative")
    if not NODE_ID_RE.match(body["node_id"]):
        raise ValueError("field 'node_id' must be 1-64 letters, digits, '.', '_' or '-'")
    try:
        hc.split_url(body["ollama_url"])
    except ValueError as e:
        raise ValueError(f"field 'ollama_url': {e}") from None
    if body.get("memory", {}).get("pressure", "normal") not in ("normal", "warning", "critical"):
        raise ValueError("field 'memory.pressure' must be normal, warning or critical")
    for key in ("models", "loaded"):
        for i, entry in enumerate(body.get(key) or []):
            if not isinstance(entry, dict) or not isinstance(
                    entry.get("model") or entry.get("name"), str):
                raise ValueError(f"field '{key}[{i}]' must be an object with a 'name'")
            if not isinstance(entry.get("size", 0), int):
                raise ValueError(f"field '{key}[{i}].size' must be an integer")
    return body


def _kind_name(kinds):
    names = {str: "string", int: "integer", float: "number", dict: "object", list: "list",
             bool: "boolean"}
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(names[k] for k in kinds)


####################################################################################
# Routing: elimination, scoring, the holding queue
####################################################################################


class RouteError(Exception):
    """The request cannot be routed: status, message, and extra headers."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status, self.headers = status, list(headers)


class Choice:
    """The node chosen for a request and why."""

    __slots__ = ("node", "model", "score", "breakdown", "hot", "runner_up")

    def __init__(self, node, model, score, breakdown, hot, runner_up=None):
        self.node, self.model = node, model
        self.score, self.breakdown, self.hot = score, breakdown, hot
        self.runner_up = runner_up  # the next best node's Candidate, if any


def build_candidate(fleet, node, model, requested_ctx):
    """The scoring view of one node for one model."""
    entry = node.models.get(model, {})
    loaded = node.loaded.get(model)
    q = fleet.queues.get((node.node_id, model))
    mem = node.info.get("memory", {})
    learned = fleet.latency.get((node.node_id, model), (0.0, 0.0, 0))
    unloaded = node.unloaded_at.get(model)
    details = entry.get("details") or {}
    return hc.Candidate(
        node_id=node.node_id, hot=loaded is not None,
        recently_unloaded=unloaded is not None
        and time.monotonic() - unloaded < hc.RECENT_UNLOAD_S,
        model_size=int(entry.get("size") or 0),
        mem_total=int(mem.get("total") or 0), mem_available=int(mem.get("available") or 0),
        mem_reclaimable=sum(int(m.get("size") or 0) for name, m in node.loaded.items()
                            if name != model),
        pressure=mem.get("pressure", "normal"),
        active=q.active if q else 0, waiting=q.waiting if q else 0,
        slots=fleet.slots_for(node), mean_latency_s=learned[0], load_estimate_s=learned[1],
        cpu_percent=float(node.info.get("cpu", {}).get("percent", 0.0)),
        cpu_trend=node.cpu_trend(), degraded=node.status == "degraded",
        requested_ctx=requested_ctx,
        loaded_ctx=int((loaded or {}).get("context_length") or 0),
        model_max_ctx=int(details.get("context_length") or 0),
    )


def rank_nodes(fleet, model, requested_ctx, exclude=()):
    """Survivors of elimination, best first, and why the others were dropped."""
    candidates, reasons = [], []
    for node in fleet.nodes.values():
        if model not in node.models:
            continue  # not a candidate at all; not worth naming
        why = None
        if node.node_id in exclude:
            why = "failed this request already"
        elif node.status == "offline":
            why = "offline"
        elif node.draining:
            why = "draining"
        elif node.paused:
            why = "paused"
        elif not node.reachable:
            why = "its Ollama is unreachable"
        if why is None:
            c = build_candidate(fleet, node, model, requested_ctx)
            why = hc.eliminate(c)
            if why is None:
                candidates.append(c)
                continue
        reasons.append(f"{node.node_id}: {why}")
    return hc.rank_candidates(candidates), reasons


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


async def choose_node(fleet, cfg, models, requested_ctx, exclude=(), shown_name=None,
                      hold=True, prefer=None):
    """The best node for the first model of `models` that can be served (the rest are
    fallbacks), waiting in the holding queue while none can be."""
    deadline = time.monotonic() + (cfg.hold_timeout if hold else 0.0)
    shown_name = shown_name or models[0]
    fleet.holding += 1
    try:
        while True:
            known = any(fleet.holders(m) for m in models)
            if not known and not fleet.warming_up():
                raise RouteError(404, f"model '{shown_name}' not found on any node of "
                                      f"the fleet" + (" (nor its fallbacks)"
                                                      if len(models) > 1 else ""))
            ranked, reasons = {}, []
            for model in models:
                ranked[model], why = rank_nodes(fleet, model, requested_ctx, exclude)
                reasons += why
            picked = pick_route(models, ranked)
            if picked and prefer:  # the rebalancer's pick, if it can still take it
                model = picked[0]
                picked = next(((model, e) for e in ranked[model] if e[2].node_id == prefer),
                              picked)
            if picked:
                model, (score, breakdown, c) = picked
                others = [e[2] for e in ranked[model] if e[2].node_id != c.node_id]
                return Choice(fleet.nodes[c.node_id], model, score, breakdown, c.hot,
                              others[0] if others else None)
            until = deadline if known else min(deadline, fleet.warm_until())
            remaining = until - time.monotonic()
            if remaining <= 0:
                if not known:
                    continue  # the start-up window is over: answer 404 above
                retry_after = max(1, int(cfg.heartbeat_timeout))
                raise RouteError(503, f"no node can serve '{shown_name}' right now "
                                      f"({'; '.join(reasons) or 'no node online'}); "
                                      f"waited {cfg.hold_timeout:g}s",
                                 [(b"retry-after", str(retry_after).encode())])
            await fleet.wait_change(remaining)
    finally:
        fleet.holding -= 1


def requested_context(body):
    options = body.get("options")
    if isinstance(options, dict) and isinstance(options.get("num_ctx"), int):
        return max(0, options["num_ctx"])
    return 0


####################################################################################
# Proxy: one request to one node, relayed chunk by chunk
####################################################################################

NON_STREAM_BUFFER = 16 << 20  # a non-streamed answer up to this size is checked whole


class Exchange:
    """Everything known about one proxied request, written as its trace row."""

    def __init__(self, request, api, endpoint, model, stream, body):
        self.request_id = os.urandom(8).hex()  # 16 hex digits
        self.t0 = time.monotonic()
        self.wall = time.time()
        self.request = request
        self.api, self.endpoint, self.model, self.stream = api, endpoint, model, stream
        self.body = self.client_body = body
        self.node_id = None
        self.served_model = model
        self.retries = 0
        self.score = None
        self.breakdown = None
        self.status = "failed"
        self.http_status = None
        self.ttft = None
        self.queue_wait = None
        self.prompt_tokens = None
        self.completion_tokens = None
        self.error = None
        self.task = asyncio.current_task()
        self.progress = None  # monotonic time of the last sign of life once sent to a node
        self.relay = None
        self.reaped = False
        self.before_end = None  # coroutine function run before the response's last byte
        self.tags = None

    def touch(self):
        self.progress = time.monotonic()

    def last_progress(self):
        if self.progress is None:
            return None
        return max(self.progress, self.relay.last_progress if self.relay else 0.0)

    def reset_body(self):
        self.body, self.served_model = self.client_body, self.model

    def use_model(self, model, name_as_sent, body):
        """Serve another model (a fallback, a larger context): the body names it."""
        self.served_model = model
        self.rewrite(body, model=name_as_sent)

    def rewrite(self, body, num_ctx=None, **fields):
        """Forward `body` with these top-level fields (and options.num_ctx) changed."""
        out = {k: v for k, v in json.loads(self.body).items() if k not in ROUTING_FIELDS}
        out.update(fields)
        if num_ctx is not None:
            out["options"] = {**(out.get("options") or {}), "num_ctx": num_ctx}
        self.body = hc.dump_json(out)

    def error_body(self, status, message):
        if self.api == "openai":
            return hc.openai_error_body(status, message)
        return hc.ollama_error_body(message)

    def trace_row(self, status=None, node_id=None, error=None):
        ms = (time.monotonic() - self.t0) * 1000
        return {
            "request_id": self.request_id, "timestamp": self.wall, "model": self.served_model,
            "requested_model": self.model, "node_id": node_id or self.node_id,
            "status": status or self.status, "http_status": self.http_status,
            "latency_ms": round(ms, 2),
            "ttft_ms": round(self.ttft * 1000, 2) if self.ttft is not None else None,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "retries": self.retries, "score": self.score,
            "score_breakdown": json.dumps(self.breakdown) if self.breakdown else None,
            "client_addr": self.request.client, "api_format": self.api,
            "endpoint": self.endpoint, "stream": int(self.stream),
            "queue_wait_ms": round(self.queue_wait * 1000, 2)
            if self.queue_wait is not None else None,
            "error_message": error or self.error, "tags": self.tags,
        }


class AttemptFailed(Exception):
    """A node failed before anything reached the client: another node may try."""


def forward_headers(request):
    """The client's headers minus hop-by-hop ones (and Host: Ollama's guard, §1), and
    minus X-Herd-Tags, which is for the router."""
    return hc.end_to_end_headers(request.headers, (b"x-herd-tags",))


def response_headers(upstream_headers, ex, choice):
    headers = hc.end_to_end_headers(upstream_headers, (b"server", b"date"))
    headers += [
        (b"x-fleet-node", choice.node.node_id.encode()),
        (b"x-fleet-served-model", ex.served_model.encode()),
        (b"x-fleet-requested-model", ex.model.encode()),
        (b"x-fleet-retries", str(ex.retries).encode()),
        (b"x-fleet-score", f"{choice.score:.1f}".encode()),
    ]
    if ex.served_model != ex.model:
        headers.append((b"x-fleet-fallback", ex.served_model.encode()))
    return headers


def content_length(headers):
    for k, v in headers:
        if k == b"content-length":
            return int(v)
    return None


def is_busy(status, body):
    return status == 503 and b"server busy" in body


async def run_attempt(router, conn, ex, choice):
    """Send the request to the chosen node and relay its answer to the client."""
    cfg = router.cfg
    up, clean = None, False
    try:
        up, status, headers = await _send_upstream(router, ex, choice.node)
        length = content_length(headers)
        if length is not None and length <= NON_STREAM_BUFFER:
            await _relay_whole(cfg, conn, ex, choice, up, status, headers)
        else:
            await _relay_stream(cfg, conn, ex, choice, up, status, headers)
        clean = ex.status != "incomplete"
    except hc.UpstreamError as e:
        if not conn.response_started:
            raise AttemptFailed(f"node {choice.node.node_id}: {e}") from None
        raise
    finally:
        if up is not None:
            router.pool.release(up) if clean else up.close()


async def _send_upstream(router, ex, node):
    """Send the request and wait for the response head, on a kept-alive connection
    when there is one; a kept-alive connection the node has closed meanwhile is
    replaced by a fresh one, once (that is no failure of the node)."""
    cfg = router.cfg
    up = await router.pool.connect(node.host, node.port, cfg.connect_timeout)
    for fresh in (False, True):
        try:
            await up.send_request(ex.request.method.encode(), ex.request.target.encode(),
                                  forward_headers(ex.request), ex.body)
            status, headers = await up.receive_head(cfg.first_byte_timeout)
            return up, status, headers
        except hc.UpstreamError as e:
            up.close()
            if fresh or not (up.reused and e.closed):
                raise
            up = await hc.Upstream.connect(node.host, node.port, cfg.connect_timeout)
        except BaseException:
            up.close()
            raise


async def _relay_whole(cfg, conn, ex, choice, up, status, headers):
    """A response with Content-Length: read it whole, so a cut-off body is a clean 502."""
    body = await up.read_body(cfg.chunk_timeout)
    if status >= 500 and not is_busy(status, body):
        raise hc.UpstreamError("status", f"answered {status}: "
                                         f"{body[:300].decode('utf-8', 'replace')}")
    ex.ttft = time.monotonic() - ex.t0
    ex.http_status = status
    if ex.before_end and status < 400:
        await ex.before_end()
    await conn.send_response(status, body, None, response_headers(headers, ex, choice))
    ex.status = "completed" if status < 400 else ("rejected" if status < 500 else "failed")
    if status >= 400:
        ex.error = body[:500].decode("utf-8", "replace")
    else:
        count_tokens(ex, body)


async def _relay_stream(cfg, conn, ex, choice, up, status, headers):
    """Chunk by chunk; the head goes out with the first chunk, so a node that fails
    before it can still be replaced by another."""
    if up.is_chunked(headers):
        receive = up.receive_chunks
    else:  # close-delimited or very large: frame it ourselves
        async def receive(timeout):
            data = await up.receive_data(timeout)
            return hc.frame_chunk(data) if data else b""
    first = await receive(cfg.chunk_timeout)
    ex.touch()
    ex.ttft = time.monotonic() - ex.t0
    ex.http_status = status
    await conn.start_response(status, None, response_headers(headers, ex, choice),
                              first_chunks=first)
    try:
        if first and up.is_chunked(headers) and conn.takes_raw_chunks:
            prev, last, chunks = await _relay_by_protocol(cfg, conn, ex, up, first)
        else:
            prev, last, chunks = await _relay_by_loop(cfg, conn, ex, receive, first)
    except hc.UpstreamError as e:
        await _end_with_error(conn, ex, f"node {choice.node.node_id} failed mid-stream: {e}")
        ex.status, ex.error = "incomplete", str(e)
        return
    if ex.before_end and status < 400:
        await ex.before_end()
    await conn.end_response()
    ex.status = "completed" if status < 400 else ("rejected" if status < 500 else "failed")
    if b'"error"' in last:
        ex.status, ex.error = "failed", last[-500:].decode("utf-8", "replace").strip()
    count_tokens(ex, prev[-8192:] + last, chunks)


async def _relay_by_protocol(cfg, conn, ex, up, first):
    """The fast path: the node's connection writes each read's chunks to the client."""
    ex.relay = up
    await up.relay(conn, cfg.chunk_timeout)
    await conn.drain()
    return (up.prev, up.last, up.reads + 1) if up.last else (b"", first, 1)


async def _relay_by_loop(cfg, conn, ex, receive, first):
    """The general path: one coroutine step per read (HTTP/1.0 clients, unchunked bodies)."""
    prev, last, chunks = b"", first, 1 if first else 0
    data = await receive(cfg.chunk_timeout) if first else b""
    while data:
        chunks += 1
        ex.touch()
        await conn.send_chunks(data)
        prev, last = last, data
        data = await receive(cfg.chunk_timeout)
    return prev, last, chunks


async def _end_with_error(conn, ex, message):
    """Tell a streaming client the answer broke off, in its own framing, and end."""
    if ex.api == "openai":
        line = b"data: " + hc.openai_error_body(502, message) + b"\n\n"
    else:
        line = hc.ollama_error_body(message) + b"\n"
    with contextlib.suppress(ConnectionError):
        await conn.send_data(line)
        await conn.end_response()


TOKEN_FIELDS = {  # Ollama writes its counts last: the tail of the answer has them
    "prompt_tokens": re.compile(rb'"(?:prompt_eval_count|prompt_tokens)":(\d+)'),
    "completion_tokens": re.compile(rb'"(?:eval_count|completion_tokens)":(\d+)'),
}


def count_tokens(ex, tail, chunks=0):
    """Token counts from the final chunk (Ollama) or the usage object (OpenAI)."""
    tail = tail[-4096:]  # never parse a whole (perhaps 16 MB) answer on the loop
    for field, pattern in TOKEN_FIELDS.items():
        found = pattern.findall(tail)
        if found:
            setattr(ex, field, int(found[-1]))
    if ex.completion_tokens is None and chunks and ex.api == "openai":
        ex.completion_tokens = max(0, chunks - 2)  # one token per content event


async def proxy_inference(router, request, conn, api, body, model, stream):
    """Route, queue, relay with retries before the first chunk, and trace."""
    ex = Exchange(request, api, request.path, model, stream, strip_routing_fields(request, body))
    ex.tags = request_tags(request, body)
    conn.watch_client()
    client = request.client.rpartition(":")[0]
    router.active[ex.request_id] = ex
    try:
        with router.admit(client):
            await _proxy_attempts(router, conn, ex, body)
    except RouteError as e:
        ex.status, ex.http_status, ex.error = "rejected", e.status, str(e)
        if e.status >= 500:
            ex.status = "failed"
        await conn.send_response(e.status, ex.error_body(e.status, str(e)),
                                 headers=e.headers)
    except asyncio.CancelledError:
        if ex.reaped and asyncio.current_task().uncancel() == 0:
            await _answer_reaped(router, conn, ex)  # the reaper's cancel ends here
            return
        if conn.client_gone:
            ex.status, ex.error = "cancelled", "client disconnected"
            proxy_log.info("client disconnected", extra={"request_id": ex.request_id,
                                                         "model": model,
                                                         "node_id": ex.node_id})
        else:
            ex.error = ex.error or "router shutting down"
        raise
    except ConnectionError as e:  # writing to the client failed: it is gone
        ex.status, ex.error = "cancelled", f"client connection lost: {e}"
    except hc.UpstreamError as e:
        ex.status, ex.error = "incomplete", str(e)
    finally:
        router.active.pop(ex.request_id, None)
        router.finish(ex)


async def _answer_reaped(router, conn, ex):
    """A request the reaper stopped: say so to the client in its framing."""
    ex.status = "failed"
    ex.error = (f"no progress for {router.cfg.stale_timeout:g}s on node {ex.node_id}: "
                f"request reaped (FLEET_STALE_TIMEOUT)")
    router.zombies_reaped += 1
    router.recent_events.append((time.time(), "zombie_reaped"))
    proxy_log.warning("zombie request reaped", extra={"request_id": ex.request_id,
                                                      "node_id": ex.node_id,
                                                      "model": ex.served_model})
    if conn.response_started:
        await _end_with_error(conn, ex, ex.error)
    else:
        ex.http_status = 504
        await conn.send_response(504, ex.error_body(504, ex.error))


async def _proxy_attempts(router, conn, ex, body):
    fleet, cfg = router.fleet, router.cfg
    exclude = []
    requested_ctx = requested_context(body)
    fallbacks = {hc.canonical_model(m): m for m in body.get("fallback_models") or ()}
    models = [ex.model] + [m for m in fallbacks if m != ex.model]
    bigger = larger_context_model(router, ex.model, requested_ctx)
    if bigger:
        models = [bigger] + models  # loaded with room for the context: no reload anywhere
        fallbacks[bigger] = bigger
    last_error, attempt, prefer, moves, pulled = None, 0, None, 0, False
    while attempt <= cfg.max_retries:
        try:
            # A retry takes the next best node now or not at all: no holding queue.
            choice = await choose_node(fleet, cfg, models, requested_ctx, exclude,
                                       body.get("model"), hold=attempt == 0, prefer=prefer)
        except RouteError as e:
            if e.status == 404 and cfg.auto_pull and not pulled:
                pulled = True  # no node has it: fetch it once, then route again
                await router.pulls.ensure(ex.model, body.get("model"), e)
                continue
            if last_error is None:
                raise
            break
        ex.node_id, ex.score, ex.breakdown = choice.node.node_id, choice.score, choice.breakdown
        ex.retries = attempt
        ex.reset_body()  # a retry must not inherit the last node's rewrites
        if choice.model != ex.model:
            ex.use_model(choice.model, fallbacks.get(choice.model, choice.model), body)
        protect_context(router, ex, choice, requested_ctx, body)
        q = fleet.queue(choice.node, choice.model)
        if cfg.pre_warm_threshold and q.active + q.waiting >= cfg.pre_warm_threshold:
            router.pre_warm(choice, fallbacks.get(choice.model, body.get("model")))
        t_queue = time.monotonic()
        try:
            await q.acquire()
        except Moved as m:  # drained, or rebalanced to a node with a free slot
            moves += 1
            prefer = m.target if moves < MAX_MOVES else None
            continue
        try:
            ex.queue_wait = time.monotonic() - t_queue
            ex.touch()
            await run_attempt(router, conn, ex, choice)
            if ex.status == "completed":
                router.fleet.learn(choice.node.node_id, choice.model,
                                   time.monotonic() - ex.t0,
                                   None if choice.hot else ex.ttft)
            return
        except AttemptFailed as e:
            last_error = str(e)
            proxy_log.warning("attempt failed, trying another node",
                              extra={"request_id": ex.request_id, "node_id": ex.node_id,
                                     "model": ex.served_model, "error": last_error})
            router.traces.record(ex.trace_row("retried", error=last_error))
            exclude.append(choice.node.node_id)
            attempt += 1
        finally:
            q.release()
    raise RouteError(502, f"no node could answer: {last_error}")


def protect_context(router, ex, choice, requested_ctx, body):
    """A num_ctx that would make Ollama reload a loaded model is set to the loaded
    context (FLEET_CONTEXT_PROTECTION=strip), or only logged (warn)."""
    mode = router.cfg.context_protection
    loaded = choice.node.loaded.get(choice.model) or {}
    loaded_ctx = int(loaded.get("context_length") or 0)
    if mode == "passthrough" or not requested_ctx or not loaded_ctx or \
            requested_ctx == loaded_ctx or requested_ctx > loaded_ctx:
        return  # nothing to save, or the client needs more than is loaded
    router.count_event(f"context_{'stripped' if mode == 'strip' else 'warned'}", ex,
                       f"num_ctx {requested_ctx} would reload {choice.model} "
                       f"(loaded with {loaded_ctx}) on {choice.node.node_id}")
    if mode == "strip":
        ex.rewrite(body, num_ctx=loaded_ctx)


def larger_context_model(router, model, requested_ctx):
    """A loaded model of the same family with room for `requested_ctx`, when the
    model asked for is loaded only with less (strip mode); else None."""
    fleet = router.fleet
    if router.cfg.context_protection != "strip" or not requested_ctx:
        return None
    loaded = [(n, n.loaded[model]) for n in fleet.nodes.values() if model in n.loaded]
    if not loaded or any(int(e.get("context_length") or 0) >= requested_ctx for _, e in loaded):
        return None
    family = next((n.models.get(model, {}).get("details", {}).get("family")
                   for n, _ in loaded if model in n.models), None)
    for node in fleet.nodes.values():
        for name, entry in node.loaded.items():
            details = node.models.get(name, {}).get("details") or {}
            if name != model and family and details.get("family") == family and \
                    int(entry.get("context_length") or 0) >= requested_ctx and \
                    node.status == "online":
                router.count_event("context_upgraded", None,
                                   f"num_ctx {requested_ctx} is more than {model} has loaded; "
                                   f"{name} on {node.node_id} has it")
                return name
    return None


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


def request_tags(request, body):
    """An app's tags, from X-Herd-Tags: a,b or "metadata": {"tags": [...]}."""
    tags = set()
    header = request.header("x-herd-tags")
    if header:
        tags.update(t.strip() for t in header.split(","))
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("tags"), list):
        tags.update(str(t).strip() for t in metadata["tags"])
    tags.discard("")
    return ",".join(sorted(tags)) or None


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


def check_offline_nodes(snap):
    for n in snap["nodes"]:
        if n["status"] == "offline":
            yield finding("offline_nodes", "critical", f"{n['node_id']} is offline",
                          f"No heartbeat for {n['silent_s']:.0f}s; it gets no work.",
                          "Check that herd_node.py runs there and can reach the router "
                          "(curl the router's /fleet/status from that machine).",
                          node=n["node_id"])


def check_degraded_nodes(snap):
    for n in snap["nodes"]:
        if n["status"] == "degraded":
            yield finding("degraded_nodes", "warning", f"{n['node_id']} is degraded",
                          f"No heartbeat for {n['silent_s']:.0f}s (degraded after "
                          f"{snap['heartbeat_timeout']:g}s); it is scored lower.",
                          "Look at ~/.fleet-manager/logs/herd-node.jsonl on that machine.",
                          node=n["node_id"])


def check_memory_pressure(snap):
    for n in snap["nodes"]:
        pressure = n["memory"].get("pressure", "normal")
        if pressure in ("warning", "critical") and n["status"] != "offline":
            yield finding("memory_pressure", pressure, f"{n['node_id']} is short of memory",
                          f"{n['memory'].get('percent', 0):.0f}% of its memory is in use "
                          f"(pressure {pressure}); at critical it gets no work.",
                          "Unload models it does not need (keep_alive 0), or lower "
                          "OLLAMA_MAX_LOADED_MODELS there.", node=n["node_id"])


def check_underutilized_nodes(snap):
    busy = {n: c for n, c in snap["requests_by_node"].items() if c}
    if sum(busy.values()) < 20:
        return  # too little traffic to call anyone idle
    for n in snap["nodes"]:
        if n["status"] == "online" and not busy.get(n["node_id"]):
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
    for (node, model), loads in snap["loads_by_model"].items():
        if loads >= snap["limits"]["thrash_loads"]:
            yield finding("model_thrashing", "warning", f"{model} keeps reloading on {node}",
                          f"Loaded {loads} times in the last {HEALTH_WINDOW_S // 60} min.",
                          "Set OLLAMA_KEEP_ALIVE=-1 and a higher OLLAMA_MAX_LOADED_MODELS "
                          "on that node.", node=node, model=model)


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
                      f"waited past FLEET_FIRST_BYTE_TIMEOUT or FLEET_CHUNK_TIMEOUT.",
                      "Look for an overloaded node in /fleet/status, or raise the time-outs "
                      "for very large models.")


def check_incomplete_streams(snap):
    if snap["incomplete"]:
        yield finding("incomplete_streams", "warning", "Answers broke off mid-stream",
                      f"{snap['incomplete']} streams in the last {HEALTH_WINDOW_S // 60} min "
                      f"ended with an error after their first chunk.",
                      "A node died or stalled mid-answer: its error_message in the traces "
                      "says which.")


def check_version_mismatch(snap):
    versions = {n["ollama_version"] for n in snap["nodes"]
                if n["status"] != "offline" and n["ollama_version"]}
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
                      f"The reaper stopped {snap['zombies_reaped']} requests with no progress "
                      f"for FLEET_STALE_TIMEOUT since the router started.",
                      "A node or a client hangs: the failed traces' error_message names it.")


HEALTH_CHECKS = (check_offline_nodes, check_degraded_nodes, check_memory_pressure,
                 check_underutilized_nodes, check_vram_fallbacks, check_kv_cache_bloat,
                 check_model_thrashing, check_request_timeouts, check_error_rates,
                 check_retry_rates, check_client_disconnects, check_incomplete_streams,
                 check_version_mismatch, check_context_protection, check_zombie_reaper)


def run_health_checks(snap):
    """Every finding, worst first, and a score from 100 down."""
    found = [f for check in HEALTH_CHECKS for f in check(snap)]
    found.sort(key=lambda f: SEVERITY_ORDER[f["severity"]])
    penalty = {"critical": 25, "warning": 10, "info": 2}
    score = max(0, 100 - sum(penalty[f["severity"]] for f in found))
    return found, score


TRACE_WINDOW_SQL = (
    "SELECT status, node_id, COUNT(*) AS n, AVG(ttft_ms) AS ttft, "
    "SUM(error_message LIKE '%sent no %' OR error_message LIKE '%timed out%') AS timeouts "
    "FROM request_traces WHERE timestamp > ? GROUP BY status, node_id")


VITALS_SQL = (  # one pass over the covering index: no sort, fast on a day of traces
    "SELECT COALESCE(SUM(status != 'retried'), 0) AS requests, "
    "COALESCE(SUM(status IN ('failed', 'incomplete')), 0) AS failed, "
    "AVG(CASE WHEN status = 'completed' THEN ttft_ms END) AS ttft "
    "FROM request_traces WHERE timestamp > ?")


MODEL_USAGE_SQL = (
    "SELECT model, node_id, COUNT(*) AS requests, "
    "SUM(status IN ('failed', 'incomplete')) AS errors, "
    "ROUND(AVG(CASE WHEN status='completed' THEN latency_ms END), 1) AS mean_latency_ms, "
    "ROUND(AVG(CASE WHEN status='completed' THEN ttft_ms END), 1) AS mean_ttft_ms, "
    "ROUND(SUM(CASE WHEN status='completed' THEN completion_tokens END) * 1000.0 / "
    "NULLIF(SUM(CASE WHEN status='completed' AND completion_tokens > 0 "
    "THEN latency_ms - COALESCE(ttft_ms, 0) END), 0), 1) AS tokens_per_s "
    "FROM request_traces WHERE timestamp > ? AND status != 'retried' "
    "GROUP BY model, node_id ORDER BY model, requests DESC")
TREND_RANGES = {"24h": (86400, 3600), "7d": (7 * 86400, 6 * 3600), "30d": (30 * 86400, 86400)}
TRENDS_SQL = (
    "SELECT CAST(timestamp / ? AS INTEGER) * ? AS t, COUNT(*) AS requests, "
    "SUM(status IN ('failed', 'incomplete')) AS errors, "
    "ROUND(AVG(CASE WHEN status='completed' THEN latency_ms END), 1) AS mean_latency_ms, "
    "ROUND(AVG(CASE WHEN status='completed' THEN ttft_ms END), 1) AS mean_ttft_ms, "
    "ROUND(SUM(completion_tokens) * 1000.0 / NULLIF(SUM(CASE WHEN completion_tokens > 0 "
    "THEN latency_ms - COALESCE(ttft_ms, 0) END), 0), 1) AS tokens_per_s "
    "FROM request_traces WHERE timestamp > ? AND status != 'retried' GROUP BY t ORDER BY t")


def trace_window(rows):
    """The trace side of a health snapshot from TRACE_WINDOW_SQL's rows."""
    out = collections.Counter()
    by_node = collections.Counter()
    ttft_sum = ttft_n = 0.0
    for r in rows:
        out[r["status"]] += r["n"]
        out["timeouts"] += r["timeouts"] or 0
        if r["status"] != "retried":
            out["requests"] += r["n"]
            by_node[r["node_id"]] += r["n"]
        if r["ttft"] is not None and r["status"] == "completed":
            ttft_sum += r["ttft"] * r["n"]
            ttft_n += r["n"]
    failed = out["failed"] + out["incomplete"]
    return {"requests": out["requests"], "failed": failed, "retried": out["retried"],
            "cancelled": out["cancelled"], "incomplete": out["incomplete"],
            "timeouts": out["timeouts"], "requests_by_node": dict(by_node),
            "mean_ttft_ms": round(ttft_sum / ttft_n, 1) if ttft_n else None}


####################################################################################
# Pulling models: on request (POST /api/pull) and when no node has one (auto-pull)
####################################################################################


class Puller:
    """One pull per model at a time; requests that need the model wait on it."""

    def __init__(self, router):
        self.router = router
        self.running = {}  # model -> Future of the pull
        self.progress = {}  # model -> {node_id, status, completed, total, ...}

    def pick_node(self, wanted=None):
        """The node to pull onto: the one named, else the one with most free memory."""
        nodes = [n for n in self.router.fleet.nodes.values()
                 if n.status == "online" and n.reachable and not n.draining and not n.paused]
        if wanted:
            return next((n for n in nodes if n.node_id == wanted), None)
        return max(nodes, key=lambda n: n.info.get("memory", {}).get("available", 0),
                   default=None)

    async def ensure(self, model, name, not_found):
        """Pull `model` (once, however many requests ask); raise 404 if it fails."""
        fut = self.running.get(model)
        if fut is None:
            fut = self.running[model] = asyncio.get_running_loop().create_future()
            # Every waiter may have given up by the time it fails: mark it seen.
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            task = asyncio.create_task(self._pull(model, name or model, fut),
                                       name=f"auto-pull {model}")
            self.router.background.add(task)
            task.add_done_callback(self.router.background.discard)
        try:
            async with asyncio.timeout(self.router.cfg.auto_pull_timeout):
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
        finally:
            self.running.pop(model, None)

    async def pull(self, node, name, model):
        """Stream Ollama's /api/pull on `node`, keeping its progress for /fleet/status."""
        state = self.progress[model] = {"node_id": node.node_id, "status": "starting",
                                        "started": hc.now_rfc3339()}
        fleet_log.info("pulling model", extra={"node_id": node.node_id, "model": model,
                                               "event": "pull"})
        up = await hc.Upstream.connect(node.host, node.port, self.router.cfg.connect_timeout)
        try:
            await up.send_request(b"POST", b"/api/pull", [(b"content-type", b"application/json")],
                                  hc.dump_json({"model": name, "stream": True}))
            status, _ = await up.receive_head(self.router.cfg.first_byte_timeout)
            pending = b""
            while data := await up.receive_data(self.router.cfg.chunk_timeout):
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    self._note(state, line, status)
            self._note(state, pending, status)
        except hc.UpstreamError as e:
            state["status"] = f"failed: {e}"
            raise
        finally:
            up.close()
        if state.get("status") != "success":
            raise hc.UpstreamError("pull", state.get("error") or f"ended with {state['status']}")
        await self.router.refresh_models(node)

    @staticmethod
    def _note(state, line, status):
        if not line.strip():
            return
        try:
            event = json.loads(line)
        except ValueError:
            event = {"error": line.decode("utf-8", "replace")[:200]}
        if status >= 400 or "error" in event:
            state["status"] = "failed"
            state["error"] = event.get("error", f"status {status}")
            raise hc.UpstreamError("pull", state["error"])
        state.update({k: event[k] for k in ("status", "completed", "total") if k in event})


####################################################################################
# API handlers
####################################################################################


def is_unload(path, body):
    """keep_alive 0 with nothing to generate: Ollama unloads the model (§5)."""
    if path not in ("/api/generate", "/api/chat"):
        return False
    keep_alive = body.get("keep_alive")
    zero = keep_alive == 0 or (isinstance(keep_alive, str) and
                               re.fullmatch(r"0+(\.0*)?[a-z]*", keep_alive.strip()) is not None)
    empty = not body.get("prompt") if path == "/api/generate" else not body.get("messages")
    return zero and empty and not isinstance(keep_alive, bool)


class Router:
    """The router's state and its HTTP dispatch."""

    def __init__(self, cfg, traces):
        self.cfg = cfg
        self.traces = traces
        self.fleet = Fleet(cfg)
        self.pool = hc.UpstreamPool()
        self.started = time.time()
        self.in_flight = 0
        self.all_done = asyncio.Event()
        self.client_in_flight = collections.Counter()
        self.active = {}  # request_id -> Exchange, for the reaper
        self.warming = set()  # (node_id, model) being pre-warmed
        self.pulls = Puller(self)
        self.events = collections.Counter()  # routing decisions since start (/metrics)
        self.recent_events = collections.deque(maxlen=10000)  # (time, event), for health
        self.trend_cache = {}  # range seconds -> (monotonic expiry, points)
        self.metrics = hc.Metrics()
        for name, kind, text in METRICS:
            self.metrics.describe(name, kind, text)
        self.background = set()  # one-off tasks (pre-warms), cancelled at shutdown
        self.zombies_reaped = 0
        self.local_node_id = hc.short_hostname()
        self.local_addresses = local_addresses()
        self.routes = {
            ("GET", "/"): self.handle_root, ("HEAD", "/"): self.handle_root,
            ("GET", "/api/version"): self.handle_version,
            ("HEAD", "/api/version"): self.handle_version,
            ("GET", "/api/tags"): self.handle_tags, ("HEAD", "/api/tags"): self.handle_tags,
            ("GET", "/api/ps"): self.handle_ps,
            ("POST", "/api/show"): self.handle_show,
            ("POST", "/api/pull"): self.handle_pull,
            ("GET", "/v1/models"): self.handle_openai_models,
            ("POST", "/heartbeat"): self.handle_heartbeat,
            ("GET", "/fleet/status"): self.handle_fleet_status,
            ("GET", "/fleet/queue"): self.handle_fleet_queue,
            ("GET", "/metrics"): self.handle_metrics,
            ("GET", "/dashboard/api/health"): self.handle_health,
            ("GET", "/dashboard"): self.handle_dashboard,
            ("GET", "/dashboard/api/overview"): self.handle_fleet_status,
            ("GET", "/dashboard/api/queues"): self.handle_fleet_queue,
            ("GET", "/dashboard/api/requests"): self.handle_requests,
            ("GET", "/dashboard/api/models"): self.handle_models,
            ("GET", "/dashboard/api/apps"): self.handle_apps,
            ("GET", "/dashboard/api/trends"): self.handle_trends,
            ("GET", "/dashboard/api/settings"): self.handle_settings,
        }
        for path in NATIVE_INFERENCE + OPENAI_INFERENCE:
            self.routes[("POST", path)] = self.handle_inference

    # -- dispatch -----------------------------------------------------------------

    async def handle(self, request, conn):
        self.in_flight += 1
        try:
            await self._dispatch(request, conn)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.all_done.set()

    async def wait_in_flight(self, timeout):
        """Wait until no request is being answered (idle connections do not count)."""
        self.all_done.clear()
        if self.in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.all_done.wait()

    async def _dispatch(self, request, conn):
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            if request.method == "GET" and request.path.startswith("/v1/models/"):
                return await self.handle_openai_model(request, conn)
            if any(p == request.path for (_, p) in self.routes):
                return await conn.send_response(405, b"405 method not allowed",
                                                b"text/plain")
            return await conn.send_response(404, b"404 page not found", b"text/plain")
        await handler(request, conn)

    @contextlib.contextmanager
    def admit(self, client):
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

    def finish(self, ex):
        """Record the trace of a finished request, count it, and log it."""
        self.traces.record(ex.trace_row())
        self.count_request(ex)
        # One line per request goes to the JSONL file (DEBUG by default); only trouble
        # reaches the terminal.
        level = logging.DEBUG if ex.status in ("completed", "cancelled") else logging.WARNING
        proxy_log.log(level, f"{ex.endpoint} {ex.status}", extra={
            "request_id": ex.request_id, "model": ex.served_model, "node_id": ex.node_id,
            "status": ex.status, "client": ex.request.client, "error": ex.error,
            "elapsed_ms": round((time.monotonic() - ex.t0) * 1000, 1)})

    # -- inference ----------------------------------------------------------------

    async def handle_inference(self, request, conn):
        api = "openai" if request.path.startswith("/v1/") else "ollama"
        try:
            body = hc.parse_json_body(request.body)
        except ValueError as e:
            return await self.reject(request, conn, api, str(e))
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            return await self.reject(request, conn, api, "model is required")
        fallbacks = body.get("fallback_models", [])
        if not isinstance(fallbacks, list) or not all(isinstance(m, str) and m.strip()
                                                      for m in fallbacks):
            return await self.reject(request, conn, api,
                                     "fallback_models must be a list of model names", model)
        model = hc.canonical_model(model)
        stream = body.get("stream")
        stream = (api == "ollama") if stream is None else bool(stream)
        if api == "ollama" and is_unload(request.path, body):
            return await self.handle_unload(request, conn, body, model)
        await proxy_inference(self, request, conn, api, body, model, stream)

    async def reject(self, request, conn, api, message, model=""):
        """Answer a malformed inference request with 400, and trace it too."""
        ex = Exchange(request, api, request.path, model, False, b"")
        ex.status, ex.http_status, ex.error = "rejected", 400, message
        try:
            await conn.send_response(400, ex.error_body(400, message))
        finally:
            self.finish(ex)

    async def handle_unload(self, request, conn, body, model):
        """Send the unload to every node holding the model; answer like Ollama."""
        holders = [n for n in self.fleet.nodes.values()
                   if model in n.loaded and n.status != "offline"]
        if not holders:
            return await proxy_inference(self, request, conn, "ollama", body, model, False)
        ex = Exchange(request, "ollama", request.path, model, False,
                      strip_routing_fields(request, body))
        ex.node_id = ",".join(n.node_id for n in holders)
        try:
            results = await asyncio.gather(*(
                hc.http_call(n.ollama_url, "POST", request.path, ex.body, timeout=30)
                for n in holders), return_exceptions=True)
            answers = [r for r in results if not isinstance(r, Exception) and r[0] == 200]
            for node in holders:
                node.loaded.pop(model, None)
                node.unloaded_at[model] = time.monotonic()
            if not answers:
                ex.http_status, ex.error = 502, f"unload of '{model}' failed on {ex.node_id}"
                return await conn.send_response(502, hc.ollama_error_body(ex.error))
            ex.status, ex.http_status = "completed", 200
            await conn.send_response(200, answers[0][2],
                                     headers=[(b"x-fleet-node", ex.node_id.encode())])
        finally:
            self.finish(ex)

    # -- Ollama's catalogue routes ------------------------------------------------

    async def handle_root(self, request, conn):
        await conn.send_response(200, b"Ollama is running", b"text/plain; charset=utf-8")

    async def handle_version(self, request, conn):
        versions = [n.info.get("ollama", {}).get("version") for n in self.online_nodes()]
        versions = [v for v in versions if v]
        await conn.send_json(200, {"version": min(versions, key=version_key)
                                   if versions else "0.0.0"})

    def online_nodes(self):
        return [n for n in self.fleet.nodes.values() if n.status != "offline"]

    def merged_models(self):
        """Every model on any online node, once (the newest copy's entry)."""
        merged = {}
        for node in self.online_nodes():
            for name, entry in node.models.items():
                known = merged.get(name)
                if known is None or entry.get("modified_at", "") > known.get("modified_at", ""):
                    merged[name] = entry
        return [merged[name] for name in sorted(merged)]

    async def handle_tags(self, request, conn):
        await conn.send_json(200, {"models": self.merged_models()})

    async def handle_ps(self, request, conn):
        models = []
        for node in self.online_nodes():
            for entry in node.loaded.values():
                models.append({**entry, "node_id": node.node_id})
        models.sort(key=lambda m: m.get("expires_at", ""), reverse=True)
        await conn.send_json(200, {"models": models})

    @staticmethod
    async def read_model_request(request, conn):
        """(body, model name) of a native request, or None once a 400 is sent."""
        try:
            body = hc.parse_json_body(request.body)
        except ValueError as e:
            return await conn.send_response(400, hc.ollama_error_body(str(e)))
        name = body.get("model") or body.get("name")  # "name" is the older spelling
        if not isinstance(name, str) or not name:
            return await conn.send_response(400, hc.ollama_error_body("model is required"))
        return body, name

    async def handle_show(self, request, conn):
        if not (parsed := await self.read_model_request(request, conn)):
            return
        body, name = parsed
        node = self.any_holder(hc.canonical_model(name))
        if node is None:
            return await conn.send_response(404, hc.ollama_error_body(
                f"model '{name}' not found"))
        await self.relay_simple(conn, node, "POST", "/api/show", request.body)

    async def handle_pull(self, request, conn):
        """Pull through the router: onto the node named in "node", else the node with
        the most free memory; Ollama's progress is relayed as it comes."""
        if not (parsed := await self.read_model_request(request, conn)):
            return
        body, name = parsed
        node = self.pulls.pick_node(body.get("node"))
        if node is None:
            what = f"node '{body['node']}' is not online" if body.get("node") else \
                "no online node to pull onto"
            return await conn.send_response(404 if body.get("node") else 503,
                                            hc.ollama_error_body(what))
        model = hc.canonical_model(name)
        stream = body.get("stream") is not False
        ex = Exchange(request, "ollama", request.path, model, stream,
                      hc.dump_json({k: v for k, v in body.items() if k != "node"}))
        choice = Choice(node, model, 0.0, {}, False)
        ex.node_id = node.node_id
        # The new model is listed before the client sees the pull end.
        ex.before_end = lambda: self.refresh_models(node)
        conn.watch_client()
        try:
            await run_attempt(self, conn, ex, choice)
        except AttemptFailed as e:
            ex.status, ex.error, ex.http_status = "failed", str(e), 502
            await conn.send_response(502, hc.ollama_error_body(str(e)))
        finally:
            self.finish(ex)

    async def refresh_models(self, node):
        """Re-read a node's models now (a pull just added one), not at its next beat."""
        try:
            tags = await hc.http_json(node.ollama_url, "GET", "/api/tags", timeout=10)
        except hc.UpstreamError as e:
            fleet_log.warning(f"could not re-read models: {e}", extra={"node_id": node.node_id})
            return
        node.models = {hc.canonical_model(m.get("model") or m["name"]): m
                       for m in tags.get("models") or [] if isinstance(m, dict)}
        self.fleet.notify_change()

    def any_holder(self, model):
        holders = [n for n in self.online_nodes() if model in n.models and n.reachable]
        holders.sort(key=lambda n: (n.status != "online", model not in n.loaded))
        return holders[0] if holders else None

    async def relay_simple(self, conn, node, method, path, body):
        """A small request answered whole by one node, passed on as it came."""
        try:
            status, headers, data = await hc.http_call(node.ollama_url, method, path, body,
                                                       timeout=self.cfg.first_byte_timeout)
        except hc.UpstreamError as e:
            return await conn.send_response(502, hc.ollama_error_body(
                f"node {node.node_id}: {e}"))
        ctype = next((v for k, v in headers if k == b"content-type"), hc.JSON_TYPE)
        await conn.send_response(status, data, ctype,
                                 [(b"x-fleet-node", node.node_id.encode())])

    # -- OpenAI's model routes ----------------------------------------------------

    def openai_model(self, entry):
        name = entry.get("model") or entry.get("name")
        owner = name.split("/")[-2] if name.count("/") else "library"
        return {"id": name, "object": "model",
                "created": hc.rfc3339_to_unix(entry.get("modified_at")), "owned_by": owner}

    async def handle_openai_models(self, request, conn):
        await conn.send_json(200, {"object": "list", "data": [
            self.openai_model(e) for e in self.merged_models()]})

    async def handle_openai_model(self, request, conn):
        wanted = request.path[len("/v1/models/"):]
        wanted = hc.canonical_model(urllib.parse.unquote(wanted))
        for entry in self.merged_models():
            if hc.canonical_model(entry.get("model") or entry["name"]) == wanted:
                return await conn.send_json(200, self.openai_model(entry))
        await conn.send_response(404, hc.openai_error_body(
            404, f"model '{wanted}' not found", "model_not_found"))

    # -- fleet routes -------------------------------------------------------------

    def authorized(self, request):
        if not self.cfg.token:
            return True
        given = request.header("authorization") or ""
        expected = f"Bearer {self.cfg.token}"
        return hmac.compare_digest(given.encode(), expected.encode())

    async def handle_heartbeat(self, request, conn):
        if not self.authorized(request):
            return await conn.send_response(401, hc.ollama_error_body(
                "missing or wrong fleet token (set FLEET_NODE_TOKEN on the node)"))
        try:
            hb = validate_heartbeat(hc.parse_json_body(request.body))
        except ValueError as e:
            fleet_log.warning("bad heartbeat", extra={"client": request.client,
                                                      "error": str(e)})
            return await conn.send_response(400, hc.ollama_error_body(f"bad heartbeat: {e}"))
        local = self.fleet.nodes.get(self.local_node_id)
        if local is not None and local.local and self.covers_local_ollama(hb):
            self.fleet.remove(self.local_node_id)  # an agent now reports this Ollama
        node = self.fleet.apply_heartbeat(hb)
        await conn.send_json(200, {"status": "ok", "node_status": node.status,
                                   "router_version": hc.VERSION})

    async def handle_fleet_status(self, request, conn):
        self.fleet.refresh_status()
        nodes = [n.summary(self.fleet) for n in self.fleet.nodes.values()]
        counts = collections.Counter(n["status"] for n in nodes)
        await conn.send_json(200, {
            "router": {"version": hc.VERSION, "uptime_s": round(time.time() - self.started),
                       "nodes_online": counts["online"], "nodes_degraded": counts["degraded"],
                       "nodes_offline": counts["offline"], "holding": self.fleet.holding,
                       "zombies_reaped": self.zombies_reaped,
                       "events": dict(self.events),
                       "traces_written": self.traces.written,
                       "traces_dropped": self.traces.dropped},
            "pulls": self.pulls.progress,
            "nodes": nodes})

    async def handle_fleet_queue(self, request, conn):
        await conn.send_json(200, self.queue_report())

    def queue_report(self):
        rows = []
        for (node_id, model), q in sorted(self.fleet.queues.items()):
            node = self.fleet.nodes.get(node_id)
            if node is None:
                continue
            c = build_candidate(self.fleet, node, model, 0)
            rows.append({"node_id": node_id, "model": model, "active": q.active,
                         "waiting": q.waiting, "limit": q.limit,
                         "estimated_wait_s": round(hc.estimate_wait_s(c) if q.waiting
                                                   else 0.0, 2)})
        return {"queues": rows, "total_active": sum(r["active"] for r in rows),
                "total_waiting": sum(r["waiting"] for r in rows),
                "holding": self.fleet.holding}

    # -- the local node -----------------------------------------------------------

    def covers_local_ollama(self, hb):
        """Does an agent's heartbeat describe the Ollama we would serve locally?"""
        host, port, _ = hc.split_url(hb["ollama_url"])
        _, local_port, _ = hc.split_url(self.cfg.local_ollama_url)
        return port == local_port and (hc.is_loopback_host(host)
                                       or host in self.local_addresses)

    def local_node_taken(self):
        node = self.fleet.nodes.get(self.local_node_id)
        if node is not None and not node.local and node.status != "offline":
            return True
        return any(not n.local and n.status != "offline" and self.covers_local_ollama(n.info)
                   for n in self.fleet.nodes.values())

    async def poll_local_node(self):
        """Serve this machine's Ollama as a node while no agent reports it."""
        port = hc.split_url(self.cfg.local_ollama_url)[1]
        settings = {"found": {}, "next": 0.0}

        async def poll():
            if self.local_node_taken():
                return
            ollama = await hc.read_ollama(self.cfg.local_ollama_url, timeout=3)
            if not ollama["ok"] and self.local_node_id not in self.fleet.nodes:
                return  # no Ollama here (yet): nothing to serve
            if time.monotonic() >= settings["next"]:  # Ollama may restart with others
                found, _ = await asyncio.to_thread(hc.find_ollama_settings, psutil, port)
                settings.update(found=found or {}, next=time.monotonic() + 60)
            machine = await asyncio.to_thread(hc.read_machine, psutil, self.cfg.data_dir)
            slots, source = hc.resolve_num_parallel(0, settings["found"], os.environ)
            self.fleet.apply_heartbeat(hc.build_heartbeat(
                self.local_node_id, self.cfg.local_ollama_url, machine, ollama,
                settings["found"], slots, source), local=True)
        await hc.repeat(poll, self.cfg.local_node_interval, log, "polling the local Ollama")

    def pre_warm(self, choice, name):
        """Load the model on the runner-up node, so the next request finds it hot."""
        runner_up = choice.runner_up
        if runner_up is None or runner_up.hot:
            return
        key = (runner_up.node_id, choice.model)
        node = self.fleet.nodes.get(runner_up.node_id)
        if key in self.warming or node is None:
            return  # at most one warm-up per node+model at a time
        self.warming.add(key)
        task = asyncio.create_task(self._warm(node, choice.model, name),
                                   name=f"pre-warm {key}")
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _warm(self, node, model, name):
        extra = {"node_id": node.node_id, "model": model, "event": "pre_warm"}
        fleet_log.info("pre-warming the runner-up node", extra=extra)
        try:
            # An empty prompt only loads the model (Ollama answers done_reason "load").
            status, _, body = await hc.http_call(node.ollama_url, "POST", "/api/generate",
                                                 {"model": name, "prompt": ""},
                                                 timeout=self.cfg.first_byte_timeout)
            if status == 200:
                node.loaded.setdefault(model, {"name": model, "model": model})
                self.fleet.notify_change()
            else:
                fleet_log.warning(f"pre-warm answered {status}", extra=extra)
        except hc.UpstreamError as e:
            fleet_log.warning(f"pre-warm failed: {e}", extra=extra)
        finally:
            self.warming.discard((node.node_id, model))

    def count_request(self, ex):
        m, model, node = self.metrics, ex.served_model, ex.node_id or ""
        m.inc("herd_requests_total", (("model", model), ("node", node), ("status", ex.status)))
        m.observe("herd_request_duration_seconds", (("model", model),),
                  time.monotonic() - ex.t0)
        if ex.ttft is not None:
            m.observe("herd_time_to_first_token_seconds", (("model", model),), ex.ttft)
        for kind in ("prompt", "completion"):
            tokens = getattr(ex, f"{kind}_tokens")
            if tokens:
                m.inc("herd_tokens_total", (("model", model), ("kind", kind)), tokens)
        if ex.retries:
            m.inc("herd_retries_total", (("model", model),), ex.retries)
        if ex.served_model != ex.model:
            m.inc("herd_fallbacks_total", (("requested", ex.model), ("served", model)))
        if ex.status == "cancelled":
            m.inc("herd_cancellations_total", (("model", model),))

    def metrics_gauges(self):
        """Live state for /metrics: queues, nodes, and the router's own counts."""
        out = [("herd_holding_requests", (), self.fleet.holding),
               ("herd_trace_rows_dropped_total", (), self.traces.dropped),
               ("herd_zombies_reaped_total", (), self.zombies_reaped)]
        for (node_id, model), q in self.fleet.queues.items():
            out.append(("herd_queue_in_flight", (("node", node_id), ("model", model)), q.active))
            out.append(("herd_queue_waiting", (("node", node_id), ("model", model)), q.waiting))
        for node in self.fleet.nodes.values():
            for status in ("online", "degraded", "offline"):
                out.append(("herd_node_status", (("node", node.node_id), ("status", status)),
                            int(node.status == status)))
            mem = node.info.get("memory", {})
            for kind in ("total", "available"):
                out.append(("herd_node_memory_bytes", (("node", node.node_id),
                                                       ("kind", kind)), mem.get(kind, 0)))
        for event, count in self.events.items():
            out.append(("herd_events_total", (("event", event),), count))
        return out

    async def health_snapshot(self):
        """What the health checks look at: live state, an hour of traces, counters."""
        self.fleet.refresh_status()
        since = time.time() - HEALTH_WINDOW_S
        rows = await asyncio.to_thread(self.traces.query, TRACE_WINDOW_SQL, (since,))
        loads = collections.Counter((node, model) for t, kind, node, model
                                    in self.fleet.model_moves if t > since and kind == "load")
        now = time.monotonic()
        nodes = [{
            "node_id": n.node_id, "status": n.status, "silent_s": now - n.last_seen,
            "memory": n.info.get("memory", {}),
            "ollama_version": n.info.get("ollama", {}).get("version", ""),
            "loaded": [{**e, "model": name, "disk_size": n.models.get(name, {}).get("size")}
                       for name, e in n.loaded.items()],
        } for n in self.fleet.nodes.values()]
        limits = {"error_rate": self.cfg.health_error_rate,
                  "retry_rate": self.cfg.health_retry_rate,
                  "disconnect_rate": self.cfg.health_disconnect_rate,
                  "thrash_loads": self.cfg.health_thrash_loads}
        recent = collections.Counter(e for t, e in self.recent_events if t > since)
        return {"nodes": nodes, "loads_by_model": dict(loads), "limits": limits,
                "events": {k: v for k, v in recent.items() if k != "zombie_reaped"},
                "zombies_reaped": recent["zombie_reaped"],
                "heartbeat_timeout": self.cfg.heartbeat_timeout, **trace_window(rows)}

    async def handle_health(self, request, conn):
        snap = await self.health_snapshot()
        findings, score = run_health_checks(snap)
        counts = collections.Counter(n["status"] for n in snap["nodes"])
        day_ago = time.time() - 86400
        day = (await asyncio.to_thread(self.traces.query, VITALS_SQL, (day_ago,)))[0]
        loads = sum(1 for t, kind, _, _ in self.fleet.model_moves
                    if t > day_ago and kind == "load")
        await conn.send_json(200, {
            "score": score,
            "status": findings[0]["severity"] if findings else "healthy",
            "checks_window_s": HEALTH_WINDOW_S,
            "vitals": {"window_s": 86400, "nodes_online": counts["online"],
                       "nodes_degraded": counts["degraded"], "nodes_offline": counts["offline"],
                       "requests": day["requests"],
                       "error_rate": round(day["failed"] / day["requests"], 4)
                       if day["requests"] else 0.0,
                       "mean_ttft_ms": round(day["ttft"], 1) if day["ttft"] else None,
                       "model_loads": loads},
            "checks": findings})

    # -- dashboard data (the page reads these; so can curl) ---------------------

    async def handle_dashboard(self, request, conn):
        """dashboard.html from beside this script, read each time (edit and reload)."""
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard.html")
        try:
            page = await asyncio.to_thread(read_bytes, path)
        except OSError:
            return await conn.send_response(404, b"dashboard.html is missing: copy it next "
                                                 b"to herd.py", b"text/plain; charset=utf-8")
        await conn.send_response(200, page, b"text/html; charset=utf-8")

    async def handle_settings(self, request, conn):
        """The effective configuration, each value with where it came from."""
        values = self.cfg.as_dict()
        rows = []
        for st in ROUTER_SETTINGS:
            attr = st.name.removeprefix("FLEET_").lower()
            value = values[attr]
            if st.name == "FLEET_TOKEN" and value:
                value = "(set)"  # never shown
            rows.append({"name": st.name, "value": value, "default": st.default,
                         "source": self.cfg.sources.get(attr, "default"), "help": st.help})
        await conn.send_json(200, {"settings": rows})

    async def handle_requests(self, request, conn):
        """Recent traces, filtered: ?status=&model=&node=&tag=&since=<s ago>&limit="""
        q = {k: v[-1] for k, v in request.query.items()}
        try:
            since = float(q.get("since", 3600))
            limit = max(1, min(1000, int(q.get("limit", 100))))
        except ValueError:
            return await conn.send_response(400, hc.ollama_error_body(
                "since and limit must be numbers"))
        where, params = ["timestamp > ?"], [time.time() - since]
        for key, column in (("status", "status"), ("model", "model"), ("node", "node_id")):
            if q.get(key):
                where.append(f"{column} = ?")
                params.append(q[key])
        if q.get("tag"):
            where.append("(',' || tags || ',') LIKE ?")
            params.append(f"%,{q['tag']},%")
        sql = (f"SELECT * FROM request_traces WHERE {' AND '.join(where)} "
               f"ORDER BY timestamp DESC LIMIT {limit}")
        rows = await asyncio.to_thread(self.traces.query, sql, params)
        await conn.send_json(200, {"requests": rows})

    async def handle_models(self, request, conn):
        """Per model: where it lives, hot or cold, and a day of usage per node."""
        rows = await asyncio.to_thread(self.traces.query, MODEL_USAGE_SQL,
                                       (time.time() - 86400,))
        usage = collections.defaultdict(list)
        for r in rows:
            usage[r.pop("model")].append(r)
        models = {}
        for node in self.fleet.nodes.values():
            for name in node.models:
                m = models.setdefault(name, {"model": name, "on_disk": [], "loaded": []})
                m["on_disk"].append(node.node_id)
                if name in node.loaded:
                    m["loaded"].append(node.node_id)
        for name in usage:
            models.setdefault(name, {"model": name, "on_disk": [], "loaded": []})
        for name, m in models.items():
            m["usage_24h"] = usage.get(name, [])
        await conn.send_json(200, {"models": sorted(models.values(),
                                                    key=lambda m: m["model"])})

    async def handle_apps(self, request, conn):
        """Per tag (X-Herd-Tags / metadata.tags): a day of requests, errors, speed."""
        rows = await asyncio.to_thread(self.traces.query, (
            "SELECT tags, status, latency_ms, prompt_tokens, completion_tokens "
            "FROM request_traces WHERE timestamp > ? AND tags IS NOT NULL "
            "AND status != 'retried'"), (time.time() - 86400,))
        apps = {}
        for r in rows:
            for tag in r["tags"].split(","):
                a = apps.setdefault(tag, {"tag": tag, "requests": 0, "errors": 0,
                                          "latency_ms_total": 0.0, "tokens": 0})
                a["requests"] += 1
                a["errors"] += r["status"] in ("failed", "incomplete")
                a["latency_ms_total"] += r["latency_ms"] or 0.0
                a["tokens"] += (r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0)
        for a in apps.values():
            a["mean_latency_ms"] = round(a.pop("latency_ms_total") / a["requests"], 1)
        await conn.send_json(200, {"window_s": 86400, "apps": sorted(
            apps.values(), key=lambda a: -a["requests"])})

    async def handle_trends(self, request, conn):
        """Requests, errors, latency, time to first token and tokens/s over time:
        ?range=24h (hourly), 7d (6-hourly) or 30d (daily)."""
        name = request.query.get("range", ["24h"])[-1]
        span, bucket = TREND_RANGES.get(name, TREND_RANGES["24h"])
        cached = self.trend_cache.get(span)
        if cached is None or cached[0] < time.monotonic():
            # A month of traces takes about a second to group (300k rows measured), and
            # the page polls every 3 s: keep the long ranges for a tenth of a bucket.
            rows = await asyncio.to_thread(self.traces.query, TRENDS_SQL,
                                           (bucket, bucket, time.time() - span))
            keep = bucket / 10 if span > 86400 else 0.0
            cached = self.trend_cache[span] = (time.monotonic() + keep, rows)
        await conn.send_json(200, {"range_s": span, "bucket_s": bucket, "points": cached[1]})

    async def handle_metrics(self, request, conn):
        self.fleet.refresh_status()
        await conn.send_response(200, self.metrics.render(self.metrics_gauges()).encode(),
                                 b"text/plain; version=0.0.4; charset=utf-8")

    def count_event(self, event, ex, message):
        """Count a routing decision for the health checks, and log it."""
        self.events[event] += 1
        self.recent_events.append((time.time(), event))
        fleet_log.info(message, extra={"event": event,
                                       "request_id": ex.request_id if ex else None,
                                       "model": ex.model if ex else None})

    def reap_zombies(self):
        """Stop requests sent to a node that show no progress for FLEET_STALE_TIMEOUT."""
        now, reaped = time.monotonic(), 0
        for ex in list(self.active.values()):
            seen = ex.last_progress()
            if seen is not None and not ex.reaped and now - seen > self.cfg.stale_timeout:
                ex.reaped = True
                ex.task.cancel(msg="reaped: no progress")
                reaped += 1
        return reaped

    async def reap_forever(self):
        await hc.repeat(self.reap_zombies, min(30.0, self.cfg.stale_timeout / 4), log,
                        "the zombie reaper")

    async def rebalance_forever(self):
        await hc.repeat(self.fleet.rebalance, self.cfg.rebalance_interval, log,
                        "rebalancing")

    async def watch_status(self):
        await hc.repeat(self.fleet.refresh_status, min(1.0, self.cfg.heartbeat_timeout / 4),
                        log, "the node status watch")

    async def load_learning(self):
        """Seed the latency averages from the last week of traces."""
        try:
            rows = await asyncio.to_thread(self.traces.query, (
                "SELECT node_id, model, AVG(latency_ms) AS latency, COUNT(*) AS n "
                "FROM request_traces WHERE status='completed' AND timestamp > ? "
                "AND node_id IS NOT NULL GROUP BY node_id, model"), (time.time() - 7 * 86400,))
        except Exception as e:  # a damaged database must not stop the router
            log.warning("could not read past traces: %s", e)
            return
        for r in rows:
            self.fleet.latency[(r["node_id"], r["model"])] = [r["latency"] / 1000, 0.0, r["n"]]


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def version_key(version):
    parts = re.findall(r"\d+", version.lstrip("v").split("-")[0])
    return tuple(int(p) for p in parts)


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


####################################################################################
# mDNS: tell node agents where we are
####################################################################################


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
                            properties={"version": hc.VERSION, "api": "ollama,openai"},
                            server=f"{hc.short_hostname()}.local.")
    try:
        # zeroconf's async calls return a task that finishes the announcements.
        await (await zc.async_register_service(info, allow_name_change=True))
        log.info("advertising on mDNS", extra={"url": f"http://{addrs[0]}:{port}"})
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await (await zc.async_unregister_service(info))
        await zc.async_close()


####################################################################################
# Run
####################################################################################


class RouterServer:
    """The router with its listening socket and background tasks."""

    def __init__(self, cfg):
        self.cfg = cfg
        db_path = os.path.join(cfg.data_dir, "latency.db")
        self.traces = hc.TraceStore(db_path, cfg.trace_queue, cfg.trace_retention_days)
        self.router = None
        self.server = None
        self.port = None
        self.tasks = set()
        self.connections = set()

    async def start(self):
        # psutil and SQLite reads are short: two threads do (each extra thread costs
        # memory, and idle memory is a target).
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="herd-io"))
        self.traces.start()
        self.router = Router(self.cfg, self.traces)
        self.server = await asyncio.get_running_loop().create_server(
            self._new_connection, self.cfg.host, self.cfg.port, reuse_address=True,
            backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        self._spawn(self.router.watch_status(), "status-watcher")
        self._spawn(self.router.load_learning(), "load-learning")
        self._spawn(self.router.rebalance_forever(), "rebalancer")
        self._spawn(self.router.reap_forever(), "zombie-reaper")
        if self.cfg.local_node:
            self._spawn(self.router.poll_local_node(), "local-node")
        if self.cfg.mdns:
            self._spawn(advertise(self.cfg, self.port), "mdns-advertise")
        log.info(f"herd router {hc.VERSION} listening on http://{self.cfg.host}:{self.port}")
        return self.port

    def _spawn(self, coro, name):
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task):
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(f"background task {task.get_name()} failed",
                      exc_info=task.exception())

    def _new_connection(self):
        conn = hc.HttpConnection(
            self.router.handle, max_body=int(self.cfg.max_body_mb * (1 << 20)),
            idle_timeout=self.cfg.idle_timeout, read_timeout=30.0, log=log,
            on_close=self.connections.discard)
        self.connections.add(conn)
        return conn

    async def stop(self, grace=0.0):
        """Stop listening, give streams `grace` seconds, then close everything."""
        self.server.close()
        if grace:
            await self.router.wait_in_flight(grace)
        conns = list(self.connections)
        tasks = [c.task for c in conns if c.task] + list(self.tasks) + \
            list(self.router.background)
        for task in tasks:
            task.cancel(msg="router shutting down")
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in conns:
            conn.abort()
        await asyncio.gather(*(c.closed for c in conns), return_exceptions=True)
        await self.server.wait_closed()
        self.router.pool.close_all()
        await asyncio.to_thread(self.traces.close)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="herd.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Herd router: one Ollama/OpenAI endpoint for every Ollama on the LAN.",
        epilog="settings (environment variables):\n" + hc.format_settings_help(ROUTER_SETTINGS))
    parser.add_argument("--host", help="address to listen on (FLEET_HOST)")
    parser.add_argument("--port", help="port to listen on (FLEET_PORT)")
    return parser.parse_args(argv)


def load_router_config(environ, args):
    cfg = hc.load_config(ROUTER_SETTINGS, environ, "FLEET_",
                         {"host": args.host, "port": args.port})
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
    values = cfg.as_dict()
    values["data_dir"] = hc.expand_dir(cfg.data_dir)
    return hc.Config(values, cfg.sources)


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
    return hc.run_program("herd", os.environ, args, load_router_config, "herd.jsonl", run)


if __name__ == "__main__":
    sys.exit(main())
