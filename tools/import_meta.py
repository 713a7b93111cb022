"""`megallama import-meta`: see :mod:`tools.meta`."""

from tools.meta import add_import_arguments as add_arguments, run_import as run  # noqa: F401
