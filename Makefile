.PHONY: serve test lint bench
serve:  ## install and start the whole pipeline on the embedded defaults
	scripts/serve.sh
test:   ## install and run the whole test suite
	scripts/test.sh
lint:
	.venv/bin/ruff check .
bench:  ## ingest benchmark against Orthanc (prints figures; never fails on time)
	scripts/bench.sh
