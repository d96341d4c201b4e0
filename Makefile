# The two commands of the README's quick start.
.PHONY: train test

train:  ## set up, then run the default job (tiny model, built-in task, CPU or GPU)
	bash scripts/setup.sh
	.venv/bin/r1mega-train $(ARGS)

test:   ## set up both tested stacks with test dependencies, then run their tests (README: Tested matrix)
	bash scripts/test_stacks.sh
