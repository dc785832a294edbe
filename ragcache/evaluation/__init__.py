"""Quality-vs-latency evaluation of fusion methods (importable; `ragcache eval` runs it)."""
