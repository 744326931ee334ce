"""dingtalk-etl: sync DingTalk group chats into a SQL database with an audit trail."""

__version__ = "0.1.0"
