from virtkit.cli import run

run()
