"""The labeling REST API (FastAPI): ``create_app()`` builds it, ``labeler api`` serves it."""
