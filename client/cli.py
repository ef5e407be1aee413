"""The `cartridge` command.

Client subcommands (generate, adapters) live here and need only grpc. Subcommands that need the
engine (serve, train, eval, merge) are plugged in through the `cartridge.commands` entry points, so
this module never imports server/ or adapters/ and `cartridge generate` starts without torch.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from importlib.metadata import entry_points

from .answer_printing import answer_json, print_answer, print_details
from .client import ADMIN_TOKEN_ENV, INFERENCE_TOKEN_ENV, LOCATIONS, TLS_CA_ENV, CartridgeClient, CartridgeError
from .generate_flags import add_generation_flags, generation_options

DEFAULT_SERVER = os.environ.get("CARTRIDGE_SERVER", "127.0.0.1:50051")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, naming the closest choice when a value is not one of them (`cartridge generat`),
    as _refuse_unknown does for misspelled flags. Subcommand parsers are made of the same class."""

    def _check_value(self, action: argparse.Action, value) -> None:
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as err:
            close = difflib.get_close_matches(str(value), [str(choice) for choice in action.choices or ()], n=1)
            if not close:
                raise
            raise argparse.ArgumentError(action, f"{err.message}; did you mean {close[0]!r}?") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cartridge", description="Serve, call, train and merge LoRA adapters "
                     "on one 4-bit Llama-family base.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(commands)
    _add_feedback(commands)
    _add_adapters(commands)
    # By name, first on sys.path winning: an install left over from the package's old name ("cartridge")
    # registers the same commands a second time.
    plugins = {}
    for plugin in entry_points(group="cartridge.commands"):
        plugins.setdefault(plugin.name, plugin)
    for name in sorted(plugins):
        plugins[name].load()(commands)
    return parser


def _server_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=DEFAULT_SERVER,
                        help="host:port of the server (default: $CARTRIDGE_SERVER or %(default)s)")
    parser.add_argument("--admin-token-file", metavar="FILE",
                        help=f"token for register/unregister (default: ${ADMIN_TOKEN_ENV})")
    parser.add_argument("--token-file", metavar="FILE",
                        help=f"token for inference calls (default: ${INFERENCE_TOKEN_ENV}, else the admin token)")
    parser.add_argument("--tls-ca", metavar="PEM", help=f"connect over TLS, trusting this CA (default: ${TLS_CA_ENV})")


def _add_generate(commands) -> None:
    p = commands.add_parser("generate", help="generate text, optionally through an adapter")
    p.add_argument("prompt", help="the user's message (or, with --raw, the exact prompt text)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--system", help="a system message before the user's (chat only)")
    p.add_argument("--adapter", default="", help="registered adapter name (default: the base model)")
    add_generation_flags(p)
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print the answer as JSON (with --stream: one JSON "
                   "object per line, a choice's last with finish_reason and token counts)")
    _server_flag(p)
    p.set_defaults(run=_generate)


def _add_feedback(commands) -> None:
    p = commands.add_parser("feedback", help="rate an answer, for the stored adapter version that gave it",
                            description="Counts SCORE (-1 bad to 1 good) for the version that answered REQUEST_ID "
                            "(`generate --json` prints it); prints that version as NAME@vN.")
    p.add_argument("request_id")
    p.add_argument("score", type=float)
    p.add_argument("--tag", default="", help="an optional label: 1 to 32 of [A-Za-z0-9._-]")
    _server_flag(p)
    p.set_defaults(run=lambda args: _with_client(args, lambda c: print(c.feedback(args.request_id, args.score,
                                                                                 args.tag))))


def _add_adapters(commands) -> None:
    p = commands.add_parser("adapters", help="register, unregister and list adapters on a running server")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    register = verbs.add_parser("register", help="load a peft adapter directory under a name")
    register.add_argument("name")
    register.add_argument("path", help="adapter directory as the server sees it")
    register.add_argument("--replace", action="store_true", help="swap the weights of an existing name")
    register.add_argument("--pin", action="store_true", help="keep it in a device slot for good")
    unregister = verbs.add_parser("unregister", help="remove an adapter")
    unregister.add_argument("name")
    listing = verbs.add_parser("list", help="registered adapters")
    listing.add_argument("--json", action="store_true")
    for verb in (register, unregister, listing):
        _server_flag(verb)
    register.set_defaults(run=_register)
    unregister.set_defaults(run=_unregister)
    listing.set_defaults(run=lambda args: _with_client(args, lambda c: _print_adapters(c.list_adapters(), args.json)))


def _register(args: argparse.Namespace) -> int:
    # The server resolves the path on its own file system: send an absolute one when it exists here.
    path = os.path.abspath(args.path) if os.path.exists(args.path) else args.path
    return _with_client(args, lambda c: _print_adapters([c.register_adapter(args.name, path, args.replace,
                                                                             args.pin)]))


def _unregister(args: argparse.Namespace) -> int:
    def unregister(client: CartridgeClient) -> None:
        client.unregister_adapter(args.name)
        print(f"unregistered {args.name}")
    return _with_client(args, unregister)


def _with_client(args: argparse.Namespace, action) -> int:
    try:
        tokens = {key: _read_token(getattr(args, flag), flag) for key, flag in
                  (("admin_token", "admin_token_file"), ("inference_token", "token_file"))}
        with CartridgeClient(args.server, tls_ca=args.tls_ca, **tokens) as client:
            action(client)
    except (CartridgeError, OSError) as err:
        print(f"cartridge {args.command}: {err}", file=sys.stderr)
        return 1
    return 0


def _read_token(path: str | None, flag: str) -> str | None:
    if path is None:
        return None
    try:
        return open(path).read().strip()
    except OSError as err:
        raise OSError(f"--{flag.replace('_', '-')} {path}: {err.strerror}") from None


def _generate(args: argparse.Namespace) -> int:
    if args.stream and args.n > 1 and not args.json:
        # Choices stream interleaved, token by token: only --json's lines can say which piece is whose.
        print("cartridge generate: error: --stream with --n above 1 needs --json (each line names its choice)",
              file=sys.stderr)
        return 2
    options = dict(adapter=args.adapter, **generation_options(args))
    if args.raw:
        options["prompt"] = args.prompt
    else:
        system = [{"role": "system", "content": args.system}] if args.system else []
        options["messages"] = [*system, {"role": "user", "content": args.prompt}]

    def run(client: CartridgeClient) -> None:
        if not args.stream:
            answer = client.generate(**options)
            if args.json:
                print(json.dumps(answer_json(answer)))
            else:
                print_answer(answer)
            return
        logprobs, prompt_logprobs, tool_calls = [], [], []
        for piece in client.generate_stream(**options):
            if args.json:
                print(json.dumps(answer_json(piece, piece=True, many=args.n > 1)), flush=True)
                continue
            print(piece.text, end="", flush=True)
            logprobs += piece.logprobs
            prompt_logprobs += piece.prompt_logprobs
            tool_calls += piece.tool_calls
        if not args.json:
            print()
            print_details(logprobs, tool_calls, prompt_logprobs)
    return _with_client(args, run)


def _print_adapters(adapters, as_json: bool = False) -> None:
    rows = [{"name": a.name, "rank": a.rank, "lora_alpha": a.lora_alpha, "use_rslora": a.use_rslora,
             "target_modules": list(a.target_modules), "size_bytes": a.size_bytes, "file_bytes": a.file_bytes,
             "path": a.path,
             "location": LOCATIONS[a.location], "device_slot": a.device_slot or None, "pinned": a.pinned,
             "sha256": a.sha256, "problem": a.problem or None, "version": a.version, "live": a.live,
             "store_versions": list(a.store_versions)} for a in adapters]
    if as_json:
        print(json.dumps(rows))
        return
    if not rows:
        print("no adapters registered")
    for row in rows:
        where = f"slot {row['device_slot']}" if row["device_slot"] else row["location"]
        flags = (" pinned" if row["pinned"] else "") + (f" UNUSABLE: {row['problem']}" if row["problem"] else "")
        stored = ""
        if row["version"]:
            others = ",".join(f"v{n}" for n in row["store_versions"])
            stored = f"\tv{row['version']} " + (f"live (store: {others})" if row["live"] else "by version")
        # The file holds the weights as saved (bf16 from our trainer); the server keeps them in its own dtype.
        on_disk = f"{_size(row['file_bytes'])} on disk, " if row["file_bytes"] else ""
        print(f"{row['name']}\trank {row['rank']}\talpha {row['lora_alpha']:g}\t{','.join(row['target_modules'])}\t"
              f"{on_disk}{_size(row['size_bytes'])} in memory\t{where}{flags}\t{row['path']}{stored}")


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**10:.0f} KiB" if num_bytes < 2**20 else f"{num_bytes / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _refuse_unknown(_chosen_parser(parser, args), unknown)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        # Ctrl-C is how a user stops a stream or a run: a clean line, the shell's usual status, no traceback.
        print(file=sys.stderr)
        return 130


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)subcommand parser the command line picked, e.g. the one of `adapters register`."""
    while True:
        choices = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not choices or getattr(args, choices[0].dest, None) is None:
            return parser
        parser = choices[0].choices[getattr(args, choices[0].dest)]


def _refuse_unknown(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    """The subcommand's own usage, and the flag the user probably meant (argparse shows only the top level)."""
    known = [flag for action in parser._actions for flag in action.option_strings]
    hints = []
    for word in unknown:
        if word.startswith("-"):
            close = difflib.get_close_matches(word.split("=")[0], known, n=1)
            hints += [f"did you mean {close[0]}?"] if close else []
    parser.error("; ".join([f"unrecognized arguments: {' '.join(unknown)}", *hints]))


if __name__ == "__main__":
    sys.exit(main())
