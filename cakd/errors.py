"""The one base of the errors told to a user as one line (what is wrong, what to do).

The trainer and every script catch :class:`CakdError` and nothing narrower, so a new kind of
bad input needs a subclass, never a new catch list. It lives in the method package, which
raises it too (:class:`cakd.weights.StateMismatch`) and never imports the training system.
"""


class CakdError(Exception):
    """Bad input or a state that cannot be used: printed as one ``error:`` line, exit status 1."""
