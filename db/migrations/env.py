"""Alembic environment: runs our migrations on the connection `db.migrate` hands over."""

from alembic import context

from caviar.db.migrate import context_options

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through db.migrate, which supplies the connection")
context.configure(connection=connection, **context_options())
with context.begin_transaction():
    context.run_migrations()
