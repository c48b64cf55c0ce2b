# Packages (issue 7): `make deb`, `make rpm` build them into $(PKG_OUT) from packaging/
# (packaging/build.py; see packaging/README.md). The Debian 12 build root and the venv are
# cached under $(SDS_PKG_CACHE) and rebuilt only when their inputs change.
PKG_OUT ?= dist
export SDS_PKG_CACHE ?= $(abspath $(CACHE))/packaging
# lintian and debhelper for the deb, rpm (rpmbuild) and rpmlint for the rpm, debootstrap for
# the build root
PKG_APT_PACKAGES := debhelper lintian fakeroot rpm rpmlint debootstrap

.PHONY: deb rpm deb-example packages packages-test packages-clean

$(CACHE)/packaging-apt.stamp: $(CACHE)/apt.stamp
	@missing=$$(for p in $(PKG_APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $$missing; \
	fi
	@touch $@

deb: $(CACHE)/packaging-apt.stamp
	$(PYTHON) packaging/build.py deb --out $(PKG_OUT)

rpm: $(CACHE)/packaging-apt.stamp
	$(PYTHON) packaging/build.py rpm --out $(PKG_OUT)

# the example of packaging/README.md: an application on top of sdserve (sdserve@hello)
deb-example: $(CACHE)/packaging-apt.stamp
	$(PYTHON) packaging/build.py example --out $(PKG_OUT)

packages: deb rpm deb-example

# What tests/system/test_packages.py installs: the release build (lintian must pass), a newer
# build of the same sources (the upgrade), the rpm (with its rpmlint report), the example.
# Cheap when current (the tests ask build.py again, which then finds them current).
packages-test: $(CACHE)/packaging-apt.stamp
	$(PYTHON) packaging/build.py deb --out $(SDS_PKG_CACHE)/test
	$(PYTHON) packaging/build.py deb --out $(SDS_PKG_CACHE)/test --rebuild 2 --no-lint
	$(PYTHON) packaging/build.py rpm --out $(SDS_PKG_CACHE)/test
	$(PYTHON) packaging/build.py example --out $(SDS_PKG_CACHE)/test

packages-clean:
	rm -rf $(SDS_PKG_CACHE) $(PKG_OUT)/sdserve_*.deb $(PKG_OUT)/sdserve-*.rpm \
		$(PKG_OUT)/sdserve-hello_*.deb $(PKG_OUT)/lintian*.txt $(PKG_OUT)/rpmlint.txt \
		$(PKG_OUT)/.deb-*.key $(PKG_OUT)/.rpm.key $(PKG_OUT)/.example.key

TEST_PREREQS += packages-test
