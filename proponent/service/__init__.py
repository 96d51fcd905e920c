"""The proponent influence server (FastAPI)."""
