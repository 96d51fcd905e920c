"""The API contract: the wire schemas shared by the server, the client and the CLI (pydantic v2 only).

Imports nothing else of proponent, so every layer may depend on it.
"""
