"""cogview-api: a self-hosted HTTP API for CogView 4."""

__version__ = "0.1.0"
