"""Web page and JSON API for predictions (FastAPI + uvicorn). Research use only."""

from braintumor.serve.app import RESEARCH_NOTE, create_app, run_server

__all__ = ["RESEARCH_NOTE", "create_app", "run_server"]
