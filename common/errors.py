"""One base error for the whole project, so callers can catch modstream's own
failures without swallowing programming errors. Each area defines its errors
beside the code that raises them, deriving from ModstreamError."""


class ModstreamError(Exception):
    """Base of every error modstream raises on purpose."""
