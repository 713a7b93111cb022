"""`megallama export-hf`: see :mod:`tools.hf`."""

from tools.hf import add_export_arguments as add_arguments, run_export as run  # noqa: F401
