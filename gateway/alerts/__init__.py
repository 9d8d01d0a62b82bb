"""Alerts (issue 16): events the scripts write once per crossing into each account's outbox
(a Redis stream in its slot), delivered at least once to webhooks, signed with HMAC-SHA256.

outbox.py (the Redis side, composed with the Store), events.py (an event's JSON body),
signing.py, delivery.py (one HTTP POST), sender.py (retries, backoff, giving up), metrics.py,
lifespan.py (the sender inside `gateway serve`). docs/alerts.md tells the whole story.
"""
