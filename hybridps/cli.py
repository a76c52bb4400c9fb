"""The ``hybridps`` command: one entry point for the four parts.

    hybridps data build OUT --source crowdhuman=... ...   (= python -m hybridps.data_prep)
    hybridps pretrain --config ... --shards ... --out ... (= python -m hybridps.pretrain)
    hybridps ckpt convert RUN --to nae --out nae.pth      (= python -m hybridps.checkpoints)
    hybridps finetune eval --dataset prw ...              (= python -m hybridps.finetune)
    hybridps search --weights RUN --query IMG --box ... --gallery DIR --out hits.png
                                                          (= python -m hybridps.finetune search)

Each sub-command is the part's own command-line tool with its own ``--help`` and the
project's exit contract (2: bad input, one line; 1: internal error; 130: interrupted).
Under accelerate: ``accelerate launch -m hybridps.pretrain ...``.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from hybridps import __version__

# command -> (module with main(argv), argv prefix, one-line description)
COMMANDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "data": ("hybridps.data_prep.cli", (), "dataset releases -> shards: synth, build, inspect, preview"),
    "pretrain": ("hybridps.pretrain.cli", (), "pre-train the whole search model on shards"),
    "ckpt": ("hybridps.checkpoints.cli", (), "weights: list, download, inspect, convert, add"),
    "finetune": ("hybridps.finetune.cli", (), "fine-tune, evaluate and compare person-search models"),
    "search": ("hybridps.finetune.cli", ("search",), "rank gallery images for one query and draw the hits (PNG)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: hybridps COMMAND [ARGS...]   (hybridps COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, _, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] == "--version":
        print(f"hybridps {__version__}")
        return 0
    name = args[0]
    if name not in COMMANDS:
        print(f"hybridps: unknown command {name!r} (choose from: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module, prefix, _ = COMMANDS[name]
    return importlib.import_module(module).main([*prefix, *args[1:]])


if __name__ == "__main__":
    sys.exit(main())
