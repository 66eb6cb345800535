"""Web page and JSON API for predictions (FastAPI + uvicorn). Research use only."""

from braintumor.utils.optional import require

for _module in ("fastapi", "uvicorn", "python_multipart"):  # the [serve] extra: one line when missing
    require(_module, "serve", "braintumor serve")

from braintumor.serve.app import RESEARCH_NOTE, create_app, run_server

__all__ = ["RESEARCH_NOTE", "create_app", "run_server"]
