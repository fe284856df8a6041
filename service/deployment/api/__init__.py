"""The HTTP API of the service (FastAPI): ingestion, prediction, status, health and metrics."""

from service.deployment.api.app import create_app

__all__ = ["create_app"]
