"""The startup benchmark's images and workloads, built from Debian packages and cached.

Every image is Debian bookworm minbase (one layer, shared by all of them, as images built on one
base are in a real cluster) plus one layer of packages installed with apt. Each is an ordinary
gzip image, built once by tests/support/images.py into its cache (/var/cache/zest-test by
default); bump a recipe's version when its steps change.

    .venv/bin/python -m bench.workloads build        builds (or finds) every image here

WORKLOADS are timed to their first output line: each prints one line when its work is done.
EXTRA are the further images the memory measurement mounts (ten images in all).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from tests.support import images
from tests.support.images import Recipe, apt_layer


@dataclass(frozen=True)
class Workload:
    name: str  # short label for tables and charts
    recipe: Recipe

    @property
    def image(self) -> str:
        return self.recipe.name

    @property
    def cmd(self) -> tuple[str, ...]:
        return self.recipe.cmd

    @property
    def expected(self) -> str:
        return self.recipe.expected_output


_HELLO_C = r'#include <stdio.h>\nint main(void) { puts(\"hello from c\"); return 0; }\n'


def _recipe(name: str, packages: tuple[str, ...], cmd: tuple[str, ...], expected: str,
            remove: tuple[str, ...] = ()) -> Recipe:
    return images.register(Recipe(
        name=f"bench-{name}",
        version="1",
        layers=(apt_layer(*packages, remove=remove),),
        cmd=cmd,
        expected_output=expected,
        base="debian-base",
    ))


WORKLOADS: tuple[Workload, ...] = (
    Workload("python3", _recipe(
        "python", ("python3",), ("python3", "-c", "print('hello from python')"),
        "hello from python")),
    Workload("gcc", _recipe(
        "gcc", ("gcc", "libc6-dev"),
        ("sh", "-c", f'printf "{_HELLO_C}" > /tmp/hello.c && gcc -O2 -o /tmp/hello /tmp/hello.c'
         " && /tmp/hello"),
        "hello from c")),
    Workload("nodejs", _recipe(
        "node", ("nodejs",), ("node", "-e", "console.log('hello from node')"),
        "hello from node")),
    Workload("postgres-initdb", _recipe(
        "postgres", ("postgresql-15",),
        ("sh", "-c", "runuser -u postgres -- /usr/lib/postgresql/15/bin/initdb --no-sync"
         " -D /tmp/pgdata >/dev/null && echo initdb done"),
        "initdb done",
        # the cluster the package's postinst made: an image ships none
        remove=("var/lib/postgresql/15/main", "etc/postgresql/15/main"))),
)

EXTRA: tuple[Recipe, ...] = (
    _recipe("ruby", ("ruby",), ("ruby", "-e", "puts 'hello from ruby'"), "hello from ruby"),
    _recipe("php", ("php-cli",), ("php", "-r", 'echo "hello from php\\n";'), "hello from php"),
    _recipe("git", ("git",), ("git", "--version"), "git version"),
    _recipe("curl", ("curl",), ("curl", "--version"), "curl"),
    _recipe("sqlite", ("sqlite3",), ("sqlite3", ":memory:", "select 'hello from sqlite'"),
            "hello from sqlite"),
    _recipe("lua", ("lua5.4",), ("lua5.4", "-e", "print('hello from lua')"), "hello from lua"),
)


def all_recipes() -> list[Recipe]:
    return [w.recipe for w in WORKLOADS] + list(EXTRA)


def main(argv: list[str]) -> int:
    names = [r.name for r in all_recipes()] if argv[1:] in ([], ["build"]) else argv[2:]
    return images.main(["build", *names])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
