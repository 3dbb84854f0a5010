"""The dashboards tests share the root conftest's ``compiled`` (default spec) and ``dashboards`` fixtures."""
