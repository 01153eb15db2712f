"""Ray Serve application builders (`serve run serve_apps.llm:app_builder config=...`)."""
