# System tests: a real systemd booted with systemd-nspawn (tests/system/).
# `make test` builds the box root filesystems once (systemd 252 and 254, about 80 s) and reuses
# them from $(SDS_TEST_CACHE) afterwards; pytest reads the same variable.
export SDS_TEST_CACHE ?= $(abspath $(CACHE))/testbed

.PHONY: testbed testbed-clean

# Cheap when the cache is current (two stamp files are read). Where boxes cannot run (not
# root...), it says why and goes on: the tests then skip, or fail under SDS_TEST_REQUIRE_SYSTEM=1.
testbed: venv
	$(BIN)/python tests/system/rootfs.py --if-possible

testbed-clean:
	rm -rf $(SDS_TEST_CACHE)

TEST_PREREQS += testbed
