"""Browser tests of the dashboard (issue 17, docs/dashboard.md) in headless Chromium."""
