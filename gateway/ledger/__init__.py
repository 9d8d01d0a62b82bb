"""The durable spend ledger: PostgreSQL's copy of every settled request (schema and
migrations, the exporter from the Redis streams, reconciliation, and the spend queries).
Imported only when a PostgreSQL URL is configured."""
