"""The trainer's one error type: bad input the user must fix, printed as one line."""


class TrainingError(ValueError):
    """Bad input the user must fix; printed as one line."""
