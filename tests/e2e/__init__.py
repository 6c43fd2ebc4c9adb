"""The browser test (`make e2e`); a package, so that its conftest is `e2e.conftest`, not the `conftest` that
tests/ imports helpers from."""
