# The two commands of the README. Each sets up .venv from the repo's own files first.
.PHONY: demo test lint

demo:
	@bash scripts/bootstrap.sh
	@.venv/bin/xshare demo

test:
	@bash scripts/bootstrap.sh
	@.venv/bin/ruff check .
	@.venv/bin/python -m pytest -q

lint:
	@.venv/bin/ruff check .
