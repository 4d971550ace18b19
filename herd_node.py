#!/usr/bin/env python3
"""herd_node.py: the Herd node agent. Run it beside each Ollama.

It finds the router by mDNS (_fleet-manager._tcp) or --router-url, and every few
seconds tells it what this machine is and holds: hardware, memory, CPU, disk, Ollama's
version and settings, models on disk, models loaded, and how many requests Ollama
serves in parallel. If Ollama is down it keeps reporting that, and picks up again by
itself when Ollama is back. On SIGTERM / Ctrl-C it drains: the router sends no new
work here, the requests running here finish (up to FLEET_NODE_DRAIN_TIMEOUT; a second
Ctrl-C stops waiting), and then the agent tells the router it has left.

Run:   python herd_node.py                      (find the router by mDNS)
       python herd_node.py --router-url http://192.168.1.10:11435
Key settings: FLEET_NODE_ROUTER_URL, FLEET_NODE_NODE_ID (short hostname),
              FLEET_NODE_OLLAMA_HOST (http://localhost:11434), FLEET_NODE_TOKEN (the
              router's FLEET_TOKEN; heartbeats are signed with it, it is never sent),
              FLEET_NODE_NUM_PARALLEL (else read from the running Ollama)

Check it from anywhere:
    $ curl -s http://192.168.1.10:11435/fleet/status | python3 -m json.tool
    {"router": {"version": "0.1.0", "nodes_online": 2, ...},
     "nodes": [{"node_id": "mac-studio", "status": "online", "num_parallel": 4, ...}]}
"""

import argparse
import asyncio
import contextlib
import json
import logging
import os
import ssl
import sys
import time

try:
    import psutil
    from zeroconf import IPVersion, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
except ImportError:  # pragma: no cover
    sys.exit("Herd needs h11, psutil and zeroconf: pip install h11 psutil zeroconf")

import herd_common as hc

log = logging.getLogger("herd.node")

NODE_SETTINGS = [
    hc.Setting("FLEET_NODE_ROUTER_URL", "", "router URL; empty means find it by mDNS"),
    hc.Setting("FLEET_NODE_NODE_ID", "", "this node's name: 1-64 ASCII letters, digits, '.', "
               "'_' or '-' (default: the short hostname, without other characters)"),
    hc.Setting("FLEET_NODE_OLLAMA_HOST", "http://localhost:11434", "where Ollama listens"),
    hc.Setting("FLEET_NODE_OLLAMA_URL", "", "the Ollama URL the router should dial "
               "(default: derived from the address this machine uses to reach the router)"),
    hc.Setting("FLEET_NODE_HEARTBEAT_INTERVAL", 5.0, "seconds between heartbeats"),
    hc.Setting("FLEET_NODE_TOKEN", "", "the router's FLEET_TOKEN, if it has one: heartbeats "
               "are signed with it (it is never sent)"),
    hc.Setting("FLEET_NODE_CA", "", "PEM file of the CA that signed the router's TLS "
               "certificate (default: the system's certificates)"),
    hc.Setting("FLEET_NODE_DRAIN_TIMEOUT", 30.0, "seconds a stopping agent waits for the "
               "requests running on this node to finish before it leaves the fleet"),
    hc.Setting("FLEET_NODE_NUM_PARALLEL", 0, "Ollama's parallel slots; 0 means read "
               "OLLAMA_NUM_PARALLEL from the running Ollama, else this agent's environment"),
    hc.Setting("FLEET_NODE_DATA_DIR", "~/.fleet-manager", "logs/ and the state saved on "
               "drain (node-state-<id>.json) live here"),
    hc.Setting("FLEET_NODE_MDNS_INTERFACES", "", "comma-separated IPs to browse mDNS on "
               "(default: all interfaces)"),
    *hc.LOG_SETTINGS,
]

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
# Heartbeats
####################################################################################


class Agent:
    """Reads this machine and its Ollama; reports to the router."""

    def __init__(self, cfg, finder=None):
        self.cfg = cfg
        self.finder = finder
        self.node_id = cfg.node_id or hc.default_node_id()
        self.tls = ssl.create_default_context(cafile=cfg.ca) if cfg.ca else None
        self.settings = {}
        self._settings_at = 0.0
        self._ollama_was_ok = None
        self._router_ok = None
        self.sent = 0

    @property
    def router_url(self):
        return self.cfg.router_url or (self.finder.url if self.finder else None)

    async def read_settings(self):
        """Ollama's own OLLAMA_* settings, re-read once a minute (Ollama may restart)."""
        if time.monotonic() - self._settings_at < 60:
            return self.settings
        host, port, _ = hc.split_url(self.cfg.ollama_host)
        if not hc.is_loopback_host(host):
            return self.settings  # an Ollama on another machine: its process is not here
        found, _ = await asyncio.to_thread(hc.find_ollama_settings, psutil, port)
        self.settings, self._settings_at = found or {}, time.monotonic()
        return self.settings

    async def snapshot(self, draining=False, leaving=False):
        """The heartbeat body for now."""
        ollama, machine, settings = await asyncio.gather(
            hc.read_ollama(self.cfg.ollama_host, timeout=3),
            asyncio.to_thread(hc.read_machine, psutil, self.cfg.data_dir),
            self.read_settings())
        self._note_ollama(ollama)
        slots, source = hc.resolve_num_parallel(self.cfg.num_parallel, settings, os.environ)
        return hc.build_heartbeat(self.node_id, await self.ollama_url(), machine, ollama,
                                  settings, slots, source, draining, leaving)

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
        """POST one heartbeat (signed with the token, if any); the router's answer when
        it took it, else None."""
        try:
            status, _, body = await hc.http_call(self.router_url, "POST", "/heartbeat",
                                                 hb, timeout=5, tls=self.tls,
                                                 sign=self.cfg.token or None)
        except hc.UpstreamError as e:
            self._note_router(False, str(e))
            return None
        if status != 200:
            self._note_router(False, f"{status}: {body[:200].decode('utf-8', 'replace')}")
            return None
        self.sent += 1
        self._note_router(True, None)
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        return answer if isinstance(answer, dict) else {}

    def _note_router(self, ok, error):
        if ok != self._router_ok or not ok:
            if ok:
                log.info("heartbeats accepted", extra={"url": self.router_url,
                                                       "event": "router_ok"})
            else:
                level = logging.WARNING if self._router_ok is not False else logging.DEBUG
                log.log(level, "heartbeat failed", extra={"url": self.router_url,
                                                          "error": error,
                                                          "event": "heartbeat_failed"})
        self._router_ok = ok

    async def run(self):
        """Heartbeat until cancelled."""
        if self.router_url is None:
            await self.finder.found.wait()

        async def beat():
            await self.send(await self.snapshot())
        await hc.repeat(beat, self.cfg.heartbeat_interval, log, "heartbeat")

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


####################################################################################
# Run
####################################################################################


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="herd_node.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Herd node agent: reports this machine's Ollama to the Herd router.",
        epilog="settings (environment variables):\n" + hc.format_settings_help(NODE_SETTINGS))
    parser.add_argument("--router-url", help="router URL, skipping mDNS "
                                             "(FLEET_NODE_ROUTER_URL)")
    parser.add_argument("--node-id", help="this node's name (FLEET_NODE_NODE_ID)")
    parser.add_argument("--ollama-host", help="where Ollama listens (FLEET_NODE_OLLAMA_HOST)")
    parser.add_argument("--token", help="the router's FLEET_TOKEN (FLEET_NODE_TOKEN)")
    return parser.parse_args(argv)


def load_node_config(environ, args):
    cfg = hc.load_config(NODE_SETTINGS, environ, "FLEET_NODE_", {
        "router_url": args.router_url, "node_id": args.node_id,
        "ollama_host": args.ollama_host, "token": args.token})
    hc.check_log_level("FLEET_LOG_LEVEL", cfg.log_level)
    hc.check_log_level("FLEET_CONSOLE_LOG_LEVEL", cfg.console_log_level)
    for name in ("router_url", "ollama_host", "ollama_url"):
        if getattr(cfg, name):
            try:
                hc.split_url(getattr(cfg, name))
                if name != "router_url" and hc.is_https(getattr(cfg, name)):
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
    if cfg.drain_timeout < 0:
        raise hc.ConfigError("FLEET_NODE_DRAIN_TIMEOUT must not be negative")
    values = cfg.as_dict()
    values["data_dir"] = hc.expand_dir(cfg.data_dir)
    values["ca"] = os.path.expanduser(cfg.ca) if cfg.ca else ""
    values["ollama_host"] = values["ollama_host"].rstrip("/")
    if values["ollama_host"] and "://" not in values["ollama_host"]:
        values["ollama_host"] = "http://" + values["ollama_host"]
    return hc.Config(values, cfg.sources)


async def run(cfg):
    finder = None
    if not cfg.router_url:
        interfaces = [i.strip() for i in cfg.mdns_interfaces.split(",") if i.strip()]
        finder = RouterFinder(interfaces)
        await finder.start()
    agent = Agent(cfg, finder)
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
    if finder is not None:
        await finder.close()
    log.info("stopped", extra={"node_id": agent.node_id})
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return hc.run_program("herd_node", os.environ, args, load_node_config, "herd-node.jsonl",
                          run)


if __name__ == "__main__":
    sys.exit(main())
