"""A self-hosted, first-party event collector for Outbound."""

__version__ = "0.1.0"
