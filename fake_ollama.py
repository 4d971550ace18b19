#!/usr/bin/env python3
"""fake_ollama.py: a stand-in Ollama server for Herd's tests, demos and benchmark.

It answers the way the real server does wherever a client can tell: field names, NDJSON
and SSE framing, error bodies and status codes, model loads that take time, reloads on
a new num_ctx, unload on keep_alive 0, num_parallel slots per loaded model with FIFO
waiting, the loopback Host-header guard, the OpenAI-compatible routes, model
management (pull, push, create from blobs uploaded first, copy, delete) with Ollama's
progress lines and errors, and the newer Anthropic Messages (/v1/messages) and OpenAI
Responses (/v1/responses) routes with their named SSE events; like an older Ollama, a
fake whose `version` predates a route (0.14.0, 0.13.3) answers it gin's 404. Asked with
`tools` by a user message naming one, those two answer with a call to it (each
parameter "w0", "w1", ...). A model with the "image" capability answers
/v1/images/generations with a one-pixel PNG. Faults can be switched on at any moment
(refuse, reset, stall, 500, 503, death or an error line in the middle of a stream, a
stream's end held back after its last event), and `spaced_json` writes every JSON object
with spaces, as a Python server does. It imports nothing from Herd: it is the reference
the router is checked against.

The contention model (for the routing benchmark; every figure can change while it runs):
    speed          this machine's speed: a token takes chunk_delay / speed, a prompt
                   token prompt_delay / speed (0.25: four times slower)
    saturation     with n requests decoding at once, across all models, each token takes
                   chunk_delay * max(1, n / saturation) / speed, recomputed per token: the
                   node's tokens/s grows with n up to `saturation`, then stays flat
    max_loaded     OLLAMA_MAX_LOADED_MODELS: a new runner past it evicts the idle one with
                   the shortest keep_alive, then by file name, as Ollama does
                   (fake.evictions counts them); when all are busy the load
                   waits for one to go idle, and requests that need a load arriving
                   meanwhile wait behind it (Ollama's scheduler takes them in order);
                   a request for a model loaded as it needs it goes straight to its
                   runner (sched.go's fast path)
    prompt_delay   seconds per prompt token that no slot's cache shares as a prefix: each
                   runner keeps the last num_parallel token sequences (a generate's system
                   and prompt, or a chat's messages as role and words, then the answer);
                   a chat's next turn, which repeats them, pays for its new message only
    vary_tokens    (lo, hi): an answer's natural length is drawn in lo..hi by an RNG
                   seeded with the prompt (same prompt, same length); num_predict or
                   max_tokens below it cut it short, as ever
The final chunk's metrics are the times really spent: load_duration until the runner
was ready (a wait for a slot shows in total_duration only, as in Ollama),
prompt_eval_duration the prompt evaluation, eval_duration the decoding; prompt_eval_count
counts the whole prompt, cached or not.

POST /_fake/config {"speed": 0.25, "saturation": 2, "fault": null} sets any of these
three while the fake runs and answers the values now in force; GET /_fake/config shows
them with the counters completed, load_count, evictions and unloads. It is a test-only control
route, not an Ollama one (bench.py slows a node half-way through a run with it).

Run:
    python fake_ollama.py [--host 127.0.0.1] [--port 11434] [--models a,b,c]
                          [--num-parallel N] [--chunks N] [--chunk-delay S] [--load-delay S]
                          [--load-per-gb S]
                          [--speed X] [--saturation N] [--max-loaded N] [--prompt-delay S]
                          [--tokens-range LO,HI]
    (--num-parallel defaults to $OLLAMA_NUM_PARALLEL, else 1; --port 0 picks a free port)

    $ python fake_ollama.py --port 0 --chunks 3
    fake ollama listening on http://127.0.0.1:35889
    $ curl -s localhost:35889/api/generate -d '{"model":"llama3.2:3b","prompt":"hi"}'
    {"model":"llama3.2:3b","created_at":"2026-11-22T13:57:40.77599617Z","response":"w0 ",...}
    {"model":"llama3.2:3b","created_at":"2026-11-22T13:57:40.776083724Z","response":"w1 ",...}
    {"model":"llama3.2:3b","created_at":"2026-11-22T13:57:40.776083724Z","response":"w2 ",...}
    {"model":"llama3.2:3b","created_at":"2026-11-22T13:57:40.776161891Z","response":"","done":true,
     "done_reason":"stop","context":[1,2,...,14],"total_duration":691347,"load_duration":318227,
     "prompt_eval_count":11,"prompt_eval_duration":93280,"eval_count":3,"eval_duration":279840}
    $ curl -s localhost:35889/api/ps
    {"models":[{"name":"llama3.2:3b","model":"llama3.2:3b","size":2316735283,"size_vram":2316735283,
     "digest":"925b2caf...","details":{"parent_model":"","format":"gguf","family":"llama",...},
     "expires_at":"2026-11-22T14:02:40.7763268Z","context_length":4096}]}
    $ curl -s localhost:35889/api/chat -H 'Host: example.com' -o /dev/null -w '%{http_code}\\n'
    403

In a test:
    fake = FakeOllama(["llama3.2:3b"], num_parallel=2, chunk_delay=0.05)
    old = FakeOllama(version="0.13.3")  # serves /v1/responses, 404s /v1/messages
    port = await fake.start()          # binds 127.0.0.1:0, returns the port
    fake.fault = "die_mid_stream"      # and fake.requests, .active, .loaded, .cancelled ...
    fake.speed = 0.25                  # .saturation, .max_loaded, .evictions, .generating ...
    fake.blobs, fake.blob_received     # uploaded blobs (digest -> size), bytes of each so far
    await fake.stop()
"""

import argparse
import asyncio
import base64
import collections
import dataclasses
import datetime
import email.utils
import hashlib
import http
import ipaddress
import json
import math
import os
import random
import re
import signal
import socket
import struct
import sys
import time

try:
    import h11
except ImportError:
    sys.exit("fake_ollama.py needs h11: pip install h11")

DEFAULT_MODELS = ("llama3.2:3b", "qwen2.5:7b", "nomic-embed-text:latest")
DEFAULT_NUM_CTX = 4096          # what a CPU-only Ollama picks when num_ctx is not given
DEFAULT_KEEP_ALIVE = 300.0      # OLLAMA_KEEP_ALIVE's default, 5m
FOREVER_NS = 2**63 - 1          # Go's MaxInt64 duration: what a negative keep_alive means
READ_SIZE = 65536
MAX_RECORDED = 10_000           # fake.requests keeps at most this many (long demo runs)
YIELD_EVERY = 32                # with chunk_delay 0, let other connections run this often

BUSY = "server busy, please try again.  maximum pending requests exceeded"
RUNNER_DIED = "llama runner process has terminated: exit status 2"
MID_STREAM_ERROR = "an error was encountered while running the model: unexpected EOF"
FAULTS = {None, "refuse", "reset", "stall", "http500", "http503", "die_mid_stream",
          "error_line", "stall_mid_stream", "hold_end"}
MID_STREAM_FAULTS = frozenset({"die_mid_stream", "error_line", "stall_mid_stream"})

JSON_TYPE = b"application/json; charset=utf-8"
NDJSON_TYPE = b"application/x-ndjson"
SSE_TYPE = b"text/event-stream"
TEXT_TYPE = b"text/plain; charset=utf-8"

BLOB_PATH = re.compile(r"/api/blobs/[^/]+")
DIGEST = re.compile(r"sha256[:-][0-9a-fA-F]{64}")  # what Ollama's GetBlobsPath accepts
BLOBS_DIR = "/root/.ollama/models/blobs"  # where a missing blob is said to be
QUANTIZE_TYPES = ("q4_K_M", "q4_K_S", "q8_0")

# The inference routes: path -> kind. Faults and hang-up watching apply to these only.
INFERENCE = {"/api/generate": "generate", "/api/chat": "chat", "/api/embed": "embed",
             "/api/embeddings": "embeddings", "/v1/chat/completions": "oa_chat",
             "/v1/completions": "oa_completion", "/v1/embeddings": "oa_embed",
             "/v1/responses": "oa_responses", "/v1/messages": "an_messages",
             "/v1/images/generations": "oa_image"}
# Kinds answered from a conversation (Ollama runs them all through its chat handler).
CHAT_KINDS = frozenset({"chat", "oa_chat", "oa_responses", "an_messages"})
# Routes newer releases added, and the first release that serves each: an older
# Ollama's router does not know the path and answers gin's plain-text 404.
NEWER_ROUTES = {"/v1/responses": "0.13.3", "/v1/messages": "0.14.0"}
DEFAULT_VERSION = "0.14.0"      # the first release that serves /v1/messages
TINY_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8"
            "AAAAASUVORK5CYII=")    # what an image model draws here: one pixel

# Go request structs, for Go's decode errors: field -> (JSON kind accepted, Go type).
STR, BOOL, INT, NUM, LIST, OBJ, DURATION = "string", "bool", "int", "number", "array", \
    "object", "duration"
STRUCTS = {
    "api.GenerateRequest": {
        "model": (STR, "string"), "prompt": (STR, "string"), "suffix": (STR, "string"),
        "system": (STR, "string"), "template": (STR, "string"), "stream": (BOOL, "bool"),
        "raw": (BOOL, "bool"), "images": (LIST, "[]api.ImageData"), "context": (LIST, "[]int"),
        "options": (OBJ, "map[string]interface {}"), "keep_alive": (DURATION, ""),
        "truncate": (BOOL, "bool"), "shift": (BOOL, "bool"), "logprobs": (BOOL, "bool"),
        "top_logprobs": (INT, "int")},
    "api.ChatRequest": {
        "model": (STR, "string"), "messages": (LIST, "[]api.Message"), "stream": (BOOL, "bool"),
        "tools": (LIST, "api.Tools"), "options": (OBJ, "map[string]interface {}"),
        "keep_alive": (DURATION, ""), "truncate": (BOOL, "bool"), "shift": (BOOL, "bool"),
        "logprobs": (BOOL, "bool"), "top_logprobs": (INT, "int")},
    "api.EmbedRequest": {
        "model": (STR, "string"), "truncate": (BOOL, "bool"), "dimensions": (INT, "int"),
        "keep_alive": (DURATION, ""), "options": (OBJ, "map[string]interface {}")},
    "api.EmbeddingRequest": {
        "model": (STR, "string"), "prompt": (STR, "string"), "keep_alive": (DURATION, ""),
        "options": (OBJ, "map[string]interface {}")},
    "api.PullRequest": {"model": (STR, "string"), "name": (STR, "string"),
                        "insecure": (BOOL, "bool"), "stream": (BOOL, "bool")},
    "api.ShowRequest": {"model": (STR, "string"), "name": (STR, "string"),
                        "verbose": (BOOL, "bool"), "system": (STR, "string"),
                        "template": (STR, "string")},
    "api.DeleteRequest": {"model": (STR, "string"), "name": (STR, "string")},
    "api.PushRequest": {"model": (STR, "string"), "name": (STR, "string"),
                        "insecure": (BOOL, "bool"), "stream": (BOOL, "bool")},
    "api.CreateRequest": {
        "model": (STR, "string"), "name": (STR, "string"), "from": (STR, "string"),
        "files": (OBJ, "map[string]string"), "adapters": (OBJ, "map[string]string"),
        "template": (STR, "string"), "system": (STR, "string"),
        "parameters": (OBJ, "map[string]interface {}"), "messages": (LIST, "[]api.Message"),
        "stream": (BOOL, "bool"), "quantize": (STR, "string"),
        "quantization": (STR, "string")},
    "api.CopyRequest": {"source": (STR, "string"), "destination": (STR, "string")},
    "openai.ChatCompletionRequest": {
        "model": (STR, "string"), "messages": (LIST, "[]openai.Message"),
        "stream": (BOOL, "bool"), "stream_options": (OBJ, "openai.StreamOptions"),
        "max_tokens": (INT, "int"), "seed": (INT, "int"), "temperature": (NUM, "float64"),
        "top_p": (NUM, "float64"), "frequency_penalty": (NUM, "float64"),
        "presence_penalty": (NUM, "float64"), "tools": (LIST, "[]api.Tool")},
    "openai.CompletionRequest": {
        "model": (STR, "string"), "prompt": (STR, "string"), "stream": (BOOL, "bool"),
        "stream_options": (OBJ, "openai.StreamOptions"), "max_tokens": (INT, "int"),
        "seed": (INT, "int"), "temperature": (NUM, "float32"), "top_p": (NUM, "float32"),
        "suffix": (STR, "string")},
    "openai.EmbedRequest": {"model": (STR, "string"), "encoding_format": (STR, "string"),
                            "dimensions": (INT, "int")},
    "openai.ImageGenerationRequest": {
        "model": (STR, "string"), "prompt": (STR, "string"), "n": (INT, "int"),
        "size": (STR, "string"), "response_format": (STR, "string")},
    "openai.ResponsesRequest": {
        "model": (STR, "string"), "instructions": (STR, "string"),
        "max_output_tokens": (INT, "int"), "temperature": (NUM, "float64"),
        "top_p": (NUM, "float64"), "stream": (BOOL, "bool"),
        "tools": (LIST, "[]openai.ResponsesTool")},
    "anthropic.MessagesRequest": {
        "model": (STR, "string"), "max_tokens": (INT, "int"),
        "messages": (LIST, "[]anthropic.MessageParam"), "stream": (BOOL, "bool"),
        "temperature": (NUM, "float64"), "top_p": (NUM, "float64"), "top_k": (INT, "int"),
        "stop_sequences": (LIST, "[]string"), "tools": (LIST, "[]anthropic.Tool")},
}
STRUCT_OF = {"generate": "api.GenerateRequest", "chat": "api.ChatRequest",
             "embed": "api.EmbedRequest", "embeddings": "api.EmbeddingRequest",
             "oa_chat": "openai.ChatCompletionRequest",
             "oa_completion": "openai.CompletionRequest", "oa_embed": "openai.EmbedRequest",
             "oa_responses": "openai.ResponsesRequest",
             "oa_image": "openai.ImageGenerationRequest",
             "an_messages": "anthropic.MessagesRequest"}

# Other servers of OpenAI's API the fake can stand in for (FakeOllama(server=...)): the
# routes each answers besides OpenAI's three inference routes and /v1/models (by the
# fake's Ollama-style model names), and what its unknown paths answer. Their answers
# differ from Ollama's OpenAI layer as each server's source says (docs/servers.md):
# llama-server adds `timings` to a whole answer and to a stream's last event;
# llama-cpp-python's streams carry no usage, asked or not; LM Studio's model list says
# what is loaded. Such a fake answers none of Ollama's own routes.
PERSONA_ROUTES = {
    "llama-server": ({"/props": "props", "/health": "health", "/models": "router_models",
                      "/slots": "slots"},
                     (404, {"error": {"code": 404, "message": "File Not Found",
                                      "type": "not_found_error"}})),
    "lmstudio": ({"/api/v0/models": "lmstudio_models", "/api/v1/models": "lmstudio_v1"},
                 "unexpected"),
    "vllm": ({"/version": "vllm_version", "/metrics": "vllm_metrics"},
             (404, {"detail": "Not Found"})),
    "llama-cpp-python": ({"/openapi.json": "openapi"}, (404, {"detail": "Not Found"})),
    "mlx-lm": ({"/health": "health"}, (404, "Not Found")),
}
PERSONA_INFERENCE = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# Loads and unloads on request: LM Studio 0.4's REST API, llama-server's router mode.
PERSONA_LOADS = {"lmstudio": ("/api/v1/models/load", "/api/v1/models/unload"),
                 "llama-server": ("/models/load", "/models/unload")}

JSON_DECODER = json.JSONDecoder()
DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)([^\d.]*)")
DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3,
                  "s": 1.0, "m": 60.0, "h": 3600.0}


class Refusal(Exception):
    """An error answer sent before any byte of the real answer: status and message."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


class HungUp(Exception):
    """The connection is finished with (a fault, or the client went away): close it."""


####################################################################################
# Models on disk
####################################################################################


@dataclasses.dataclass
class DiskModel:
    """One model in the fake's store, with what /api/tags, /api/show and /api/ps need."""
    name: str
    size: int
    family: str
    parameter_size: str
    parameter_count: int
    quantization_level: str
    context_length: int
    capabilities: list
    modified_ns: int
    digest: str


OVERRIDABLE = {"size", "family", "parameter_size", "quantization_level", "context_length",
               "capabilities"}
FAMILY_NAMES = {"qwen": "qwen2", "nomic": "nomic-bert", "mxbai": "bert", "mistral": "llama",
                "phi": "phi3", "gemma": "gemma2", "deepseek": "qwen2", "all": "bert"}


def canonical(name):
    """Ollama's short display name: default registry and `library/` dropped, `:latest` added."""
    parts = name.strip().split("/")
    if len(parts) == 3 and parts[0] == "registry.ollama.ai":
        parts = parts[1:]
    if len(parts) == 2 and parts[0] == "library":
        parts = parts[1:]
    if ":" not in parts[-1]:
        parts[-1] += ":latest"
    return "/".join(parts)


def is_embedding_name(name):
    base = name.rsplit("/", 1)[-1].lower()
    return "embed" in base or base.startswith(("bge", "all-minilm", "snowflake-arctic"))


def parameters_from_name(name, embedding):
    """(count, "3B"-style label) read from a tag like `7b`, `0.5b` or `137m`, else a default."""
    match = re.search(r"(?<![a-z])(\d+(?:\.\d+)?)([bm])(?![a-z])", name.lower())
    if match:
        number, unit = float(match.group(1)), match.group(2)
    else:
        number, unit = (137.0, "m") if embedding else (3.0, "b")
    count = int(number * (1e9 if unit == "b" else 1e6))
    return count, f"{number:g}{unit.upper()}"


def family_from_name(name):
    base = name.rsplit("/", 1)[-1].split(":")[0].lower()
    letters = re.match(r"[a-z]*", base).group(0) or "llama"
    return FAMILY_NAMES.get(letters, letters)


def describe_model(name, overrides=None, modified_ns=None):
    """A DiskModel for `name` with defaults derived from the name, then the overrides."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - OVERRIDABLE
    if unknown:
        raise ValueError(f"unknown model fields for {name}: {sorted(unknown)} "
                         f"(known: {sorted(OVERRIDABLE)})")
    embedding = is_embedding_name(name)
    count, label = parameters_from_name(name, embedding)
    quant = "F16" if embedding else "Q4_K_M"
    bytes_per_param = 2.0 if embedding else 0.6 * (1 << 30) / 1e9
    context = 2048 if embedding else 32768 if name.lower().startswith("qwen") else 131072
    return DiskModel(
        name=name, size=int(overrides.get("size", count * bytes_per_param)),
        family=overrides.get("family", family_from_name(name)),
        parameter_size=overrides.get("parameter_size", label), parameter_count=count,
        quantization_level=overrides.get("quantization_level", quant),
        context_length=int(overrides.get("context_length", context)),
        capabilities=list(overrides.get("capabilities",
                                        ["embedding"] if embedding else ["completion", "tools"])),
        modified_ns=modified_ns or time.time_ns(),
        digest=hashlib.sha256(name.lower().encode()).hexdigest())


def model_table(models):
    """The constructor's forms (None, list of names, dict name -> overrides) as a name dict."""
    if models is None:
        models = DEFAULT_MODELS
    if not isinstance(models, dict):
        models = {name: {} for name in models}
    now = time.time_ns()
    table = {}
    for name, overrides in models.items():
        name = canonical(name)
        table[name] = describe_model(name, overrides, now)
    return table


def model_details(m, parent=""):
    return {"parent_model": parent, "format": "gguf", "family": m.family,
            "families": [m.family], "parameter_size": m.parameter_size,
            "quantization_level": m.quantization_level}


def tags_entry(m):
    """One /api/tags entry (digest is bare hex, as Ollama lists it)."""
    return {"name": m.name, "model": m.name, "modified_at": go_time(m.modified_ns),
            "size": m.size, "digest": m.digest, "details": model_details(m),
            "capabilities": m.capabilities}


def show_entry(m, embedding_dim):
    """The /api/show answer; model_info is always present (the Python client requires it)."""
    arch = m.family
    return {
        "modelfile": f'# Modelfile generated by "ollama show"\nFROM {m.name}\n'
                     f'TEMPLATE """{{{{ .Prompt }}}}"""\n',
        "parameters": 'stop                           "<|eot_id|>"',
        "template": "{{ .Prompt }}",
        "details": model_details(m),
        "model_info": {"general.architecture": arch, "general.file_type": 15,
                       "general.parameter_count": m.parameter_count,
                       "general.quantization_version": 2,
                       f"{arch}.context_length": m.context_length,
                       f"{arch}.embedding_length": embedding_dim,
                       f"{arch}.block_count": 28},
        "capabilities": m.capabilities,
        "modified_at": go_time(m.modified_ns),
    }


def openai_model(m, model_id=None):
    """A /v1/models entry: owned_by is the name's namespace, `library` by default."""
    parts = m.name.split("/")
    return {"id": model_id or m.name, "object": "model", "created": m.modified_ns // 10**9,
            "owned_by": parts[-2] if len(parts) > 1 else "library"}


def loaded_size(m, num_ctx, num_parallel):
    """Weights plus a KV cache that grows with num_ctx x num_parallel, like a real runner."""
    kv_per_token = max(1, m.parameter_count // 32_000)
    return m.size + kv_per_token * num_ctx * num_parallel


####################################################################################
# Times, JSON and Go's ways of saying things
####################################################################################


def go_time(epoch_ns, utc=False):
    """A timestamp as Go marshals time.Time: RFC 3339, nanoseconds without trailing
    zeros, `Z` for UTC, else the local offset."""
    seconds, fraction = divmod(epoch_ns, 10**9)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    if not utc:
        moment = moment.astimezone()
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if fraction:
        text += "." + f"{fraction:09d}".rstrip("0")
    offset = int(moment.utcoffset().total_seconds())
    if not offset:
        return text + "Z"
    hours, minutes = divmod(abs(offset) // 60, 60)
    return f"{text}{'+' if offset > 0 else '-'}{hours:02d}:{minutes:02d}"


def expiry_time(keep_alive):
    """expires_at for a runner idle from now: far in the future when kept forever."""
    if keep_alive == math.inf:
        return go_time(time.time_ns() + FOREVER_NS)
    return go_time(time.time_ns() + min(int(keep_alive * 1e9), FOREVER_NS))  # Go's max


def dumps(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def spaced(data):
    """JSON objects as Python writes them by default ({"a": 1, "b": 2}): a whole body,
    NDJSON lines or SSE `data:` lines, each re-written; anything else left as it is."""
    def respace(line):
        head, brace, rest = line.partition(b"{")
        if not brace or head not in (b"", b"data: "):
            return line
        return head + json.dumps(json.loads(brace + rest), ensure_ascii=False).encode()
    return b"\n".join(respace(line) for line in data.split(b"\n"))


def go_quote(text):
    return json.dumps(text, ensure_ascii=False)


def go_quote_char(char):
    """How Go's JSON errors show one offending byte."""
    if char == "'":
        return "'\\''"
    if char == '"':
        return "'\"'"
    if ord(char) > 127:
        return "'\\x%02x'" % char.encode()[0]
    if char in "\n\r\t\\":
        return "'" + json.dumps(char)[1:-1] + "'"
    return f"'{char}'" if char.isprintable() else "'\\x%02x'" % ord(char)


def json_kind(value):
    """The JSON kind Go names in `cannot unmarshal <kind>`."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "value")


def go_dynamic_type(value):
    """reflect.TypeOf for a value json.Unmarshal put in an `any`."""
    if isinstance(value, bool):
        return "bool"
    return {list: "[]interface {}", dict: "map[string]interface {}"}.get(type(value), "<nil>")


def innermost_container(text, pos):
    """`{` or `[`: which container is open at `pos` (strings skipped)."""
    stack, in_string, escaped = [], False, False
    for char in text[:pos]:
        if in_string:
            escaped = not escaped and char == "\\"
            in_string = escaped or char != '"'
        elif char == '"':
            in_string = True
        elif char in "{[":
            stack.append(char)
        elif char in "}]" and stack:
            stack.pop()
    return stack[-1] if stack else ""


def go_syntax_error(text, err):
    """Go's encoding/json message for the syntax error Python found."""
    if err.pos >= len(text) or err.msg.startswith("Unterminated string"):
        return "unexpected EOF"
    if err.msg.startswith("Invalid \\escape"):
        return f"invalid character {go_quote_char(text[min(err.pos + 1, len(text) - 1)])} " \
               "in string escape code"
    char = go_quote_char(text[err.pos])
    if err.msg.startswith("Invalid control character"):
        return f"invalid character {char} in string literal"
    if err.msg.startswith("Expecting property name"):
        return f"invalid character {char} looking for beginning of object key string"
    if err.msg.startswith("Expecting ':'"):
        return f"invalid character {char} after object key"
    if err.msg.startswith("Expecting ','"):
        where = "object key:value pair" if innermost_container(text, err.pos) == "{" \
            else "array element"
        return f"invalid character {char} after {where}"
    return f"invalid character {char} looking for beginning of value"


def decode_json(raw):
    """Read a body as Go's json.Decoder does: the first value only, the rest ignored.
    Returns (value, None), or (None, error text); "EOF" for an empty body."""
    text = raw.decode("utf-8", "replace")
    start = len(text) - len(text.lstrip(" \t\r\n"))
    if start == len(text):
        return None, "EOF"
    try:
        return JSON_DECODER.raw_decode(text, start)[0], None
    except json.JSONDecodeError as err:
        return None, go_syntax_error(text, err)


def parse_go_duration(text):
    """Seconds in a Go duration string ("5m", "1h30m", "-1s", "0"), or Refusal(400) with
    time.ParseDuration's words."""
    sign, body = (-1, text[1:]) if text.startswith("-") else (1, text.removeprefix("+"))
    if body == "0":
        return 0.0
    if not body:
        raise Refusal(400, f"time: invalid duration {go_quote(text)}")
    total, pos = 0.0, 0
    while pos < len(body):
        match = DURATION_PART.match(body, pos)
        if not match:
            raise Refusal(400, f"time: invalid duration {go_quote(text)}")
        unit = match.group(2)
        if not unit:
            raise Refusal(400, f"time: missing unit in duration {go_quote(text)}")
        if unit not in DURATION_UNITS:
            raise Refusal(400, f"time: unknown unit {go_quote(unit)} in duration "
                               f"{go_quote(text)}")
        total += float(match.group(1)) * DURATION_UNITS[unit]
        pos = match.end()
    return sign * total


def read_keep_alive(value):
    """keep_alive as Ollama's api.Duration reads it: seconds, math.inf for "forever"
    (any negative), None when absent. A number is whole seconds (fractions dropped)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise Refusal(400, f"Unsupported type: '{go_dynamic_type(value)}'")
    seconds = parse_go_duration(value) if isinstance(value, str) else \
        (-1.0 if value < 0 else float(int(value)))
    return math.inf if seconds < 0 else seconds


def accepts(kind, value):
    if kind == STR:
        return isinstance(value, str)
    if kind == BOOL:
        return isinstance(value, bool)
    if kind == INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, list if kind == LIST else dict)


def check_fields(body, struct):
    """Go's `json: cannot unmarshal ...` for the first mistyped field a handler declares."""
    fields = STRUCTS[struct]
    short = struct.split(".", 1)[1]
    for key, value in body.items():
        kind, go_type = fields.get(key, (None, None))
        if kind is None or value is None:
            continue
        if kind == DURATION:
            read_keep_alive(value)
        elif not accepts(kind, value):
            shown = f"number {value!r}" if kind == INT and isinstance(value, float) \
                else json_kind(value)
            raise Refusal(400, f"json: cannot unmarshal {shown} into Go struct field "
                               f"{short}.{key} of type {go_type}")


def read_body(ex, struct):
    """The request object, or Refusal(400) worded as the Ollama handler would say it."""
    body, error = ex.decoded
    if error == "EOF" and not ex.openai:
        raise Refusal(400, "missing request body")
    if error:
        raise Refusal(400, error)
    if body is None:          # JSON null decodes into an empty struct
        return {}
    if not isinstance(body, dict):
        raise Refusal(400, f"json: cannot unmarshal {json_kind(body)} into Go value of "
                           f"type {struct}")
    check_fields(body, struct)
    return body


def check_messages_request(body):
    """Ollama's Anthropic layer checks these before anything else, in this order."""
    if not body.get("model"):
        raise Refusal(400, "model is required")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or max_tokens <= 0:
        raise Refusal(400, "max_tokens is required and must be positive")
    if not body.get("messages"):
        raise Refusal(400, "messages is required")


def version_key(version):
    """"0.13.3" -> (0, 13, 3); a "-rc1" suffix is ignored."""
    return tuple(int(p) for p in re.findall(r"\d+", version.lstrip("v").split("-")[0]))


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def http_date():
    return email.utils.formatdate(usegmt=True).encode()


def reason_phrase(status):
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


####################################################################################
# The Host-header guard (Ollama's allowedHostsMiddleware)
####################################################################################

PRIVATE_NETWORKS = [ipaddress.ip_network(n) for n in
                    ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")]


def split_host_port(value):
    """Go's net.SplitHostPort, falling back to the whole value when it fails."""
    if value.startswith("["):
        end = value.find("]")
        if end != -1 and value[end + 1:end + 2] == ":":
            return value[1:end]
        return value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def host_allowed(header, hostname):
    """True when a loopback-bound Ollama would serve a request with this Host header."""
    host = split_host_port(header.strip())
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None and (ip.is_loopback or ip.is_unspecified or
                           any(ip in net for net in PRIVATE_NETWORKS
                               if net.version == ip.version)):
        return True
    host = host.lower()
    return host in ("", "localhost", hostname.lower()) or \
        host.endswith((".localhost", ".local", ".internal"))


####################################################################################
# Runners: load once, num_parallel slots, FIFO waiting
####################################################################################


class Slots:
    """num_parallel slots of one runner; waiters are served first come, first served."""

    def __init__(self, size):
        self.size = size
        self.free = size
        self._queue = collections.deque()
        self._idle_waiters = []

    async def acquire(self):
        if self.free and not self._queue:
            self.free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        self._queue.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()          # handed a slot as we were cancelled: pass it on
            elif turn in self._queue:
                self._queue.remove(turn)
            raise

    def release(self):
        while self._queue:
            turn = self._queue.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.free += 1
        if self.free == self.size:
            for waiter in self._idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._idle_waiters.clear()

    async def wait_idle(self):
        """Until no request holds or waits for a slot (a reload waits for this)."""
        if self.free == self.size and not self._queue:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        await waiter


class Runner:
    """One model's runner: its slots, the load in progress, its keep-alive timer, when it
    was last used (eviction picks the least recent) and the prompts its slots hold."""

    def __init__(self, num_parallel):
        self.slots = Slots(num_parallel)
        self.users = 0                  # requests scheduled on it right now
        self.load_task = None
        self.keep_alive = DEFAULT_KEEP_ALIVE
        self.timer = None
        # One KV cache per slot: the token sequences of the last num_parallel requests.
        self.prompts = collections.deque(maxlen=num_parallel)

    def cached_prefix(self, words):
        """How many leading tokens of `words` one slot's cache already holds; that slot
        takes the new sequence (Ollama reuses the slot with the longest shared prefix)."""
        best, best_at = 0, None
        for at, cached in enumerate(self.prompts):
            shared = shared_prefix(cached, words)
            if shared > best:
                best, best_at = shared, at
        if best_at is not None:
            del self.prompts[best_at]
        return best

    def forget_prompts(self):
        self.prompts.clear()      # an unloaded runner's KV cache is gone

    def stop_timer(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Turn:
    """One request's use of a runner: from arrival, through holding a slot, to an end
    that comes exactly once (slot freed, keep-alive clock started)."""

    def __init__(self, fake, model, runner, keep_alive):
        self.fake, self.model, self.runner = fake, model, runner
        self.holding = self.ended = False
        runner.users += 1
        runner.stop_timer()
        if keep_alive is not None:      # the latest request's keep_alive wins, as in Ollama
            runner.keep_alive = keep_alive

    async def take_slot(self):
        await self.runner.slots.acquire()
        self.holding = True
        self.fake.active += 1
        self.fake.max_active = max(self.fake.max_active, self.fake.active)

    def end(self):
        if self.ended:
            return
        self.ended = True
        if self.holding:
            self.fake.active -= 1
            self.runner.slots.release()
        self.runner.users -= 1
        self.fake.on_runner_released(self.model, self.runner)


@dataclasses.dataclass
class Ask:
    """One inference request, read and checked: what to answer and how."""
    kind: str
    name: str                   # the model as the client spelled it (answers echo it)
    model: str                  # the on-disk name
    stream: bool = False
    control: str = ""           # "load" / "unload" for an empty prompt or messages
    num_ctx: int | None = None  # options.num_ctx, None when not given
    keep_alive: float | None = None
    tokens: int = 0
    reason: str = "stop"
    prompt_tokens: int = 1
    inputs: list | None = None
    include_usage: bool = False
    base64: bool = False
    dimensions: int = 0
    raw: bool = False
    arrived_ns: int = 0
    words: list | None = None   # the prompt's tokens, for the prompt cache (chat: messages)
    loaded_ns: int = 0          # when the runner was ready (load_duration ends)
    prompt_ns: int = 0          # time spent evaluating the prompt
    decode_ns: int = 0          # when decoding began (eval_duration starts)
    tool_call: tuple | None = None  # (name, arguments): the answer calls this tool
    body: dict | None = None    # the request as sent (a Responses answer echoes parts)


####################################################################################
# Answer formats: Ollama NDJSON, OpenAI SSE
####################################################################################


def word(i):
    """The i-th generated token, JSON-encoded (cheap: the benchmark relays 2,000 of them)."""
    return b'"w%d "' % i


def words_text(n):
    return "".join(f"w{i} " for i in range(n))


class UtcClock:
    """created_at for answers and their chunks, formatted at most once a millisecond."""

    def __init__(self):
        self._ms, self._text = -1, b""

    def now(self):
        ns = time.time_ns()
        if ns // 1_000_000 != self._ms:
            self._ms = ns // 1_000_000
            self._text = go_time(ns, utc=True).encode()
        return self._text


class NativeAnswer:
    """/api/generate and /api/chat: NDJSON chunks, then a final done:true with metrics."""

    stream_type = NDJSON_TYPE

    def __init__(self, ask, clock):
        self.ask, self.chat = ask, ask.kind == "chat"
        self.clock = clock
        self._pre = b'{"model":%s,"created_at":"' % dumps(ask.name)
        if self.chat:
            self._mid, self._post = b'","message":{"role":"assistant","content":', \
                b'},"done":false}\n'
        else:
            self._mid, self._post = b'","response":', b',"done":false}\n'

    def token(self, i):
        return b"".join((self._pre, self.clock.now(), self._mid, word(i), self._post))

    def final(self, text, metrics):
        out = {"model": self.ask.name, "created_at": self.clock.now().decode()}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        out.update(done=True, done_reason=self.ask.reason)
        if not self.chat and not self.ask.raw:
            out["context"] = list(range(1, self.ask.prompt_tokens + self.ask.tokens + 1))
        out.update(metrics)
        return out

    def closing(self, metrics):
        return [dumps(self.final("", metrics)) + b"\n"]

    def whole(self, metrics):
        return self.final(words_text(self.ask.tokens), metrics)

    def error_tail(self, message):
        return dumps({"error": message}) + b"\n"


def openai_usage(metrics):
    prompt, completion = metrics.get("prompt_eval_count", 0), metrics.get("eval_count", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class OpenAIAnswer:
    """/v1/chat/completions and /v1/completions: SSE events ending in [DONE], or one object."""

    stream_type = SSE_TYPE

    def __init__(self, ask, number, server="ollama"):
        self.ask, self.chat = ask, ask.kind == "oa_chat"
        self.timings = server == "llama-server"  # in a whole answer and a stream's last event
        if server == "llama-cpp-python":
            ask.include_usage = False  # its streams carry none, asked or not
        self.id = f"chatcmpl-{number}" if self.chat else f"cmpl-{number}"
        self.created = int(time.time())
        kind = "chat.completion" if self.chat else "text_completion"
        self.head = {"id": self.id, "object": kind + (".chunk" if self.chat else ""),
                     "created": self.created, "model": ask.name,
                     "system_fingerprint": "fp_ollama"}
        self._pre = b"data: " + dumps(self.head)[:-1] + b',"choices":['
        zero = b',"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}' \
            if ask.include_usage and not self.chat else b""
        self._post = b"]" + zero + b"}\n\n"
        self._first = b'{"index":0,"delta":{"role":"assistant","content":'
        self._next = b'{"index":0,"delta":{"content":' if self.chat else b'{"text":'
        self._end = b'},"finish_reason":null}' if self.chat else b',"index":0,"finish_reason":null}'

    def token(self, i):
        if self.chat and self.ask.tool_call:  # its name, then its arguments' text
            name, args = self.ask.tool_call
            text = dumps(args).decode()
            return b"".join(self.event([{"index": 0, "finish_reason": None, "delta": {
                "role": "assistant", "content": None, "tool_calls": [dict(
                    {"index": 0, "id": f"call_{self.id}", "type": "function"},
                    function=piece)]}}]) for piece in (
                {"name": name, "arguments": text[:len(text) // 2]},
                {"arguments": text[len(text) // 2:]}))
        start = self._first if self.chat and i == 0 else self._next
        return b"".join((self._pre, start, word(i), self._end, self._post))

    def _reason(self):
        return "tool_calls" if self.chat and self.ask.tool_call else self.ask.reason

    def _timings(self, metrics):
        """llama-server's timings (server-task.cpp result_timings) from the metrics."""
        prompt_ms = metrics.get("prompt_eval_duration", 0) / 1e6
        predicted_ms = metrics.get("eval_duration", 0) / 1e6
        prompt_n, predicted_n = metrics.get("prompt_eval_count", 0), metrics.get("eval_count", 0)
        return {"cache_n": 0, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
                "prompt_per_second": prompt_n / prompt_ms * 1e3 if prompt_ms else 0.0,
                "predicted_n": predicted_n, "predicted_ms": predicted_ms,
                "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
                "predicted_per_second": predicted_n / predicted_ms * 1e3 if predicted_ms
                else 0.0}

    def event(self, choices, usage=None):
        obj = dict(self.head, choices=choices)
        if usage is not None:
            obj["usage"] = usage
        return b"data: " + dumps(obj) + b"\n\n"

    def closing(self, metrics):
        reason = self._reason()
        if self.chat:
            out = [{"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}]
        else:
            out = [{"choices": [{"text": "", "index": 0, "finish_reason": reason}]}]
            if self.ask.include_usage:
                out[0]["usage"] = openai_usage({})
        if self.ask.include_usage:
            out.append({"choices": [], "usage": openai_usage(metrics)})
        if self.timings:
            out[-1]["timings"] = self._timings(metrics)
        events = [b"data: " + dumps(dict(self.head, **e)) + b"\n\n" for e in out]
        return events + [b"data: [DONE]\n\n"]

    def whole(self, metrics):
        text = words_text(self.ask.tokens)
        if self.chat and self.ask.tool_call:
            name, args = self.ask.tool_call
            choice = {"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "tool_calls": [{
                    "id": f"call_{self.id}", "type": "function",
                    "function": {"name": name, "arguments": dumps(args).decode()}}]}}
        elif self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": self.ask.reason}
        else:
            choice = {"text": text, "index": 0, "finish_reason": self.ask.reason}
        out = dict(self.head, object="chat.completion" if self.chat else "text_completion",
                   choices=[choice], usage=openai_usage(metrics))
        if self.timings:
            out["timings"] = self._timings(metrics)
        return out

    def error_tail(self, message):
        return b""      # Ollama's OpenAI layer does not translate a mid-stream error: it stops


def sse_event(name, data):
    """One named Server-Sent Event, as Ollama's Anthropic and Responses layers write it."""
    return b"event: %s\ndata: %s\n\n" % (name.encode(), dumps(data))


def anthropic_error(status, message):
    """Anthropic's error object; Ollama's Anthropic layer takes the type from the status."""
    kind = {400: "invalid_request_error", 401: "authentication_error",
            403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
            503: "overloaded_error", 529: "overloaded_error"}.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message},
            "request_id": f"req_{os.urandom(12).hex()}"}


STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}  # Ollama's done_reason ->


class AnthropicAnswer:
    """/v1/messages: the events message_start, content_block_start, ping,
    content_block_delta..., content_block_stop, message_delta, message_stop (no [DONE]),
    or one message object. A tool call is one tool_use block, sent whole."""

    stream_type = SSE_TYPE

    def __init__(self, ask):
        self.ask, self.id = ask, f"msg_{os.urandom(12).hex()}"
        self.started = False

    def _usage(self, output_tokens):
        return {"input_tokens": self.ask.prompt_tokens, "output_tokens": output_tokens}

    def _block(self):
        if self.ask.tool_call:
            name, args = self.ask.tool_call
            return {"type": "tool_use", "id": f"toolu_{self.id[4:]}", "name": name,
                    "input": args}
        return {"type": "text", "text": words_text(self.ask.tokens)}

    def _opening(self):
        self.started = True
        message = {"id": self.id, "type": "message", "role": "assistant",
                   "model": self.ask.name, "content": [], "stop_reason": None,
                   "stop_sequence": None, "usage": self._usage(0)}
        block = dict(self._block(), input={}) if self.ask.tool_call else \
            {"type": "text", "text": ""}
        return (sse_event("message_start", {"type": "message_start", "message": message})
                + sse_event("content_block_start", {"type": "content_block_start",
                                                    "index": 0, "content_block": block})
                + sse_event("ping", {"type": "ping"}))

    def token(self, i):
        if self.ask.tool_call:
            delta = {"type": "input_json_delta",
                     "partial_json": dumps(self.ask.tool_call[1]).decode()}
        else:
            delta = {"type": "text_delta", "text": f"w{i} "}
        event = sse_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                  "delta": delta})
        return (b"" if self.started else self._opening()) + event

    def _stop_reason(self):
        return "tool_use" if self.ask.tool_call else STOP_REASONS.get(self.ask.reason,
                                                                      "stop_sequence")

    def closing(self, metrics):
        out = [] if self.started else [self._opening()]
        return out + [
            sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse_event("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": self._stop_reason(),
                                                  "stop_sequence": None},
                                        "usage": self._usage(metrics.get("eval_count", 0))}),
            sse_event("message_stop", {"type": "message_stop"})]

    def whole(self, metrics):
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.ask.name,
                "content": [self._block()], "stop_reason": self._stop_reason(),
                "stop_sequence": None, "usage": self._usage(metrics.get("eval_count", 0))}

    def error_tail(self, message):
        return sse_event("error", {"type": "error", "error": {"type": "api_error",
                                                             "message": message}})


class ResponsesAnswer:
    """/v1/responses: events carrying `type` and `sequence_number`, from response.created
    to response.completed (with usage; no [DONE]), or one response object. A tool call is
    one function_call output item."""

    stream_type = SSE_TYPE

    def __init__(self, ask, body):
        self.ask, self.id = ask, f"resp_{os.urandom(12).hex()}"
        self.item_id = f"msg_{self.id[5:]}"
        self.created, self.seq, self.started = int(time.time()), 0, False
        self.tools = body.get("tools") if isinstance(body.get("tools"), list) else []
        self.instructions = body.get("instructions") or None

    def _event(self, name, **data):
        data.update(type=name, sequence_number=self.seq)
        self.seq += 1
        return sse_event(name, data)

    def _item(self, status):
        if self.ask.tool_call:
            name, args = self.ask.tool_call
            return {"id": f"fc_{self.id[5:]}", "type": "function_call", "status": status,
                    "call_id": f"call_{self.id[5:13]}", "name": name,
                    "arguments": dumps(args).decode() if status == "completed" else ""}
        text = words_text(self.ask.tokens) if status == "completed" else ""
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant",
                "content": [self._part(text)] if status == "completed" else []}

    @staticmethod
    def _part(text):
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _response(self, status, metrics=None):
        usage = None
        if metrics is not None:
            prompt, output = self.ask.prompt_tokens, metrics.get("eval_count", 0)
            usage = {"input_tokens": prompt, "output_tokens": output,
                     "total_tokens": prompt + output,
                     "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens_details": {"reasoning_tokens": 0}}
        done = status == "completed"
        return {"id": self.id, "object": "response", "created_at": self.created,
                "completed_at": int(time.time()) if done else None, "status": status,
                "incomplete_details": None, "model": self.ask.name,
                "previous_response_id": None, "instructions": self.instructions,
                "output": [self._item("completed")] if done else [], "error": None,
                "tools": self.tools, "tool_choice": "auto", "truncation": "disabled",
                "parallel_tool_calls": True, "text": {"format": {"type": "text"}},
                "top_p": 1.0, "temperature": 1.0, "reasoning": None, "usage": usage,
                "store": False, "background": False, "service_tier": "default",
                "metadata": {}}

    def _opening(self):
        self.started = True
        out = (self._event("response.created", response=self._response("in_progress"))
               + self._event("response.in_progress", response=self._response("in_progress"))
               + self._event("response.output_item.added", output_index=0,
                             item=self._item("in_progress")))
        if not self.ask.tool_call:
            out += self._event("response.content_part.added", item_id=self.item_id,
                               output_index=0, content_index=0, part=self._part(""))
        return out

    def token(self, i):
        head = b"" if self.started else self._opening()
        if not self.ask.tool_call:
            return head + self._event("response.output_text.delta", item_id=self.item_id,
                                      output_index=0, content_index=0, delta=f"w{i} ",
                                      logprobs=[])
        item = self._item("completed")
        return head + b"".join((
            self._event("response.function_call_arguments.delta", item_id=item["id"],
                        output_index=0, delta=item["arguments"]),
            self._event("response.function_call_arguments.done", item_id=item["id"],
                        output_index=0, arguments=item["arguments"]),
            self._event("response.output_item.done", output_index=0, item=item)))

    def closing(self, metrics):
        out = [] if self.started else [self._opening()]
        if not self.ask.tool_call:
            text = words_text(self.ask.tokens)
            out += [self._event("response.output_text.done", item_id=self.item_id,
                                output_index=0, content_index=0, text=text, logprobs=[]),
                    self._event("response.content_part.done", item_id=self.item_id,
                                output_index=0, content_index=0, part=self._part(text)),
                    self._event("response.output_item.done", output_index=0,
                                item=self._item("completed"))]
        return out + [self._event("response.completed",
                                  response=self._response("completed", metrics))]

    def whole(self, metrics):
        return self._response("completed", metrics)

    def error_tail(self, message):
        return self._event("error", code="api_error", message=message, param=None)


def embedding(text, dim):
    """A deterministic pseudo-embedding of `text` (dim floats in [-1, 1])."""
    values, counter = [], 0
    while len(values) < dim:
        digest = hashlib.sha256(b"%d:" % counter + text.encode()).digest()
        values.extend((b - 127.5) / 127.5 for b in digest)
        counter += 1
    return values[:dim]


def normalised(values):
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def as_float32(value):
    """The shortest decimal that round-trips as float32, as Go marshals []float32."""
    packed = struct.pack("<f", value)
    for digits in range(6, 10):
        short = float("%.*g" % (digits, value))
        if struct.pack("<f", short) == packed:
            return short
    return struct.unpack("<f", packed)[0]


def widened_float32(value):
    """float64(float32(x)): what the legacy /api/embeddings prints."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def count_tokens(text):
    return len(text.split()) if isinstance(text, str) else 0


def shared_prefix(a, b):
    """The number of leading items two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prompt_words(kind, body):
    """The tokens a runner evaluates: the prompt (with its system text), or each message
    as its role and its words, in order."""
    if kind in CHAT_KINDS:
        words = []
        for m in conversation(kind, body):
            role = m.get("role") if isinstance(m, dict) else None
            words += [role if isinstance(role, str) else "user", *message_text(m).split()]
        return words
    system, prompt = body.get("system"), body.get("prompt")
    return (system.split() if isinstance(system, str) else []) + \
        (prompt.split() if isinstance(prompt, str) else [])


def conversation(kind, body):
    """The chat messages Ollama makes of a request: Anthropic's `system` and OpenAI
    Responses' `instructions` become a system message, a Responses `input` string a user
    message, its function_call_output items tool messages."""
    if kind == "an_messages":
        system = body.get("system")
        first = [{"role": "system", "content": system}] if system else []
        return first + [m for m in body.get("messages") or [] if isinstance(m, dict)]
    if kind == "oa_responses":
        out = [{"role": "system", "content": body["instructions"]}] \
            if isinstance(body.get("instructions"), str) and body["instructions"] else []
        items = body.get("input")
        if isinstance(items, str):
            return out + [{"role": "user", "content": items}]
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "function_call_output":
                out.append({"role": "tool", "content": str(item.get("output", ""))})
            elif item.get("type") == "function_call":
                out.append({"role": "assistant", "content": ""})
            else:
                out.append(item)
        return out
    return [m for m in body.get("messages") or [] if isinstance(m, dict)]


def tool_call_for(body, messages):
    """(tool name, arguments) when the request offers tools and the user's last message
    names one (as a model deciding to call it would), else None. Deterministic: each of
    the tool's parameters gets "w0", "w1", ... A tool's result in the last message is
    answered with text."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not messages or messages[-1].get("role") != "user":
        return None
    asked = message_text(messages[-1])
    for tool in tools:
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            tool = tool["function"]  # OpenAI's chat tools: {"type": "function", ...}
        name = tool.get("name") if isinstance(tool, dict) else None
        if isinstance(name, str) and name and name in asked:
            schema = tool.get("input_schema") or tool.get("parameters") or {}
            props = schema.get("properties") if isinstance(schema, dict) else None
            return name, {key: f"w{i}" for i, key in enumerate(props or {})}
    return None


def answer_words(kind, tokens):
    """What the answer adds to the slot's cache: the words, after "assistant" in a chat
    (so the next turn, which repeats the answer as a message, shares the whole prefix)."""
    words = words_text(tokens).split()
    return ["assistant", *words] if kind in CHAT_KINDS else words


def drawn_length(words, lo, hi):
    """An answer length in lo..hi drawn from an RNG seeded by the prompt: the same
    prompt always gets the same length."""
    seed = hashlib.sha256(" ".join(words).encode()).digest()
    return random.Random(seed).randint(lo, hi)


def message_text(message):
    """A chat message's text; OpenAI content may be a list of parts."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


####################################################################################
# HTTP on h11: one exchange
####################################################################################


class Exchange:
    """One request on one h11 connection, and the ways to answer it."""

    def __init__(self, conn, reader, writer, request, body):
        self.conn, self.reader, self.writer = conn, reader, writer
        self.method = request.method.decode("ascii", "replace")
        self.path = request.target.decode("latin-1").split("?", 1)[0]
        self.openai = self.path.startswith("/v1/")
        self.anthropic = self.path == "/v1/messages"
        self.headers = {}
        for name, value in request.headers:
            name, value = name.decode("latin-1").lower(), value.decode("latin-1")
            self.headers[name] = f"{self.headers[name]}, {value}" if name in self.headers \
                else value
        # (value, None) or (None, Go's error text); a blob's body is read by its handler
        self.decoded = decode_json(body) if body is not None else (None, None)
        self.committed = False      # the status line has been written (or is queued)
        self.pending = b""          # a stream's head, sent along with its first chunk
        self.chunked = False
        self.spaced = False         # JSON re-written with spaces (FakeOllama.spaced_json)

    def _head(self, status, headers):
        self.committed = True
        return self.conn.send(h11.Response(status_code=status, reason=reason_phrase(status),
                                           headers=[(b"Date", http_date()), *headers]))

    async def send(self, status, body=b"", content_type=TEXT_TYPE, headers=()):
        """A whole response in one write."""
        if self.spaced and content_type == JSON_TYPE:
            body = spaced(body)
        fields = [(b"Content-Length", b"%d" % len(body)), *headers]
        if content_type:
            fields.insert(0, (b"Content-Type", content_type))
        out = self._head(status, fields)
        if body and self.method != "HEAD":
            out += self.conn.send(h11.Data(data=body))
        self.writer.write(out + self.conn.send(h11.EndOfMessage()))
        await self.writer.drain()

    async def send_json(self, status, obj):
        await self.send(status, dumps(obj), JSON_TYPE)

    async def send_error(self, status, message):
        """Ollama's {"error": ...}, or OpenAI's error object on /v1 (Anthropic's on
        /v1/messages)."""
        if self.anthropic:
            return await self.send_json(status, anthropic_error(status, message))
        if not self.openai:
            return await self.send_json(status, {"error": message})
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        await self.send_json(status, {"error": {"message": message, "type": kind,
                                                "param": None, "code": None}})

    async def send_truncated(self, body):
        """Headers promising `body`, then only half of it, then hang up."""
        self.writer.write(self._head(200, [(b"Content-Type", JSON_TYPE),
                                           (b"Content-Length", b"%d" % len(body))])
                          + body[:len(body) // 2])
        await self.writer.drain()
        self.hang_up()

    def open_stream(self, content_type):
        """Prepare a streamed 200; nothing goes out before the first chunk (as in Ollama,
        whose headers leave with the first token)."""
        self.pending = self._head(200, [(b"Content-Type", content_type)])
        # h11 picks chunked framing for HTTP/1.1 clients, close-delimited for HTTP/1.0.
        self.chunked = b"chunked" in self.pending.lower()

    async def send_chunk(self, data):
        """One flushed piece of a streamed body (framed by hand: the benchmark's hot path)."""
        if self.spaced:
            data = spaced(data)
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if self.pending:
            data, self.pending = self.pending + data, b""
        self.writer.write(data)
        await self.writer.drain()

    async def close_stream(self):
        self.writer.write(self.pending + self.conn.send(h11.EndOfMessage()))
        self.pending = b""
        await self.writer.drain()

    def hang_up(self):
        """Close without finishing the response (FIN after what was written)."""
        self.writer.close()

    def reset(self):
        """Close with a TCP RST: SO_LINGER (1, 0), then close."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def wait_for_hangup(self):
        """Return when the client closes its side; pipelined bytes go to h11's buffer."""
        try:
            while True:
                data = await self.reader.read(READ_SIZE)
                if not data:
                    return
                self.conn.receive_data(data)
        except ConnectionError:
            return


####################################################################################
# The fake server
####################################################################################


class FakeOllama:
    """A fake Ollama on h11 and asyncio; see the module docstring."""

    def __init__(self, models=None, *, num_parallel=1, chunks=5, chunk_delay=0.0,
                 load_delay=0.0, version=DEFAULT_VERSION, embedding_dim=8, host_guard=True,
                 speed=1.0, saturation=None, max_loaded=None, prompt_delay=0.0,
                 vary_tokens=None, load_per_gb=0.0, spaced_json=False, server="ollama",
                 router_mode=False):
        self.num_parallel, self.chunks = num_parallel, chunks
        if server != "ollama" and server not in PERSONA_ROUTES:
            raise ValueError(f"server must be ollama or one of {', '.join(PERSONA_ROUTES)}")
        self.server = server  # the kind of server it stands in for (PERSONA_ROUTES)
        self.router_mode = router_mode  # llama-server started with no model: it loads them
        # JSON written as Python's json.dumps writes it by default, a space after each
        # colon and comma (a Python server does): a reader of Ollama's answers must not
        # depend on Go's compact form.
        self.spaced_json = spaced_json
        # A load takes load_delay plus load_per_gb per GB of weights: reading them from
        # disk is most of a real load, so a 9 GB model loads longer than a 2 GB one.
        self.chunk_delay, self.load_delay = chunk_delay, load_delay
        self.load_per_gb = load_per_gb
        # The contention model (module docstring): all settable while it runs.
        self.speed, self.saturation, self.max_loaded = speed, saturation, max_loaded
        self.prompt_delay, self.vary_tokens = prompt_delay, vary_tokens
        self.generating = self.evictions = self.unloads = 0  # unloads: asked, keep_alive 0
        self._room_waits = 0                # loads waiting for a runner to be evicted
        self._room_open = asyncio.Event()   # cleared while they wait: arrivals queue
        self._room_open.set()
        self._released = []                 # futures of the loads waiting for room
        self._loading = set()               # models loading, room made for them
        self.version, self.embedding_dim, self.host_guard = version, embedding_dim, host_guard
        self.fault, self.die_after = None, 2
        self.requests = []
        self.active = self.max_active = self.waiting = 0
        self.completed = self.cancelled = self.load_count = 0
        self.loaded = {}
        self.models = {}
        self.blobs = {}              # digest -> size: what /api/create can use
        self.blob_received = {}      # digest -> bytes of its upload read so far
        self.pushed = []             # models pushed, in order
        self.port = None
        self._host = "127.0.0.1"
        self._guarded = False
        self._hostname = socket.gethostname()
        self._server = None
        self._tasks = set()
        self._runners = {}
        self._answers = 0
        self._clock = UtcClock()
        self._routes = self._route_table()
        self.set_models(models)

    def set_models(self, models):
        """Replace the on-disk model set (None, a list of names, or name -> overrides)."""
        self.models = model_table(models)

    @property
    def url(self):
        host = "127.0.0.1" if self._host in ("0.0.0.0", "::", "") else self._host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    # -- lifecycle ----------------------------------------------------------------

    async def start(self, host="127.0.0.1", port=0):
        """Bind and start serving; returns the bound port."""
        self._server = await asyncio.start_server(self._on_connect, host, port, backlog=1024)
        address = self._server.sockets[0].getsockname()
        self._host, self.port = address[0], address[1]
        self._guarded = self.host_guard and ipaddress.ip_address(
            address[0].split("%")[0]).is_loopback
        return self.port

    async def stop(self):
        """Close the listener and every connection; await all of the fake's tasks."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for runner in self._runners.values():
            runner.stop_timer()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _spawn(self, coro, name):
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _on_connect(self, reader, writer):
        peer = writer.get_extra_info("peername")
        self._spawn(self._serve_connection(reader, writer), f"fake-ollama connection {peer}")

    # -- the connection loop ------------------------------------------------------
    #
    # Theory: read one request (with its whole body), answer it, and start the next
    # cycle when both sides are DONE (HTTP/1.1 keep-alive); anything else closes the
    # connection. While an inference answer is produced, a second task reads the
    # socket: EOF there means the client went away, and the answer is cancelled, as
    # closing the socket is how clients cancel an Ollama request.

    async def _serve_connection(self, reader, writer):
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._receive_request(conn, reader, writer)
                if request is None:
                    return
                ex = Exchange(conn, reader, writer, *request)
                ex.spaced = self.spaced_json
                await self._dispatch(ex)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (HungUp, ConnectionError):
            return
        finally:
            writer.close()

    async def _next_event(self, conn, reader, writer):
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if conn.they_are_waiting_for_100_continue:
                writer.write(conn.send(h11.InformationalResponse(status_code=100,
                                                                 headers=[])))
            conn.receive_data(await reader.read(READ_SIZE))

    async def _receive_request(self, conn, reader, writer):
        """(h11.Request, body bytes), or None when the client is done or talks nonsense."""
        try:
            request = await self._next_event(conn, reader, writer)
            if not isinstance(request, h11.Request):
                return None
            if request.method == b"POST" and BLOB_PATH.fullmatch(
                    request.target.decode("latin-1").split("?", 1)[0]):
                return request, None  # a blob: its handler reads it as it comes
            body = []
            while True:
                event = await self._next_event(conn, reader, writer)
                if isinstance(event, h11.EndOfMessage):
                    return request, b"".join(body)
                if not isinstance(event, h11.Data):
                    return None
                body.append(event.data)
        except h11.RemoteProtocolError as exc:
            await self._refuse_malformed(conn, writer, exc)
            return None

    async def _refuse_malformed(self, conn, writer, exc):
        """Go's plain-text 400 with Connection: close, if a response can still be sent."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = b"%d Bad Request" % exc.error_status_hint
        try:
            writer.write(conn.send(h11.Response(
                status_code=exc.error_status_hint,
                headers=[(b"Content-Type", TEXT_TYPE), (b"Connection", b"close"),
                         (b"Content-Length", b"%d" % len(body))])) + body)
            await writer.drain()
        except h11.LocalProtocolError:
            return

    # -- routing ------------------------------------------------------------------

    def _route_table(self):
        """(method, path) -> handler, as Ollama registers them on gin."""
        table = {("GET", "/"): self._serve_root, ("HEAD", "/"): self._serve_root,
                 ("GET", "/api/version"): self._serve_version,
                 ("HEAD", "/api/version"): self._serve_version,
                 ("GET", "/api/tags"): self._serve_tags, ("HEAD", "/api/tags"): self._serve_tags,
                 ("GET", "/api/ps"): self._serve_ps, ("POST", "/api/show"): self._serve_show,
                 ("POST", "/api/pull"): self._serve_pull,
                 ("DELETE", "/api/delete"): self._serve_delete,
                 ("POST", "/api/copy"): self._serve_copy,
                 ("POST", "/api/create"): self._serve_create,
                 ("POST", "/api/push"): self._serve_push,
                 ("GET", "/v1/models"): self._serve_openai_models,
                 ("POST", "/_fake/config"): self._serve_config,
                 ("GET", "/_fake/config"): self._serve_config}
        for path in INFERENCE:
            table[("POST", path)] = self._serve_inference
        return table

    def _record(self, ex):
        self.requests.append({"method": ex.method, "path": ex.path, "headers": ex.headers,
                              "body": ex.decoded[0]})
        if len(self.requests) > MAX_RECORDED:
            del self.requests[:MAX_RECORDED // 10]

    def _serves(self, path):
        """False for a route newer than this fake's `version` (gin's 404 then)."""
        first = NEWER_ROUTES.get(path)
        return first is None or version_key(self.version) >= version_key(first)

    def _find_handler(self, ex):
        if self.server != "ollama":
            return self._persona_handler(ex)
        if not self._serves(ex.path):
            return None
        handler = self._routes.get((ex.method, ex.path))
        if handler is None and re.fullmatch(r"/v1/models/[^/]+", ex.path) and \
                ex.method == "GET":
            handler = self._serve_openai_model
        if handler is None and BLOB_PATH.fullmatch(ex.path) and ex.method in ("HEAD", "POST"):
            handler = self._serve_blob
        return handler

    def _known_path(self, path):
        return self._serves(path) and any(p == path for _, p in self._routes) or \
            re.fullmatch(r"/v1/models/[^/]+", path) is not None or \
            BLOB_PATH.fullmatch(path) is not None

    async def _dispatch(self, ex):
        self._record(ex)
        if self._guarded and not host_allowed(ex.headers.get("host", ""), self._hostname):
            return await ex.send(403, b"", None)
        handler = self._find_handler(ex)
        if handler is None and self.server != "ollama":
            return await self._persona_not_found(ex)
        if handler is None:
            if self._known_path(ex.path):
                return await ex.send(405, b"405 method not allowed", b"text/plain")
            return await ex.send(404, b"404 page not found", b"text/plain")
        try:
            await handler(ex)
        except Refusal as refusal:
            if ex.committed:
                raise HungUp() from None
            await ex.send_error(refusal.status, refusal.message)

    # -- catalogue routes ---------------------------------------------------------

    def _find(self, name):
        """The on-disk name for `name`, matched case-insensitively like Ollama; or None."""
        wanted = canonical(name).lower()
        for on_disk in self.models:
            if on_disk.lower() == wanted:
                return on_disk
        return None

    async def _serve_root(self, ex):
        await ex.send(200, b"Ollama is running", TEXT_TYPE)

    async def _serve_version(self, ex):
        await ex.send_json(200, {"version": self.version})

    async def _serve_tags(self, ex):
        models = sorted(self.models.values(), key=lambda m: -m.modified_ns)
        await ex.send_json(200, {"models": [tags_entry(m) for m in models]})

    async def _serve_ps(self, ex):
        entries = sorted(self.loaded.values(), reverse=True,
                         key=lambda e: datetime.datetime.fromisoformat(e["expires_at"]))
        await ex.send_json(200, {"models": entries})

    def _named_model(self, ex, go_type):
        """The on-disk model a show/delete body names: 400 without one, 404 if unknown."""
        body = read_body(ex, go_type)
        name = body.get("model") or body.get("name") or ""
        if not name:
            raise Refusal(400, "model is required")
        found = self._find(name)
        if found is None:
            raise Refusal(404, f"model '{name}' not found")
        return found

    async def _serve_show(self, ex):
        found = self._named_model(ex, "api.ShowRequest")
        await ex.send_json(200, show_entry(self.models[found], self.embedding_dim))

    async def _serve_delete(self, ex):
        found = self._named_model(ex, "api.DeleteRequest")
        del self.models[found]
        self._unload(found)
        await ex.send(200, b"", None)

    async def _serve_copy(self, ex):
        body = read_body(ex, "api.CopyRequest")
        source, destination = body.get("source") or "", body.get("destination") or ""
        if not source:
            raise Refusal(400, f"source {go_quote(source)} is invalid")
        if not destination:
            raise Refusal(400, f"destination {go_quote(destination)} is invalid")
        found = self._find(source)
        if found is None:
            raise Refusal(404, f"model {go_quote(source)} not found")
        copy = dataclasses.replace(self.models[found], name=canonical(destination),
                                   modified_ns=time.time_ns())
        self.models[copy.name] = copy
        await ex.send(200, b"", None)

    async def _serve_pull(self, ex):
        body = read_body(ex, "api.PullRequest")
        name = body.get("model") or body.get("name") or ""
        if not name:
            raise Refusal(400, "model is required")
        await self._send_progress(ex, body, self._pull_progress(canonical(name)),
                                  lambda: self._add_pulled(canonical(name)))

    async def _send_progress(self, ex, body, progress, on_success, error_status=500):
        """Progress lines as Ollama sends a pull's, push's or create's: NDJSON as they
        happen (stream absent or true), else the last line alone, an error with its
        status; `on_success` runs when the work is done."""
        if body.get("stream") is False:
            last = progress[-1]
            if "error" in last:
                raise Refusal(error_status, last["error"])
            on_success()
            return await ex.send_json(200, last)
        ex.open_stream(NDJSON_TYPE)
        for line in progress:
            if line.get("status") == "success":
                on_success()
            await ex.send_chunk(dumps(line) + b"\n")
            await asyncio.sleep(0)
        await ex.close_stream()

    def _pull_progress(self, name):
        """The lines `ollama pull` shows: manifest, each layer's bytes, verify, write, success."""
        if "doesnotexist" in name.lower():
            return [{"status": "pulling manifest"},
                    {"error": "pull model manifest: file does not exist"}]
        model = self.models.get(name) or describe_model(name)
        lines = [{"status": "pulling manifest"}]
        for layer, total in ((name, model.size), (name + ":template", 1429),
                             (name + ":params", 96)):
            digest = hashlib.sha256(layer.encode()).hexdigest()
            head = {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}",
                    "total": total}
            lines += [head] + [dict(head, completed=total * part // 2) for part in (1, 2)]
        return lines + [{"status": "verifying sha256 digest"}, {"status": "writing manifest"},
                        {"status": "success"}]

    def _add_pulled(self, name):
        found = self._find(name)
        self.models.pop(found, None)
        self.models[name] = describe_model(name)

    # -- blobs, create, push ------------------------------------------------------

    async def _serve_blob(self, ex):
        """HEAD: 200 if the blob is here, else 404. POST: the raw body, hashed as it
        arrives (never held), 201 if it matches its digest, 400 if not; 200 at once,
        its body unread, for a blob already here."""
        digest = ex.path[len("/api/blobs/"):]
        if not DIGEST.fullmatch(digest):
            raise Refusal(400, "invalid digest format")
        if ex.method == "HEAD" or digest in self.blobs:
            if digest not in self.blobs:
                raise Refusal(404, f"blob {go_quote(digest)} not found")
            return await ex.send(200, b"", None)
        sha, size = hashlib.sha256(), 0
        self.blob_received[digest] = 0
        while True:
            try:
                event = await self._next_event(ex.conn, ex.reader, ex.writer)
            except h11.RemoteProtocolError:
                raise HungUp() from None  # the upload broke off: nothing is kept
            if type(event) is h11.EndOfMessage:
                break
            if type(event) is not h11.Data:
                raise HungUp()
            sha.update(event.data)
            size += len(event.data)
            self.blob_received[digest] = size
        got = f"sha256:{sha.hexdigest()}"
        if got != digest:
            raise Refusal(400, f"digest mismatch, expected {go_quote(digest)}, got "
                               f"{go_quote(got)}")
        self.blobs[digest] = size
        await ex.send(201, b"", None)

    async def _serve_create(self, ex):
        body = read_body(ex, "api.CreateRequest")
        name = body.get("model") or body.get("name") or ""
        if not re.fullmatch(r"[A-Za-z0-9_][\w.\-]*(/[\w.\-]+)*(:[\w.\-]+)?", name):
            raise Refusal(400, "invalid model name")
        if not body.get("from") and body.get("files") is None:
            raise Refusal(400, "neither 'from' or 'files' was specified")
        quantize = body.get("quantize") or body.get("quantization")
        if quantize and quantize not in QUANTIZE_TYPES:
            raise Refusal(400, f"unsupported quantization type {quantize}")
        for field in ("files", "adapters"):
            for value in (body.get(field) or {}).values():
                if not isinstance(value, str):
                    raise Refusal(400, f"json: cannot unmarshal {json_kind(value)} into Go "
                                       f"struct field CreateRequest.{field} of type string")
        progress, size = self._create_progress(body, quantize)
        model = dataclasses.replace(describe_model(canonical(name)), size=size)
        await self._send_progress(ex, body, progress,
                                  lambda: self.models.update({model.name: model}))

    def _create_progress(self, body, quantize):
        """The lines `ollama create` shows, and the new model's size."""
        start, lines = body.get("from"), []
        if start:
            found = self._find(start)
            if found is None:  # Ollama tries the registry for it
                return [{"status": "pulling manifest"},
                        {"error": "pull model manifest: file does not exist"}], 0
            layers = [(self.models[found].digest, self.models[found].size)]
        else:
            layers = []
            for digest in list(body["files"].values()) + list((body.get("adapters") or {})
                                                              .values()):
                if digest not in self.blobs:
                    return [{"error": f"open {BLOBS_DIR}/{digest.replace(':', '-')}: no "
                                      f"such file or directory"}], 0
                layers.append((digest.split(":")[-1], self.blobs[digest]))
            lines.append({"status": "parsing GGUF"})
        size = sum(n for _, n in layers)
        if quantize:
            lines += [{"status": f"quantizing F16 model to {quantize.upper()}", "digest": "0",
                       "total": size, "completed": size * part // 2} for part in (1, 2)]
        lines += [{"status": f"using existing layer sha256:{d}"} for d, _ in layers]
        for field in ("template", "system", "parameters"):
            if body.get(field):
                digest = hashlib.sha256(dumps(body[field])).hexdigest()
                lines.append({"status": f"creating new layer sha256:{digest}"})
        return lines + [{"status": "writing manifest"}, {"status": "success"}], size

    async def _serve_push(self, ex):
        body = read_body(ex, "api.PushRequest")
        name = body.get("model") or body.get("name") or ""
        if not name:
            raise Refusal(400, "model is required")
        found = self._find(name)
        await self._send_progress(ex, body, self._push_progress(name, found),
                                  lambda: self.pushed.append(found))

    def _push_progress(self, name, found):
        """retrieving manifest, each layer's upload, pushing manifest, success; or the
        registry's refusal of a name outside the pusher's namespace."""
        lines = [{"status": "retrieving manifest"}]
        if found is None:
            path = canonical(name).replace(":", "/")
            return lines + [{"status": "couldn't retrieve manifest"},
                            {"error": f"open /root/.ollama/models/manifests/"
                                      f"registry.ollama.ai/library/{path}: no such file or "
                                      f"directory"}]
        if "/" not in found:
            return lines + [{"error": "you are not authorized to push to this namespace, "
                                      "create the model under a namespace you own"}]
        model = self.models[found]
        for digest, total in ((model.digest, model.size), (hashlib.sha256(
                found.encode()).hexdigest(), 1429)):
            head = {"status": "starting upload", "digest": f"sha256:{digest}", "total": total}
            lines += [head] + [{"status": f"pushing {digest[:12]}", "digest": head["digest"],
                                "total": total, "completed": total * part // 2}
                               for part in (1, 2)]
        return lines + [{"status": "pushing manifest"}, {"status": "success"}]

    # -- another server of OpenAI's API (server=...) ------------------------------------

    def _persona_handler(self, ex):
        routes, _ = PERSONA_ROUTES[self.server]
        if ex.method == "POST" and ex.path in PERSONA_INFERENCE:
            return self._serve_inference
        if ex.method == "GET" and ex.path == "/v1/models":
            return self._serve_openai_models
        if ex.path == "/_fake/config":
            return self._serve_config
        loads = PERSONA_LOADS.get(self.server, ())
        if ex.method == "POST" and ex.path in loads and (
                self.server == "lmstudio" or self.router_mode):
            return self._serve_persona_load
        if ex.path == "/models" and not self.router_mode:
            return None
        what = routes.get(ex.path) if ex.method == "GET" else None
        return (lambda ex: self._serve_persona(ex, what)) if what else None

    async def _persona_not_found(self, ex):
        _, other = PERSONA_ROUTES[self.server]
        if other == "unexpected":  # LM Studio: a 200 saying so (lmstudio-bug-tracker #618)
            return await ex.send_json(200, {"error": f"Unexpected endpoint or method. "
                                                     f"({ex.method} {ex.path})"})
        status, body = other
        if isinstance(body, str):
            return await ex.send(status, body.encode(), TEXT_TYPE)
        await ex.send_json(status, body)

    async def _serve_persona(self, ex, what):
        """The identity routes each server has (PERSONA_ROUTES)."""
        names = sorted(self.models)
        if what == "props" and self.router_mode:  # the router's own, no model's
            body = {"role": "router", "max_instances": 4, "models_autoload": True,
                    "model_alias": "llama-server", "model_path": "none",
                    "build_info": "b6097-fake"}
        elif what == "props":  # llama-server's /props (tools/server/README.md)
            body = {"default_generation_settings": {"n_ctx": DEFAULT_NUM_CTX},
                    "total_slots": self.num_parallel, "model_path": f"/models/{names[0]}.gguf"
                    if names else "", "build_info": "b6097-fake"}
        elif what == "router_models":  # each with its status (server-models.cpp)
            body = {"object": "list", "data": [
                {"id": self._persona_id(n), "object": "model", "owned_by": "llamacpp",
                 "created": 1760000000, "status": {
                     "value": "loaded" if n in self.loaded else "unloaded"}}
                for n in names]}
        elif what == "lmstudio_v1":  # LM Studio 0.4's list, with each loaded instance
            body = {"models": [
                {"type": "embedding" if is_embedding_name(n) else "llm",
                 "key": self._persona_id(n), "max_context_length": DEFAULT_NUM_CTX,
                 "loaded_instances": [{"id": self._persona_id(n), "config": {
                     "context_length": DEFAULT_NUM_CTX, "parallel": self.num_parallel}}]
                 if n in self.loaded else []} for n in names]}
        elif what == "health":
            body = {"status": "ok"}
        elif what == "slots":  # llama-server's /slots: one entry a slot (server-context.cpp)
            busy = min(self.active, self.num_parallel)
            return await ex.send_json(200, [
                {"id": i, "id_task": -1, "n_ctx": DEFAULT_NUM_CTX, "is_processing": i < busy}
                for i in range(self.num_parallel)])
        elif what == "lmstudio_models":
            body = {"object": "list", "data": [
                {"id": self._persona_id(n), "object": "model",
                 "type": "embeddings" if is_embedding_name(n)
                 else "llm", "state": "loaded" if n in self.loaded else "not-loaded",
                 "compatibility_type": "gguf", "quantization": "Q4_K_M",
                 "max_context_length": DEFAULT_NUM_CTX} for n in names]}
        elif what == "vllm_version":
            body = {"version": "0.11.0"}
        elif what == "vllm_metrics":  # Prometheus text, one engine (vllm/v1/metrics)
            served = self._persona_id(names[0]) if names else ""
            gauges = (("num_requests_running", float(self.active)),
                      ("num_requests_waiting", float(self.waiting)),
                      ("kv_cache_usage_perc", min(1.0, self.active / 10)))
            text = "".join(f'# TYPE vllm:{name} gauge\n'
                           f'vllm:{name}{{engine="0",model_name="{served}"}} {value}\n'
                           for name, value in gauges)
            return await ex.send(200, text.encode(), b"text/plain; version=0.0.4")
        else:
            body = {"openapi": "3.1.0", "info": {"title": "\U0001f999 llama.cpp Python API",
                                                  "version": "0.3.36"}}
        await ex.send_json(200, body)

    async def _serve_openai_models(self, ex):
        models = sorted(self.models.values(), key=lambda m: -m.modified_ns)
        entry = openai_model if self.server == "ollama" else self._persona_model
        await ex.send_json(200, {"object": "list", "data": [entry(m) for m in models]})

    @staticmethod
    def _persona_id(name):
        return name.removesuffix(":latest")  # no tags outside Ollama

    async def _serve_persona_load(self, ex):
        """A load or unload on request (PERSONA_LOADS): LM Studio names the model to
        load and the instance to unload (its id is the model's key); llama-server's
        router the model, for both."""
        body, _ = ex.decoded
        load_path, _ = PERSONA_LOADS[self.server]
        field = "instance_id" if self.server == "lmstudio" and ex.path != load_path \
            else "model"
        name = body.get(field) if isinstance(body, dict) else None
        model = self._find(name) if isinstance(name, str) else None
        if model is None:
            return await ex.send_json(404 if ex.path == load_path else 400, {
                "error": {"message": f"model {name!r} is not found"}})
        if ex.path == load_path:
            start = time.monotonic()
            await self._ensure_loaded(model, self._runner(model), None)
            if self.server == "lmstudio":
                return await ex.send_json(200, {
                    "type": "llm", "instance_id": name, "status": "loaded",
                    "load_time_seconds": round(time.monotonic() - start, 3)})
            return await ex.send_json(200, {"success": True})
        if model not in self.loaded:
            return await ex.send_json(400, {"error": {"message": "model is not running"}})
        self._unload(model)
        await ex.send_json(200, {"instance_id": name} if self.server == "lmstudio"
                           else {"success": True})

    def _persona_model(self, m):
        """A /v1/models entry as each server writes it (mlx_lm.server's has no owner)."""
        entry = {"id": self._persona_id(m.name), "object": "model"}
        extra = {"llama-server": {"owned_by": "llamacpp", "created": 1760000000},
                 "lmstudio": {"owned_by": "organization_owner"},
                 "vllm": {"owned_by": "vllm", "max_model_len": DEFAULT_NUM_CTX},
                 "llama-cpp-python": {"owned_by": "me", "permissions": []},
                 "mlx-lm": {"created": 1760000000}}
        return {**entry, **extra[self.server]}

    async def _serve_openai_model(self, ex):
        name = ex.path[len("/v1/models/"):]
        found = self._find(name)
        if found is None:
            raise Refusal(404, f"model '{name}' not found")
        await ex.send_json(200, openai_model(self.models[found], name))

    def state(self):
        """What GET /_fake/config answers: the settings and the counters."""
        return {"speed": self.speed, "saturation": self.saturation, "fault": self.fault,
                "completed": self.completed, "load_count": self.load_count,
                "evictions": self.evictions, "unloads": self.unloads}

    async def _serve_config(self, ex):
        """The test-only control route (not Ollama's): speed, saturation, fault; GET
        shows them with the counters a benchmark reads (answers, loads, evictions)."""
        if ex.method == "GET":
            return await ex.send_json(200, self.state())
        body, error = ex.decoded
        if error or not isinstance(body, dict):
            raise Refusal(400, "a JSON object of speed, saturation, fault")
        unknown = set(body) - {"speed", "saturation", "fault"}
        speed, saturation = body.get("speed", self.speed), body.get("saturation",
                                                                    self.saturation)
        if unknown or not is_number(speed) or speed <= 0 or body.get("fault",
                                                                     self.fault) not in FAULTS \
                or not (saturation is None or is_number(saturation) and saturation >= 1):
            raise Refusal(400, f"bad config {dumps(body).decode()}: speed > 0, "
                               f"saturation >= 1 or null, fault one of "
                               f"{sorted(f for f in FAULTS if f)} or null")
        self.speed, self.saturation = speed, saturation
        self.fault = body.get("fault", self.fault)
        await ex.send_json(200, {"speed": self.speed, "saturation": self.saturation,
                                 "fault": self.fault})

    # -- inference: reading the request -------------------------------------------

    async def _serve_inference(self, ex):
        kind = INFERENCE[ex.path]
        fault = self.fault
        if fault == "refuse":
            ex.hang_up()
            raise HungUp()
        if fault == "reset":
            ex.reset()
            raise HungUp()
        if fault == "stall":
            return await self._run_watched(ex, asyncio.Event().wait())
        ask = self._read_ask(ex, kind)
        if ask.control == "unload":
            self._unload(ask.model)
            return await ex.send_json(200, self._control_reply(ask))
        if self.fault == "http500":
            raise Refusal(500, RUNNER_DIED)
        if self.fault == "http503":
            raise Refusal(503, BUSY)
        await self._run_watched(ex, self._answer(ex, ask))

    def _read_ask(self, ex, kind):
        """Decode and check an inference request in Ollama's handler order."""
        body = read_body(ex, STRUCT_OF[kind])
        ask = Ask(kind=kind, name="", model="", arrived_ns=time.monotonic_ns(), body=body)
        if kind == "oa_chat" and not body.get("messages"):
            raise Refusal(400, "[] is too short - 'messages'")
        if kind == "an_messages":
            check_messages_request(body)
        if kind in ("embed", "oa_embed"):
            ask.inputs = self._read_inputs(body, kind)
        ask.name = body.get("model") or ""
        if not ask.name:
            raise Refusal(400, "model is required")
        top = body.get("top_logprobs")
        if isinstance(top, int) and not 0 <= top <= 20:
            raise Refusal(400, "top_logprobs must be between 0 and 20")
        ask.model = self._find(ask.name)
        if ask.model is None:
            raise Refusal(404, self._not_found(kind, ask.name))
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        ask.num_ctx = self._read_num_ctx(options)
        ask.keep_alive = read_keep_alive(body.get("keep_alive"))
        if kind in CHAT_KINDS or kind in ("generate", "oa_completion"):
            ask.words = prompt_words(kind, body)
        if kind in ("generate", "chat"):
            self._read_native_generation(body, ask)
        elif kind in ("oa_chat", "oa_completion"):
            self._read_openai_generation(body, ask)
        elif kind in ("oa_responses", "an_messages"):
            self._read_conversation(body, ask)
        elif kind == "oa_image":
            ask.prompt_tokens = max(1, count_tokens(body.get("prompt")))
        else:
            self._read_embedding(body, ask)
        if not ask.control or ask.control == "load":
            self._check_capabilities(body, ask)
        elif "completion" not in self.models[ask.model].capabilities:
            # An unload too needs a model that can generate (chat): Ollama refuses an
            # embedding model's with the 400 `"nomic-embed-text" does not support generate`.
            raise Refusal(400, f"{go_quote(ask.name)} does not support "
                               f"{'chat' if kind in CHAT_KINDS else 'generate'}")
        return ask

    @staticmethod
    def _not_found(kind, name):
        if kind in ("embed", "embeddings", "oa_embed"):
            return f'model "{name}" not found, try pulling it first'
        return f"model '{name}' not found"

    @staticmethod
    def _read_num_ctx(options):
        value = options.get("num_ctx")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return int(value)
        return None

    @staticmethod
    def _read_inputs(body, kind):
        """/api/embed's input: a string or a list of strings ("" is nothing on /api/embed,
        one empty text on /v1)."""
        value = body.get("input")
        if kind == "oa_embed" and (value is None or value == []):
            raise Refusal(400, "invalid input")
        if isinstance(value, str):
            return [value] if value or kind == "oa_embed" else []
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise Refusal(400, "invalid input type")
        return value

    def _limit(self, ask, limit):
        """Tokens to generate: `chunks`, or a length drawn from `vary_tokens` (where the
        model would stop by itself); fewer when num_predict / max_tokens says so."""
        ask.tokens = drawn_length(ask.words, *self.vary_tokens) if self.vary_tokens \
            else self.chunks
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < ask.tokens:
            ask.tokens, ask.reason = limit, "length"

    def _read_native_generation(self, body, ask):
        ask.stream = body.get("stream") is not False
        if ask.kind == "generate":
            if body.get("raw") and (body.get("template") or body.get("system") or
                                    body.get("context")):
                raise Refusal(400, "raw mode does not support template, system, or context")
            ask.raw = bool(body.get("raw"))
            empty = not body.get("prompt")
            ask.prompt_tokens = 10 + count_tokens(body.get("prompt")) + \
                count_tokens(body.get("system"))
        else:
            messages = body.get("messages") or []
            empty = not messages
            ask.prompt_tokens = 10 + sum(4 + count_tokens(message_text(m)) for m in messages)
        if empty:
            ask.control = "unload" if ask.keep_alive == 0 else "load"
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        self._limit(ask, options.get("num_predict"))

    def _read_openai_generation(self, body, ask):
        ask.stream = body.get("stream") is True
        options = body.get("stream_options") if isinstance(body.get("stream_options"),
                                                           dict) else {}
        ask.include_usage = ask.stream and options.get("include_usage") is True
        if ask.kind == "oa_chat":
            ask.prompt_tokens = 10 + sum(4 + count_tokens(message_text(m))
                                         for m in body["messages"])
            ask.tool_call = tool_call_for(body, body["messages"])
        else:
            ask.prompt_tokens = 10 + count_tokens(body.get("prompt"))
        self._limit(ask, body.get("max_tokens"))
        if ask.tool_call:
            ask.tokens = 1  # the call, in two events: its name, then its arguments

    def _read_conversation(self, body, ask):
        """/v1/messages and /v1/responses: stream only when asked; a tool named by the
        user's last message is called instead of answering."""
        ask.stream = body.get("stream") is True
        messages = conversation(ask.kind, body)
        ask.prompt_tokens = 10 + sum(4 + count_tokens(message_text(m)) for m in messages)
        ask.tool_call = tool_call_for(body, messages)
        self._limit(ask, body.get("max_tokens" if ask.kind == "an_messages"
                                  else "max_output_tokens"))
        if ask.tool_call:
            ask.tokens = 1      # the call comes whole, as one chunk, as Ollama sends it

    def _read_embedding(self, body, ask):
        if ask.kind == "embeddings":
            prompt = body.get("prompt") or ""
            ask.inputs = [prompt] if prompt else []
        if ask.kind == "oa_embed":
            encoding = body.get("encoding_format") or "float"
            if encoding not in ("float", "base64"):
                raise Refusal(400, f"invalid encoding format: {go_quote(encoding)}. "
                                   "Supported formats are 'float' and 'base64'")
            ask.base64 = encoding == "base64"
        dimensions = body.get("dimensions")
        ask.dimensions = dimensions if isinstance(dimensions, int) and dimensions > 0 else 0
        ask.prompt_tokens = sum(max(1, count_tokens(text)) for text in ask.inputs)
        if not ask.inputs:
            ask.control = "load"

    def _check_capabilities(self, body, ask):
        """Ollama's 400s for a model that cannot do what is asked."""
        caps = self.models[ask.model].capabilities
        quoted = go_quote(ask.name)
        if ask.kind == "oa_image" and "image" not in caps:
            raise Refusal(400, f"{quoted} does not support image generation")
        if ask.kind == "generate" and "image" in caps:
            ask.kind = "image_generate"  # an image model draws what /api/generate asks
        elif ask.kind in ("generate", "oa_completion") and "completion" not in caps:
            raise Refusal(400, f"{quoted} does not support generate")
        if ask.kind in CHAT_KINDS and "completion" not in caps:
            raise Refusal(400, f"{quoted} does not support chat")
        if body.get("think") not in (None, False) and "thinking" not in caps:
            raise Refusal(400, f"{quoted} does not support thinking")
        if ask.kind in CHAT_KINDS and body.get("tools") and "tools" not in caps:
            raise Refusal(400, f"{quoted} does not support tools")

    # -- inference: scheduling on a runner ----------------------------------------

    async def _run_watched(self, ex, work):
        """Run an inference answer, cancelling it as soon as the client hangs up."""
        answer = asyncio.create_task(work, name=f"fake-ollama answer {ex.path}")
        watch = asyncio.create_task(ex.wait_for_hangup(), name=f"fake-ollama watch {ex.path}")
        try:
            await asyncio.wait((answer, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone = not answer.done()
            answer.cancel()
            watch.cancel()
            await asyncio.wait((answer, watch))
        if gone:
            self.cancelled += 1
            raise HungUp()
        try:
            return answer.result()
        except ConnectionError:     # a write found the socket closed: the client left too
            self.cancelled += 1
            raise HungUp() from None

    def _runner(self, model):
        runner = self._runners.get(model)
        if runner is None:
            runner = self._runners[model] = Runner(self.num_parallel)
        return runner

    async def _answer(self, ex, ask):
        """Load if needed, wait for a slot (FIFO), evaluate the prompt, then answer."""
        runner = self._runner(ask.model)
        info = self.loaded.get(ask.model)
        # Ollama's GetRunner: a runner that is loaded and needs no reload is used at
        # once; any other request joins the pending queue, which the scheduler takes
        # in order, so it waits behind a load that waits for room.
        fast = info is not None and runner.load_task is None and \
            ask.num_ctx in (None, info["context_length"])
        if not fast and not self._room_open.is_set():
            await self._room_open.wait()
        turn = Turn(self, ask.model, runner, ask.keep_alive)
        try:
            self.waiting += 1
            try:
                await self._ensure_loaded(ask.model, turn.runner, ask.num_ctx)
                ask.loaded_ns = time.monotonic_ns()
                if ask.control != "load":
                    await turn.take_slot()
            finally:
                self.waiting -= 1
            if ask.control == "load":
                turn.end()
                return await ex.send_json(200, self._control_reply(ask))
            if ask.kind == "oa_image":
                return await self._reply_image(ex, turn)
            if ask.kind == "image_generate":
                return await self._reply_generated_image(ex, ask, turn)
            if ask.kind in ("embed", "embeddings", "oa_embed"):
                return await self._reply_embedding(ex, ask, turn)
            await self._evaluate_prompt(ask, turn.runner)
            if ask.stream:
                await self._reply_stream(ex, ask, turn)
            else:
                await self._reply_whole(ex, ask, turn)
        finally:
            turn.end()

    async def _finish(self, turn, last_write):
        """Free the slot and count the answer, then send its last bytes: the runner is
        done before the final chunk leaves (as in Ollama), and a client holding the whole
        answer never sees stale counters."""
        turn.end()
        self.completed += 1
        try:
            await last_write
        except (ConnectionError, asyncio.CancelledError):
            self.completed -= 1     # never arrived: counted as cancelled instead
            raise

    async def _ensure_loaded(self, model, runner, num_ctx):
        """Wait for the model to be loaded with this num_ctx; one load at a time."""
        while True:
            if runner.load_task is not None:
                await asyncio.shield(runner.load_task)
                continue
            info = self.loaded.get(model)
            if info is not None and num_ctx in (None, info["context_length"]):
                return
            runner.load_task = self._spawn(self._load(model, runner, num_ctx or DEFAULT_NUM_CTX),
                                           f"fake-ollama load {model}")

    async def _load(self, model, runner, num_ctx):
        """A (re)load: a reload waits until the runner's requests are done, as Ollama's
        scheduler does; a new runner first makes room (max_loaded). The load itself
        outlives a client that goes away."""
        try:
            if model in self.loaded:
                await runner.slots.wait_idle()
                self._drop(model)
            else:
                await self._make_room(model)
            self._loading.add(model)
            disk = self.models.get(model) or describe_model(model)
            delay = self.load_delay + self.load_per_gb * disk.size / 1e9
            if delay:
                await asyncio.sleep(delay)
            size = loaded_size(disk, num_ctx, self.num_parallel)
            self.load_count += 1
            self.loaded[model] = {
                "name": model, "model": model, "size": size, "size_vram": size,
                "digest": disk.digest, "details": model_details(disk),
                "expires_at": expiry_time(runner.keep_alive), "context_length": num_ctx}
        finally:
            runner.load_task = None
            self._loading.discard(model)
            self._wake_room_waiters()

    # -- inference: room for runners (OLLAMA_MAX_LOADED_MODELS) --------------------
    #
    # When a new runner would go past the limit, Ollama's scheduler unloads an idle
    # runner: not the least recently used, but the first in ByDurationAndName order
    # (sched.go): the shortest session duration (the keep_alive its latest request set;
    # a negative one, "forever", sorts last as a uint64), then the model's file path (a
    # blob named by its digest). When every runner is busy it waits for one to go idle,
    # and the requests behind that load wait with it (it takes pending requests in order).

    def _occupants(self, model):
        """Runners loaded, or loading past their wait for room, besides `model`'s own (two
        loads waiting for room must not wait for each other)."""
        return (set(self.loaded) | self._loading) - {model}

    def _idle_victim(self, model):
        """The loaded runner nobody is using that Ollama unloads first, or None."""
        idle = [m for m in self._occupants(model) if m not in self._loading
                and not self._runners[m].users and self._runners[m].load_task is None]
        return min(idle, key=lambda m: (self._runners[m].keep_alive, self._blob_path(m)),
                   default=None)

    def _blob_path(self, model):
        disk = self.models.get(model) or describe_model(model)
        return "blobs/sha256-" + disk.digest.removeprefix("sha256:")

    async def _make_room(self, model):
        while self.max_loaded and len(self._occupants(model)) >= self.max_loaded:
            victim = self._idle_victim(model)
            if victim is not None:
                self._runners[victim].stop_timer()
                self._drop(victim)
                self.evictions += 1
                continue
            released = asyncio.get_running_loop().create_future()
            self._released.append(released)
            self._room_waits += 1
            self._room_open.clear()
            try:
                await released
            finally:
                self._room_waits -= 1
                if not self._room_waits:
                    self._room_open.set()

    def _wake_room_waiters(self):
        """A runner went idle or away: the loads waiting for room look again."""
        for released in self._released:
            if not released.done():
                released.set_result(None)
        self._released.clear()

    def _drop(self, model):
        """The runner is unloaded: gone from /api/ps, its KV caches with it."""
        self.loaded.pop(model, None)
        runner = self._runners.get(model)
        if runner is not None:
            runner.forget_prompts()
        self._wake_room_waiters()

    def on_runner_released(self, model, runner):
        """Start the keep-alive clock when the runner goes idle (0 unloads at once)."""
        if runner.users or model not in self.loaded:
            return
        self._wake_room_waiters()
        if runner.keep_alive == 0:
            return self._unload(model)
        self.loaded[model]["expires_at"] = expiry_time(runner.keep_alive)
        if runner.keep_alive != math.inf:
            runner.timer = asyncio.get_running_loop().call_later(
                runner.keep_alive, self._expire, model, runner)

    def _expire(self, model, runner):
        runner.timer = None
        if not runner.users and runner.load_task is None:
            self._drop(model)

    def _unload(self, model):
        """keep_alive 0: unload now, or when the requests still running on it finish."""
        runner = self._runners.get(model)
        if runner is not None and runner.users:
            runner.keep_alive = 0
            return
        if runner is not None:
            runner.stop_timer()
        self.unloads += model in self.loaded
        self._drop(model)

    def _control_reply(self, ask):
        """The single JSON object for a load or unload (even when streaming was asked)."""
        if ask.kind == "embed":
            return {"model": ask.name, "embeddings": []}
        if ask.kind == "embeddings":
            return {"embedding": []}
        reply = {"model": ask.name, "created_at": self._clock.now().decode()}
        if ask.kind == "chat":
            reply["message"] = {"role": "assistant", "content": ""}
        else:
            reply["response"] = ""
        reply.update(done=True, done_reason=ask.control)
        return reply

    # -- inference: producing the answer ------------------------------------------

    def _format(self, ask):
        if ask.kind in ("generate", "chat"):
            return NativeAnswer(ask, self._clock)
        if ask.kind == "an_messages":
            return AnthropicAnswer(ask)
        if ask.kind == "oa_responses":
            return ResponsesAnswer(ask, ask.body)
        self._answers += 1
        return OpenAIAnswer(ask, self._answers % 999, self.server)

    @staticmethod
    def _metrics(ask):
        """Ollama's final-chunk metrics (ns), from the times really spent: load_duration
        until the runner was ready (a wait for a slot is in total_duration only, as in
        Ollama, whose runner takes the slot after that checkpoint), the prompt's
        evaluation, the decoding. Zero values are omitted, as Go's omitempty does."""
        now = time.monotonic_ns()
        metrics = {"total_duration": max(1, now - ask.arrived_ns),
                   "load_duration": max(1, (ask.loaded_ns or now) - ask.arrived_ns),
                   "prompt_eval_count": ask.prompt_tokens,
                   "prompt_eval_duration": max(1, ask.prompt_ns),
                   "eval_count": ask.tokens,
                   "eval_duration": max(1, now - (ask.decode_ns or now))}
        return {k: v for k, v in metrics.items() if v}

    def _token_delay(self):
        """chunk_delay at this node's speed, stretched when more requests decode at once
        than `saturation`: tokens/s of the node grow up to it and stay flat beyond."""
        crowd = max(1.0, self.generating / self.saturation) if self.saturation else 1.0
        return self.chunk_delay * crowd / self.speed

    async def _evaluate_prompt(self, ask, runner):
        """prompt_delay per prompt token no slot's cache holds (Ollama reuses a slot's KV
        cache for a shared prefix), at this node's speed; the slot then holds this prompt
        and the answer about to be written."""
        started = time.monotonic_ns()
        words = ask.words or []
        fresh = len(words) - runner.cached_prefix(words)
        runner.prompts.append(words + answer_words(ask.kind, ask.tokens))
        if self.prompt_delay and fresh:
            await asyncio.sleep(self.prompt_delay * fresh / self.speed)
        ask.prompt_ns = time.monotonic_ns() - started

    async def _decode(self, ask, emit=None):
        """Produce the answer's tokens at the contention model's pace (recomputed for
        each token, as other requests start and end), each handed to `emit(i)` if given.
        False when a mid-stream fault stops a streamed answer first."""
        ask.decode_ns = time.monotonic_ns()
        self.generating += 1
        try:
            for i in range(ask.tokens):
                if emit and self.fault in MID_STREAM_FAULTS and i >= self.die_after:
                    return False
                delay = self._token_delay()
                if delay:
                    await asyncio.sleep(delay)
                elif i % YIELD_EVERY == YIELD_EVERY - 1:
                    await asyncio.sleep(0)
                if emit:
                    await emit(i)
            return True
        finally:
            self.generating -= 1

    async def _reply_stream(self, ex, ask, turn):
        answer = self._format(ask)
        ex.open_stream(answer.stream_type)
        whole = await self._decode(ask, lambda i: ex.send_chunk(answer.token(i)))
        if not whole or self.fault in MID_STREAM_FAULTS:  # die_after >= tokens: before
            return await self._strike(ex, answer, turn)   # the final chunk
        closing = answer.closing(self._metrics(ask))
        await self._finish(turn, self._send_closing(ex, closing))

    async def _send_closing(self, ex, chunks):
        for chunk in chunks:
            await ex.send_chunk(chunk)
        if self.fault == "hold_end":  # the last event is out, the body's end never comes:
            await asyncio.Event().wait()  # the client may leave first (a cancel, here)
        await ex.close_stream()

    async def _strike(self, ex, answer, turn):
        """A mid-stream fault: hang up, hang, or end with Ollama's error line."""
        fault = self.fault
        if fault == "stall_mid_stream":
            await asyncio.Event().wait()
        turn.end()
        if fault == "die_mid_stream":
            ex.hang_up()
            raise HungUp()
        tail = answer.error_tail(MID_STREAM_ERROR)
        if tail:
            await ex.send_chunk(tail)
        await ex.close_stream()

    async def _reply_whole(self, ex, ask, turn):
        await self._decode(ask)     # generating takes as long when not streamed
        body = dumps(self._format(ask).whole(self._metrics(ask)))
        await self._send_whole(ex, turn, body)

    async def _send_whole(self, ex, turn, body):
        """One JSON answer, or the fault that strikes it instead."""
        fault = self.fault
        if fault == "stall_mid_stream":
            await asyncio.Event().wait()
        if fault == "die_mid_stream":
            turn.end()
            await ex.send_truncated(body)
            raise HungUp()
        if fault == "error_line":
            raise Refusal(500, MID_STREAM_ERROR)
        await self._finish(turn, ex.send(200, body, JSON_TYPE))

    async def _reply_image(self, ex, turn):
        """An image model's answer: one picture (a 1x1 PNG), base64, OpenAI's shape."""
        if self.chunk_delay:
            await asyncio.sleep(self.chunk_delay / self.speed)
        await self._send_whole(ex, turn, dumps({"created": int(time.time()),
                                                "data": [{"b64_json": TINY_PNG}]}))

    async def _reply_generated_image(self, ex, ask, turn):
        """An image model asked on /api/generate: progress lines while it draws (when
        streamed), then the final chunk with the picture, base64, in "image"."""
        if self.chunk_delay:
            await asyncio.sleep(self.chunk_delay / self.speed)
        final = {"model": ask.name, "created_at": self._clock.now().decode(), "response": "",
                 "done": True, "done_reason": "stop", "image": TINY_PNG}
        if not ask.stream:
            return await self._send_whole(ex, turn, dumps(final))
        ex.open_stream(NDJSON_TYPE)
        await ex.send_chunk(dumps({"model": ask.name, "created_at": self._clock.now().decode(),
                                   "response": "", "done": False, "completed": 1,
                                   "total": 1}) + b"\n")
        await self._finish(turn, self._send_closing(ex, [dumps(final) + b"\n"]))

    async def _reply_embedding(self, ex, ask, turn):
        if self.chunk_delay:
            await asyncio.sleep(self.chunk_delay / self.speed)
        vectors = [embedding(text, self.embedding_dim) for text in ask.inputs]
        if ask.kind == "embeddings":     # legacy: float64 of float32, not normalised
            return await self._send_whole(ex, turn, dumps(
                {"embedding": [widened_float32(v) for v in vectors[0]]}))
        if ask.dimensions and ask.dimensions < self.embedding_dim:
            vectors = [v[:ask.dimensions] for v in vectors]
        vectors = [[as_float32(x) for x in normalised(v)] for v in vectors]
        ask.tokens = 0
        metrics = self._metrics(ask)
        if ask.kind == "embed":
            reply = {"model": ask.name, "embeddings": vectors,
                     "total_duration": metrics["total_duration"],
                     "load_duration": metrics["load_duration"],
                     "prompt_eval_count": ask.prompt_tokens}
        else:
            reply = {"object": "list", "data": [
                {"object": "embedding", "index": i, "embedding": self._encode(v, ask.base64)}
                for i, v in enumerate(vectors)], "model": ask.name,
                "usage": {"prompt_tokens": ask.prompt_tokens,
                          "total_tokens": ask.prompt_tokens}}
        await self._send_whole(ex, turn, dumps(reply))

    @staticmethod
    def _encode(vector, as_base64):
        if not as_base64:
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


####################################################################################
# Command line
####################################################################################


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="A fake Ollama server for tests, demos "
                                                 "and benchmarks.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=11434, help="port (0 picks a free one)")
    parser.add_argument("--models", default="",
                        help=f"comma list of model names (default: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--num-parallel", type=int, default=None,
                        help="slots per loaded model (default: $OLLAMA_NUM_PARALLEL or 1)")
    parser.add_argument("--chunks", type=int, default=5, help="tokens per answer")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--load-delay", type=float, default=0.0, help="seconds per model load")
    parser.add_argument("--load-per-gb", type=float, default=0.0,
                        help="and seconds per GB of the model's weights on top")
    parser.add_argument("--speed", type=float, default=1.0,
                        help="this machine's speed: each token takes chunk-delay / speed")
    parser.add_argument("--saturation", type=int, default=None,
                        help="requests decoding at once beyond which the node's tokens/s "
                             "stays flat (default: no contention)")
    parser.add_argument("--max-loaded", type=int, default=None,
                        help="models loaded at once, like OLLAMA_MAX_LOADED_MODELS "
                             "(default: no limit)")
    parser.add_argument("--prompt-delay", type=float, default=0.0,
                        help="seconds per prompt token no slot's cache holds")
    parser.add_argument("--server", default="ollama",
                        choices=("ollama", *PERSONA_ROUTES),
                        help="the kind of server to stand in for (default: Ollama)")
    parser.add_argument("--tokens-range", default="", metavar="LO,HI",
                        help="answer lengths drawn per prompt between LO and HI when the "
                             "client sets no limit (default: always --chunks)")
    args = parser.parse_args(argv)
    if args.speed <= 0 or (args.saturation or 1) < 1 or (args.max_loaded or 1) < 1:
        parser.error("--speed must be above 0, --saturation and --max-loaded at least 1")
    args.vary_tokens = parse_tokens_range(parser, args.tokens_range)
    if args.num_parallel is None:
        env = os.environ.get("OLLAMA_NUM_PARALLEL", "").strip() or "1"
        if not env.isdigit() or int(env) < 1:
            parser.error(f"OLLAMA_NUM_PARALLEL must be a positive integer, not {env!r}")
        args.num_parallel = int(env)
    return args


def parse_tokens_range(parser, text):
    """--tokens-range LO,HI as a (lo, hi) pair; None when not given."""
    if not text:
        return None
    lo, _, hi = text.partition(",")
    if not (lo.strip().isdigit() and hi.strip().isdigit() and 0 < int(lo) <= int(hi)):
        parser.error(f"--tokens-range wants LO,HI with 0 < LO <= HI, not {text!r}")
    return int(lo), int(hi)


async def serve(args):
    """Run until SIGINT or SIGTERM."""
    models = [m for m in args.models.split(",") if m.strip()] or None
    fake = FakeOllama(models, num_parallel=args.num_parallel, chunks=args.chunks,
                      chunk_delay=args.chunk_delay, load_delay=args.load_delay,
                      speed=args.speed, saturation=args.saturation,
                      max_loaded=args.max_loaded, prompt_delay=args.prompt_delay,
                      vary_tokens=args.vary_tokens, load_per_gb=args.load_per_gb,
                      server=args.server)
    port = await fake.start(args.host, args.port)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"fake ollama listening on http://{host}:{port}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await fake.stop()


def main(argv=None):
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
