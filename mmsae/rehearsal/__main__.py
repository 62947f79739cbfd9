"""``python -m mmsae.rehearsal build WORKDIR``: build the rehearsal's tiny models and data under WORKDIR
(kept when already built); ``python -m mmsae.rehearsal port CONFIG``: the port of the endpoint CONFIG's
``explain.base_url`` names. scripts/rehearse.sh calls both."""

from __future__ import annotations

import argparse
import logging
import sys
from urllib.parse import urlparse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmsae.rehearsal", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build the tiny models and data").add_argument("workdir")
    sub.add_parser("port", help="print the port of explain.base_url in a config file").add_argument("config")
    args = ap.parse_args(argv)
    if args.command == "port":
        import yaml

        with open(args.config) as f:
            url = urlparse(yaml.safe_load(f)["explain"]["base_url"])
        print(url.port)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from mmsae.rehearsal import build_all

    for name, path in build_all(args.workdir).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
