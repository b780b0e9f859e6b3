.PHONY: serve demo test test-fast lint bench
serve:  ## install and start the whole pipeline on the embedded defaults
	scripts/serve.sh
demo:   ## load a few made-up studies (orders, a signed report) into the embedded archive: see README, A first look
	.venv/bin/pacs demo
test:   ## install and run the whole test suite (what CI runs)
	scripts/test.sh
test-fast:  ## the unit tier only: no server, no process (-m "not integration"), in parallel
	scripts/test.sh --fast
lint:
	.venv/bin/ruff check .
	.venv/bin/mypy
bench:  ## ingest benchmark against Orthanc (prints figures; never fails on time)
	scripts/bench.sh
