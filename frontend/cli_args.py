"""Command-line flags of the server, named after `vllm serve`'s.

Engine flags fill EngineArgs; their --help is the docstring of the same-named field of the engine
config (ipc/config.py), so the two never drift apart. Server flags fill ServerConfig, whose field
docstrings are their --help in the same way.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import textwrap
from dataclasses import dataclass, field
from functools import cache

from frontend.engine_args import EngineArgs
from ipc import envs
from ipc.config import (ATTENTION_BACKENDS, DTYPES, CacheConfig, ModelConfig, ParallelConfig,
                        SchedulerConfig, WorkerConfig)


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP side of the server (EngineArgs holds the engine's side)."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 for every interface)."""
    port: int = 8000
    """TCP port to listen on."""
    served_model_name: list[str] | None = None
    """Model name(s) the API answers to; the first is reported in responses. Default: --model (or
    the bundled model's name)."""
    api_key: str | None = field(default=None, repr=False)
    """Require `Authorization: Bearer <key>` on /v1/* (default: $PAGEDSERVE_API_KEY, else none)."""
    chat_template: str | None = None
    """Chat template for /v1/chat/completions: a file path or the Jinja template itself (default:
    the tokenizer's)."""
    max_queued_requests: int | None = None
    """Answer 503 when this many requests already wait for their first token (default: no limit)."""
    shutdown_timeout: float = 30.0
    """On SIGTERM / Ctrl-C, seconds to let in-flight requests finish before stopping the engine."""
    model: str | None = None
    """The --model flag as given (the default served model name)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be non-negative, got {self.max_queued_requests}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be non-negative, got {self.shutdown_timeout}")
        if self.api_key is None and envs.api_key():
            object.__setattr__(self, "api_key", envs.api_key())
        if self.chat_template is not None:
            object.__setattr__(self, "chat_template", load_chat_template(self.chat_template))

    def model_names(self) -> list[str]:
        if self.served_model_name:
            return list(self.served_model_name)
        if self.model is not None:
            return [self.model]
        from frontend.default_model import DEFAULT_MODEL_NAME
        return [DEFAULT_MODEL_NAME]


def load_chat_template(value: str) -> str:
    """--chat-template: a readable file's contents, or the value itself if it looks like Jinja."""
    if os.path.isfile(value):
        with open(value) as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"chat_template {value!r} is neither a readable file nor a Jinja template")


@cache
def field_docs() -> dict[str, str]:
    """Field name -> its attribute docstring, over the engine configs and ServerConfig."""
    docs: dict[str, str] = {}
    for cls in (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig, WorkerConfig, ServerConfig):
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)):
                docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help already says what the default is, or it is None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


# Engine flags whose --help or choices are not just their config docstring.
_ENGINE_FLAGS = {
    "model": dict(help="Model directory, or a name the loader resolves. Default: the bundled "
                       "SmolLM2-135M-Instruct."),
    "tokenizer": dict(help="Tokenizer directory (default: the model's)."),
    "dtype": dict(choices=DTYPES + ("half", "float"),
                  help="Weights and activations dtype; auto: the checkpoint's on GPU, float32 on CPU."),
    "max_model_len": dict(extra=" Default: the model's max_position_embeddings."),
    "max_num_batched_tokens": dict(extra=" Default: max(8192, --max-num-seqs)."),
    "tensor_parallel_size": dict(aliases=["-tp"]),
    "attention_backend": dict(choices=ATTENTION_BACKENDS),
    "load_format": dict(choices=("auto", "dummy")),
    "device": dict(choices=("auto", "cuda", "cpu"), help="Where the model runs; auto: cuda if available."),
    "ipc_dir": dict(help="Directory (made 0700) of the engine's ipc:// sockets, for embedded "
                         "ipc.client.EngineClient users. Default: a new private temporary directory."),
    "enforce_eager": dict(help="Never use CUDA graphs (decode steps run eagerly)."),
}


def _add_engine_flags(group, doc: dict[str, str]) -> None:
    """One flag per EngineArgs field (new fields get a flag without touching this file)."""
    for f in dataclasses.fields(EngineArgs):
        spec = dict(_ENGINE_FLAGS.get(f.name, {}))
        aliases = spec.pop("aliases", [])
        help_text = spec.pop("help", doc.get(f.name, "")) + spec.pop("extra", "")
        kwargs = {"default": f.default, "help": help_text, **spec}
        annotation = str(f.type)
        if annotation == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "choices" not in kwargs:
            kwargs["type"] = int if "int" in annotation else float if "float" in annotation else str
        group.add_argument(f"--{f.name.replace('_', '-')}", *aliases, **kwargs)


def make_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/launch.sh", formatter_class=_HelpFormatter,
        description="pagedserve: an OpenAI-compatible server (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /health, /metrics, /tokenize, /detokenize, /version).")
    doc = field_docs()
    _add_engine_flags(p.add_argument_group("engine"), doc)
    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help=doc["host"])
    server.add_argument("--port", type=int, default=8000, help=doc["port"])
    server.add_argument("--served-model-name", nargs="+", default=None, help=doc["served_model_name"])
    server.add_argument("--api-key", default=None, help=doc["api_key"])
    server.add_argument("--chat-template", default=None, help=doc["chat_template"])
    server.add_argument("--max-queued-requests", type=int, default=None, help=doc["max_queued_requests"])
    server.add_argument("--shutdown-timeout", type=float, default=30.0, help=doc["shutdown_timeout"])
    return p
