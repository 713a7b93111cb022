"""`megallama import-hf`: see :mod:`tools.hf`."""

from tools.hf import add_import_arguments as add_arguments, run_import as run  # noqa: F401
