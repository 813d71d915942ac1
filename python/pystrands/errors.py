"""The exceptions the backend clients raise for rooms, users, presence and moderation.

All four are exported from :mod:`pystrands`. Each derives from the standard exception a
caller would already catch for that kind of failure, so generic handlers keep working:

* :class:`BrokerUnavailable` (a :class:`ConnectionError`): a query needs a live
  connection and there is none, or the connection dropped before the answer came.
* :class:`QueryTimeout` (a :class:`TimeoutError`): no answer before the query's deadline.
* :class:`QueryError` (a :class:`RuntimeError`): the broker answered the query with an error
  (e.g. an invalid room id).
* :class:`UnsupportedFeature` (a :class:`RuntimeError`): the connected broker does not
  announce the feature (``rooms``, ``history``) the call needs, e.g. a PyStrands 1.0 broker.

Argument errors are the usual :class:`TypeError` / :class:`ValueError`, raised before
anything is sent. Commands (``join_room``, ``leave_room``, ``send_room_message`` with
``exclude``, ``send_user_message``, ``disconnect_client``) never raise for ids nobody has:
the broker ignores them (and counts them). What only the broker checks (a join beyond
``max_rooms_per_client``, a ``room_config`` it refuses) is logged as a warning.
"""

from __future__ import annotations

__all__ = ["BrokerUnavailable", "QueryError", "QueryTimeout", "UnsupportedFeature"]


class BrokerUnavailable(ConnectionError):
    """No connection to the broker to ask, or it was lost before the broker answered."""


class QueryTimeout(TimeoutError):
    """The broker did not answer a query within its ``timeout``."""


class QueryError(RuntimeError):
    """The broker answered a query with an error (its text is the message)."""


class UnsupportedFeature(RuntimeError):
    """The connected broker does not support what the call needs (a PyStrands 1.0 broker?)."""
