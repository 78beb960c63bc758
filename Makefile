# The two commands of the README. Each sets up .venv from the repo's own files first.
.PHONY: demo test lint

demo:
	@bash scripts/bootstrap.sh
	@# set-up, once per machine: train the two tiny MoE models into the cache (loaded afterwards), on 2 cores
	@# the Qwen3-MoE model about 12 min, the aux-loss-free GLM-4.5 model (DeepSeek-V3's router) about 7 min
	@OMP_WAIT_POLICY=PASSIVE .venv/bin/xshare train-tiny
	@OMP_WAIT_POLICY=PASSIVE .venv/bin/xshare train-tiny --router deepseek_v3
	@.venv/bin/xshare demo

test:
	@bash scripts/bootstrap.sh
	@# set-up, as for the demo: the two trained tiny MoE models the slow tests load (trained once, cached;
	@# about 12 + 7 min on 2 cores)
	@OMP_WAIT_POLICY=PASSIVE .venv/bin/xshare train-tiny
	@OMP_WAIT_POLICY=PASSIVE .venv/bin/xshare train-tiny --router deepseek_v3
	@.venv/bin/ruff check .
	@.venv/bin/python -m pytest -q

lint:
	@.venv/bin/ruff check .
