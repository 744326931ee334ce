"""``python -m etl`` is the ``dingtalk-etl`` command."""

from etl.cli import main

main()
