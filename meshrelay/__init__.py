"""meshrelay: a store-and-forward relay for end-to-end-encrypted direct messages."""

__version__ = "0.1.0"
