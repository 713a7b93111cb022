"""Offline tools behind `megallama <subcommand>`: tokenizer, preprocessing, curation,
resharding, conversion, sweeps, planner, carbon."""
