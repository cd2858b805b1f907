"""``yolo-ts-serve`` (``python -m tools.serve``): start TorchServe for a model store and return only
when the model answers, or fail with the worker's own error.

    yolo-ts-serve                                   # model_store/yolo.mar with ./config.properties
    yolo-ts-serve --model-store model_store --model yolo --ts-config config.properties --workdir .
    yolo-ts-serve --stop                            # stop the server started from --workdir

What it does that a bare ``torchserve --start`` does not:

* it refuses ports that are already in use *before* TorchServe starts (a second ``torchserve --start``
  in the same directory fails on the busy port, but only after rewriting ``key_file.json``, which then
  locks every client out of the server that is still running);
* it gives the server its own ``TMPDIR`` (PID file) and ``TEMP`` (the worker's Unix socket), under
  ``WORKDIR/tmp``, so two servers started from two directories never collide;
* it waits until a worker is READY (the management API; ``/ping`` answers before the model loads), and
  when the model cannot load (a bad ``model-config.yaml`` setting or a broken archive, which the worker
  answers with a 503 to every request; or a worker that dies while loading) it stops the server and exits 1
  with the worker's error;
* it never writes the config it is given (``--ts-config``, default ``./config.properties``, a file git
  tracks in this repository): TorchServe starts with the launcher's own merged copy,
  ``WORKDIR/tmp/yolo-ts-serve.properties`` (printed at start), rewritten at every start. So
  ``--enable-rollout`` holds for that run only, and a later plain start has the model API off again.

``key_file.json`` (the tokens), ``logs/`` and ``tmp/`` are written in ``--workdir``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tools.server import REPO_CONFIG, ModelCannotLoad, ServerError, attach, rollout_overrides, start_server

EXIT_FAILED = 1
EXIT_USAGE = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="yolo-ts-serve", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--model-store", type=Path, default=Path("model_store"), help="folder holding MODEL.mar (default model_store)")
    p.add_argument("--model", default="yolo", help="model name: MODEL.mar, served at /predictions/MODEL (default yolo)")
    p.add_argument("--ts-config", type=Path, default=None, help="TorchServe config.properties; its addresses are used as they are "
                   "(default: ./config.properties, else the one shipped with this project)")
    p.add_argument("--workdir", type=Path, default=Path("."), help="where key_file.json, logs/ and tmp/ (the config TorchServe starts with) "
                   "go (default: the current directory)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a READY worker (default 300)")
    p.add_argument("--stop", action="store_true", help="stop the server started from --workdir")
    p.add_argument("--enable-rollout", action="store_true", help="turn the model API on for `python -m tools.rollout`, for this run "
                   "only (loopback management API and token auth as configured; models only from archives inside --model-store, no URLs)")
    return p.parse_args(argv)


def worker_error(message: str) -> str:
    """The last exception line of a worker traceback in ``message`` (the error a user must fix)."""
    lines = [ln.strip() for ln in message.splitlines() if re.search(r"\b\w+(Error|Exception)\b: ", ln)]
    if not lines:
        return message.strip().splitlines()[0] if message.strip() else "unknown error"
    return re.sub(r"^.*?\b(\w+(?:Error|Exception): )", r"\1", lines[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stop:
        try:
            attach(args.workdir, args.model).stop()
        except ServerError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        print(f"stopped the TorchServe of {args.workdir.resolve()}")
        return 0
    config = args.ts_config or (Path("config.properties") if Path("config.properties").is_file() else REPO_CONFIG)
    mar = args.model_store / f"{args.model}.mar"
    for path, what in ((config, "--ts-config"), (mar, "the model archive")):
        if not path.is_file():
            print(f"error: {what} {path} not found" + ("; build it with `yolo-ts-export --weights W --archive`" if path == mar else ""), file=sys.stderr)
            return EXIT_USAGE
    try:
        overrides = rollout_overrides(args.model_store) if args.enable_rollout else None
        server = start_server(args.model_store, args.workdir, args.model, config, timeout=args.timeout, keep_ports=True, overrides=overrides)
    except ServerError as e:
        text = str(e)
        if isinstance(e, ModelCannotLoad):  # the worker's own answer: "yolo 1.0 could not load: ..."
            print(f"error: {text}", file=sys.stderr)
        elif "worker died" in text:
            print(f"error: the model {args.model!r} cannot load: {worker_error(text)}", file=sys.stderr)
        else:
            print(f"error: {text}", file=sys.stderr)
            return EXIT_FAILED
        print(f"(the server was stopped; full worker log: {args.workdir.resolve() / 'logs' / 'model_log.log'})", file=sys.stderr)
        return EXIT_FAILED
    print(f"TorchServe is serving {args.model!r} (a worker is READY)")
    rollout = " and the model API on for rollouts (this run only)" if args.enable_rollout else ""
    print(f"  config:     {server.config_file}  (TorchServe's: {config} with this run's model store{rollout})")
    print(f"  inference:  {server.predictions_url}")
    print(f"  management: {server.management_url}   metrics: {server.metrics_url}/metrics")
    print(f"  tokens:     {server.key_file}  (send `Authorization: Bearer <inference key>`)")
    print(f"  stop:       yolo-ts-serve --stop --workdir {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
