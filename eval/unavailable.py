"""How a metric says it cannot be computed here, and why."""


class MetricUnavailable(RuntimeError):
    """A metric's weights (or package) are not installed; the message says what is missing and
    how to provide it. Reports print it as "unavailable: <reason>" instead of a number."""
