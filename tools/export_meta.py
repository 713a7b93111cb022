"""`megallama export-meta`: see :mod:`tools.meta`."""

from tools.meta import add_export_arguments as add_arguments, run_export as run  # noqa: F401
