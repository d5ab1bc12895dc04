"""The ``swapper`` command line: ``serve``, ``check-config``, and ``status``, ``load``,
``unload`` and ``logs`` for a running swapper."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from swapper.backends.registry import BackendRegistry, load_backends
from swapper.config import Config, load_config, protected_mode_refusal
from swapper.errors import ConfigError, SwapperError
from swapper.http.logs import setup_logging
from swapper.operator_cli import add_commands as add_operator_commands

__all__ = ["main"]

DEFAULT_CONFIG = "config/swapper_config.yaml"
EXIT_CONFIG_ERROR = 2

logger = logging.getLogger("swapper")


def _default_config() -> str:
    return os.environ.get("SWAPPER_CONFIG") or DEFAULT_CONFIG


def _setup_logging(fmt: str = "text") -> None:
    setup_logging(os.environ.get("SWAPPER_LOG_LEVEL", "INFO"), fmt)


def _load(path: str) -> tuple[Config, BackendRegistry]:
    registry = load_backends()
    return load_config(path, registry.schemas()), registry


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from swapper.http.app import begin_shutdown, create_app
    from swapper.http.lean import LeanRoute
    from swapper.http.serving import guarded_protocol, raise_nofile_limit

    config, registry = _load(args.config)  # first: the log format comes from the config
    host = args.host or config.server.host
    if (refusal := protected_mode_refusal(config, host)) is not None:
        raise ConfigError(refusal)  # main() prints the one line and exits with status 2
    _setup_logging(config.server.log_format)
    logger.info("Initializing Swapper Service...")
    logger.info("Loaded %d models into Swapper", len(config.models))
    port = args.port if args.port is not None else config.server.port
    app = create_app(config, registry)
    open_files = raise_nofile_limit()
    logger.info("Open-files limit: %d", open_files)

    class Server(uvicorn.Server):
        """uvicorn, ending swapper's event and log streams as soon as shutdown begins."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            begin_shutdown(app)
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="uvloop",
            # httptools under swapper's limits: a head deadline and size cap, a connection cap;
            # plain forwarded requests answered beneath ASGI by the lean route.
            http=guarded_protocol(config.server, LeanRoute(app, config.server)),
            # The client is the socket's peer: no X-Forwarded-For taken on trust (any local
            # process could claim any address), the same on the lean route and in ASGI.
            proxy_headers=False,
            # typed int, but only ever handed to loop.call_later, where a float is fine
            timeout_keep_alive=config.server.keepalive_timeout,  # type: ignore[arg-type]
            lifespan="on",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=config.swapper.shutdown_timeout,  # type: ignore[arg-type]
        )
    )
    server.run()
    return 0 if server.started else 1


def _plugins(args: argparse.Namespace) -> int:
    registry = load_backends()
    for name in sorted(registry.backends):
        print(f"{name}\t{registry.sources[name]}")
    for name, error in sorted(registry.failures.items()):
        print(f"{name}\tFAILED: {error}", file=sys.stderr)
    return 1 if registry.failures else 0


def _check_config(args: argparse.Namespace) -> int:
    config, _ = _load(args.path)
    print(f"{args.path}: ok ({len(config.models)} models)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``swapper`` command."""
    parser = argparse.ArgumentParser(prog="swapper", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument(
        "--config",
        default=_default_config(),
        help="config file (default: $SWAPPER_CONFIG, else %(default)s)",
    )
    serve.add_argument("--host", help="listen address (default: server.host)")
    serve.add_argument("--port", type=int, help="listen port (default: server.port)")
    serve.set_defaults(run=_serve)

    plugins = commands.add_parser("plugins", help="list the backend kinds found, and from where")
    plugins.set_defaults(run=_plugins)

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("path")
    check.set_defaults(run=_check_config)

    add_operator_commands(commands)  # status, load, unload, logs: against a running swapper

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")  # plain `swapper` / `python -m swapper` serves
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except SwapperError as exc:
        print(exc.message, file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
