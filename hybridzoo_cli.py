"""Entry point of the `hybridzoo` command. It is a top-level module, not `hybridzoo.cli`, because importing anything
inside `hybridzoo` first runs the package's `__init__`, which registers the model classes (torch + transformers,
seconds). This module tells the package to defer that to the moment a subcommand runs, then hands over to
`hybridzoo.cli`, the one place that lists the subcommands."""

import os

os.environ["HYBRIDZOO_DEFER_REGISTRATION"] = "1"  # read (and removed) by hybridzoo/__init__.py

from hybridzoo.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
