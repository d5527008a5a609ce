"""The errors pfc raises for a user's input, printed by the entry points as one line.

    PfcError            the family: a problem with what the user gave, not a bug
    ├── ConfigError     a config field or recipe that cannot be used
    ├── DataError       shards, manifests, samples, verification sets
    └── CheckpointError a checkpoint that is missing, incomplete, corrupt or for another model

Each is also a ``ValueError`` (bad input, as the library's components raise it), so
``except ValueError`` keeps working; but the entry points print only this family without a
traceback. Any other exception, a ``ValueError`` from inside torch or numpy included, keeps its
traceback.
"""
from __future__ import annotations


class PfcError(ValueError):
    """A problem with the user's input (config, data, checkpoint); its message names the cause."""


class ConfigError(PfcError):
    """A config field, recipe file or command-line override that cannot be used."""


class DataError(PfcError):
    """Training or verification data that cannot be used: manifest, shard, sample, pairs list."""


class CheckpointError(PfcError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt, or for another model."""
