"""Prompt material for the teacher-written instruction sets (YAML, loaded with importlib.resources)."""
