# The two commands of the README. Each sets up .venv from the repo's own files first.
.PHONY: demo test lint

demo:
	@bash scripts/bootstrap.sh
	@# set-up, once per machine: train the tiny MoE into the cache (about 15 min on 2 cores; loads afterwards)
	@OMP_WAIT_POLICY=PASSIVE .venv/bin/xshare train-tiny
	@.venv/bin/xshare demo

test:
	@bash scripts/bootstrap.sh
	@# set-up, as for the demo: the trained tiny MoE the slow tests load (trained once, cached)
	@OMP_WAIT_POLICY=PASSIVE .venv/bin/xshare train-tiny
	@.venv/bin/ruff check .
	@.venv/bin/python -m pytest -q

lint:
	@.venv/bin/ruff check .
