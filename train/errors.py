"""Errors the training CLI reports as one line (`error: <what>; <fix>`), with no TensorFlow import."""

from faceberry.errors import UsageError


class TrainError(UsageError):
    """A problem with the user's input; the message names it and the fix."""


class WeightsError(TrainError, ValueError):
    """Backbone weights that cannot be used; the message names the fix."""
