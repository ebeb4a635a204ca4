"""pyvm's test suite; a package so that ``tests.helpers`` can be imported by tests at every tier."""
