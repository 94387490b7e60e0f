"""`chipwise data prepare` and `chipwise data inspect`: the token store (chipwise/data/store.py) on its own.

`chipwise train` prepares the same store implicitly; running `data prepare` first (once, on one host with a shared
cache) makes every later start-up a directory listing.
"""

from __future__ import annotations

from pathlib import Path

from chipwise.errors import ChipwiseError


def add_commands(sub) -> None:
    d = sub.add_parser("data", help="prepare or inspect the token store a config trains on")
    verbs = d.add_subparsers(dest="data_command", required=True)
    p = verbs.add_parser("prepare", help="tokenize the corpus into a sharded token store (resumes if killed)")
    p.add_argument("--config", help="YAML file with model/data sections (data.sources, data.tokenizer, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.prepare_workers=4 (repeatable)")
    i = verbs.add_parser("inspect", help="print what a prepared token store holds")
    i.add_argument("store", nargs="?", metavar="STORE_DIR", help="a store directory (else the one of --config)")
    i.add_argument("--config", help="YAML file whose data section names the store")
    i.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _data(args) -> int:
    from chipwise import data
    from chipwise.config import load_config
    from chipwise.data.store import TokenStore

    if args.data_command == "prepare":
        cfg = load_config(args.config, args.overrides)
        st = data.prepare_store(cfg.data, cfg.model.vocab_size, log=print)
    elif args.store:
        if args.config or args.overrides:
            raise ChipwiseError("give a STORE_DIR or --config, not both")
        st = TokenStore.open(Path(args.store))
        if st is None:
            raise ChipwiseError(f"{args.store} holds no complete token store (no manifest.json); run `chipwise "
                                f"data prepare --config FILE` to make one")
    else:
        cfg = load_config(args.config, args.overrides)
        path = data.locate_store(cfg.data, cfg.model.vocab_size, log=lambda _: None)[0]
        st = TokenStore.open(path)
        if st is None:
            raise ChipwiseError(f"this config's data is not prepared yet (no store at {path}); run `chipwise data "
                                f"prepare` with the same config")
    for line in st.describe():
        print(line)
    return 0


COMMANDS = {"data": _data}
