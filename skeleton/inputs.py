"""What one request may ask of a served skeleton: limits and checks of the texts (no torch: the HTTP front end and
the MLflow model check requests with it before any model work)."""
from __future__ import annotations

from collections.abc import Sequence

MAX_ROWS = 256  # texts per request: a bigger batch is refused, not queued behind everyone else's
MAX_CHARS = 20_000  # per text; tokens past the expert's max_length are truncated anyway


def check_texts(texts: Sequence) -> None:
    """Raise ValueError naming the first problem of a request's texts: none, too many, empty or too long."""
    if not texts:
        raise ValueError("the request has no rows")
    if len(texts) > MAX_ROWS:
        raise ValueError(f"request too large: {len(texts)} rows, at most {MAX_ROWS} per request")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"row {i}: field 'text' is empty or missing")
        if len(text) > MAX_CHARS:
            raise ValueError(f"row {i}: text of {len(text)} characters, at most {MAX_CHARS}")
