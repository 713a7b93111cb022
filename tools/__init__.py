"""Libraries of the offline tools (planner, carbon, scaling fits, sweeps, resharding, HF/Meta conversion);
their command lines live in :mod:`megallama.commands`."""
