"""Analyst views: current_chat_members and membership_changes.

Plain SQL that SQLite, PostgreSQL and MySQL/MariaDB all accept: no dialect functions, no
boolean literals (``NOT is_baseline`` works on SQLite's and MySQL's integers and on
PostgreSQL's boolean), ``is_owner`` an integer 0/1 from a CASE expression. docs/schema.md
documents both views.

- ``current_chat_members``: one row per current member (``chat_members.left_at IS NULL``) of
  every chat, dismissed chats included (their membership stays as last observed; filter on
  ``chat_status``).
- ``membership_changes``: joins and leaves only (``member_joined`` / ``member_left`` events),
  baseline members at a chat's discovery excluded. The kind of change is ``change_type``
  (``'joined'`` or ``'left'``): ``change`` is a reserved word in MySQL/MariaDB and would need
  quoting that differs between the databases. Attribute changes (owner, name, settings,
  dismissal) stay in ``chat_events`` (``event_type = 'attribute_changed'``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

CURRENT_CHAT_MEMBERS = """
CREATE VIEW current_chat_members AS
SELECT
    m.chatid AS chatid,
    c.name AS chat_name,
    m.userid AS userid,
    m.joined_at AS joined_at,
    CASE WHEN c.owner_userid = m.userid THEN 1 ELSE 0 END AS is_owner,
    c.status AS chat_status
FROM chat_members m
JOIN chats c ON c.chatid = m.chatid
WHERE m.left_at IS NULL
"""

MEMBERSHIP_CHANGES = """
CREATE VIEW membership_changes AS
SELECT
    e.observed_at AS observed_at,
    e.chatid AS chatid,
    c.name AS chat_name,
    e.userid AS userid,
    CASE WHEN e.event_type = 'member_joined' THEN 'joined' ELSE 'left' END AS change_type,
    e.run_id AS run_id,
    e.id AS event_id
FROM chat_events e
LEFT JOIN chats c ON c.chatid = e.chatid
WHERE e.event_type IN ('member_joined', 'member_left')
  AND NOT e.is_baseline
"""


def upgrade() -> None:
    op.execute(CURRENT_CHAT_MEMBERS)
    op.execute(MEMBERSHIP_CHANGES)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS membership_changes")
    op.execute("DROP VIEW IF EXISTS current_chat_members")
